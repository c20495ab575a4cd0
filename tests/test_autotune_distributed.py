"""Tuned kernel configs under torch.distributed: the Kronecker-factored optimizers agree on them.

Four gloo processes run K-FAC (KAISA HYBRID-OPT: grad-worker groups of 2, LAMB base), MKOR and SINGD
(triangular/block-diagonal factors) under DistributedDataParallel, with tuning switched on (as on a
GPU) and a fake timer that makes every rank find a *different* candidate fastest. The kernels launched
in the step must then use the config of the first rank of the ranks that compute the same thing
(never the default: tuned, and agreed), and every rank must end with bit-identical parameters. The
hooks' statistics (combined across ranks afterwards) may use per-rank configs. Hangs (a collective
one rank makes and another does not) fail through ``run_distributed``'s timeout.
"""

import pytest
import torch
from distributed import run_distributed
from torch import nn

BATCH = 8
STEPS = 2


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(9, 17), nn.Tanh(), nn.Linear(17, 17), nn.Tanh(), nn.Linear(17, 5))


def optimizers():
    import kfopt
    return {
        "kfac-hybrid": lambda m: kfopt.KFAC(m, lr=0.05, base="lamb", grad_worker_fraction=0.5, inv_update_steps=1),
        "mkor": lambda m: kfopt.MKOR(m, lr=0.05, inv_freq=1),
        "singd": lambda m: kfopt.SINGD(m, lr=0.05, T=1, structures=("tril", "block4diagonal")),
    }


def _ranks(rank, world, cache_dir):
    import os

    from torch.nn.parallel import DistributedDataParallel

    import kfopt.autotune.space as space

    selected, timing = [], {}
    real_select = space.ConfigSpace.select

    def select(cs, *, run, **kwargs):
        """Tune without launching: 'run' records the candidate, the fake timer prefers one by rank."""
        config = real_select(cs, run=lambda config: timing.update(candidate=(cs, config)), **kwargs)
        mode = space._DISTRIBUTED_MODE.get()
        selected.append((mode[0] if mode else None, cs.kernel, str(kwargs["bucket"]), str(kwargs["dtype"]),
                         cs.configs.index(config), cs.configs.index(cs.default)))
        return config

    def rank_preference(fn):
        fn()
        cs, config = timing["candidate"]
        others = [c for c in cs.configs if c != cs.default]
        return 0.0 if config == others[(rank + 1) % len(others)] else 1.0

    os.environ["KFOPT_AUTOTUNE_CACHE"] = os.path.join(cache_dir, f"rank{rank}.json")  # per-node caches
    space.can_benchmark = lambda device: True
    space.benchmark = rank_preference
    space.ConfigSpace.select = select

    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(BATCH * world, 9, generator=g), torch.randn(BATCH * world, 5, generator=g))
            for _ in range(STEPS)]
    out = {}
    for name, build in optimizers().items():
        selected.clear()
        model = build_model()
        ddp = DistributedDataParallel(model)
        opt = build(ddp)
        for x, t in data:
            opt.zero_grad()
            ((ddp(x[rank::world]) - t[rank::world]) ** 2).sum(1).mean().backward()
            opt.step()
        out[name] = {"params": [p.detach().clone() for p in model.parameters()], "selected": list(selected)}
    return out


@pytest.mark.distributed
def test_kronecker_factored_optimizers_agree_on_tuned_configs(tmp_path):
    results = run_distributed(_ranks, 4, str(tmp_path), timeout=600)
    for name in optimizers():
        for rank, res in enumerate(results):
            for p, q in zip(res[name]["params"], results[0][name]["params"]):
                assert torch.equal(p, q), f"{name}: rank {rank}'s parameters differ from rank 0's"
        agreed = [[s for s in res[name]["selected"] if s[0] == "agree"] for res in results]
        assert all(agreed), f"{name}: a rank launched no kernel under agree_on_configs"
        for mine in agreed:
            assert all(index != default for *_, index, default in mine), f"{name}: an agreed config is the default"
        kernels = {s[1] for mine in agreed for s in mine}
        if name == "kfac-hybrid":  # grad-worker groups {0, 2} and {1, 3} precondition different layers
            by_group = {0: 0, 2: 0, 1: 1, 3: 1}
            for rank, mine in enumerate(agreed):
                eigen = [s for s in mine if s[1] == "eigen_precondition"]
                assert eigen == [s for s in agreed[by_group[rank]] if s[1] == "eigen_precondition"], rank
            assert "lamb_step" in kernels and "eigen_precondition" in kernels
        else:
            assert all(mine == agreed[0] for mine in agreed), f"{name}: ranks chose different configs"
        assert name != "mkor" or {"rank1_inverse_update", "kronecker_precondition"} <= kernels
        assert name != "singd" or {"triangular_matmul", "block_diagonal_matmul"} <= kernels
