"""MKOR on 2 gloo processes (DistributedDataParallel on CPU): factors and parameters identical on every
rank and equal to one process on the concatenated global batch (also with micro-batches and
stabiliser blends); factors world-size invariant for unequal local batches; the ``a`` all-reduce is
in flight when the backward pass ends.

One spawn runs every configuration (process start-up dominates the cost).
"""

import os

import pytest
import torch
from distributed import run_distributed
from torch import nn

from kfopt.mkor import MKOR

GLOBAL_BATCH = 8
STEPS = 5
COMMON = dict(lr=0.05, base="sgd", momentum=0.9, weight_decay=1e-3, inv_freq=2, stat_decay=0.9)
CONFIGS = {
    "plain": dict(),
    "blend": dict(inv_freq=1, stabilizer_threshold=1.05),
    "micro-batches": dict(micro_batches=True),
    "unequal": dict(unequal=True, inv_freq=1),
}
TOL = 1e-5  # local sums averaged over ranks vs one global sum


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(75, 8), nn.Tanh(),
                         nn.Linear(8, 8, bias=False), nn.Tanh(), nn.Linear(8, 3))


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 2, 5, 5, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g))
            for _ in range(STEPS)]


def loss_fn(y, t):
    return ((y - t) ** 2).sum(1).mean()


def shares(config, rank, world):
    """This rank's rows of every global batch: equal contiguous shares, or 3 and 5 rows ("unequal")."""
    if config.get("unequal"):
        return [slice(0, 3), slice(3, 8)][rank]
    share = GLOBAL_BATCH // world
    return slice(rank * share, (rank + 1) * share)


def options(config):
    return {**COMMON, **{k: v for k, v in config.items() if k not in ("micro_batches", "unequal")}}


def results(opt, model):
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "factors": {n: opt.inverse_factors(n) for n in opt.layers}}


def mkor_ranks(rank, world):
    os.environ["KFOPT_BACKEND"] = "torch"
    from torch.nn.parallel import DistributedDataParallel

    out = {}
    for name, config in CONFIGS.items():
        model = build_model()
        ddp = DistributedDataParallel(model)
        opt = MKOR(ddp, **options(config))
        mine = shares(config, rank, world)
        in_flight = []
        for x, t in batches()[:1 if config.get("unequal") else STEPS]:
            x, t = x[mine], t[mine]
            opt.zero_grad()
            if config.get("micro_batches"):  # 1 + 3 rows, losses weighted by their share of the rank's batch
                with ddp.no_sync():
                    (loss_fn(ddp(x[:1]), t[:1]) / 4).backward()
                (loss_fn(ddp(x[1:]), t[1:]) * 3 / 4).backward()
            else:
                loss_fn(ddp(x), t).backward()
            in_flight.append(opt.preconditioner._a_handle is not None and opt.preconditioner._a_current)
            opt.step()
        out[name] = {**results(opt, model), "in_flight": in_flight, "steps": opt.steps}
    return out


def single_process(config):
    model = build_model()
    opt = MKOR(model, **options(config))
    for x, t in batches()[:1 if config.get("unequal") else STEPS]:
        opt.zero_grad()
        loss_fn(model(x), t).backward()
        opt.step()
    return results(opt, model)


@pytest.mark.distributed
def test_two_ranks_match_one_process_on_the_global_batch(monkeypatch):
    ranks = run_distributed(mkor_ranks, 2, timeout=120.0)
    monkeypatch.setenv("KFOPT_BACKEND", "torch")
    for name, config in CONFIGS.items():
        r0, r1 = ranks[0][name], ranks[1][name]
        # the a all-reduce was started from the backward pass on every factor-update step
        inv_freq = options(config)["inv_freq"]
        assert r0["in_flight"] == [s % inv_freq == 0 for s in range(r0["steps"])], name
        for key in ("params", "factors"):
            for n in r0[key]:
                for a, b in zip(r0[key][n] if key == "factors" else [r0[key][n]],
                                r1[key][n] if key == "factors" else [r1[key][n]]):
                    assert torch.equal(a, b), f"{name}: {key} {n} differ between ranks"
        single = single_process(config)
        for n, factors in single["factors"].items():
            for a, b in zip(r0["factors"][n], factors):
                rel = ((a - b).norm() / b.norm()).item()
                assert rel <= TOL, f"{name}: factor of {n} differs from one process by {rel:.2e}"
        if config.get("unequal"):
            continue  # DDP averages the ranks' mean-loss gradients unweighted: parameters differ
        for n, p in single["params"].items():
            rel = ((r0["params"][n] - p).norm() / p.norm()).item()
            assert rel <= TOL, f"{name}: parameter {n} differs from one process by {rel:.2e}"


def test_a_single_process_starts_no_collective():
    model = build_model()
    opt = MKOR(model, lr=0.1)
    x, t = batches()[0]
    loss_fn(opt.capture.model(x), t).backward()
    assert opt.preconditioner._a_handle is None
    opt.step()
