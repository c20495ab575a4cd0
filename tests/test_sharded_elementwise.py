"""LAMB, LARS, SONew (band 1; band 2 with relative damping) and HeavyBall under FSDP2 (``fully_shard`` on each layer
and on the root) and HSDP on gloo processes: after 5 steps the full parameters equal one process on the same
global batch, whatever the world size and mesh, with identical replicated state on every rank; a NaN in one
rank's shard makes every rank skip; unsupported placements raise at construction;
torch.distributed.checkpoint saves reshard across world sizes 4, 2 and 1, and plain and sharded state dicts
load into each other, the resumed runs continuing as the uninterrupted one; with tuning on, FSDP2 ranks tune
per rank, HSDP replicas agree, and timing makes no collective.

One spawn of 4 processes runs every configuration per backend (process start-up dominates the cost):
world 4 on a 1-D mesh, world 2 on the "shard" dimension of a (2, 2) mesh (two independent jobs), world
1 on a (4, 1) mesh, and HSDP on the (2, 2) mesh. The model has an odd row count (7 rows: uneven,
padded shards) and a 3-row layer of one input (at world 4 the last rank's shard is empty and the others
hold one entry: shorter than SONew's band 2, whose halo then spans two ranks).
"""

import os

import pytest
import torch
from distributed import run_distributed
from torch import nn

import kfopt

GLOBAL_BATCH = 8
STEPS = 5
TOL = 1e-5
OPTIMIZERS = {
    "LAMB": (kfopt.LAMB, dict(lr=1e-2, weight_decay=0.01, max_grad_norm=1.0)),
    "LARS": (kfopt.LARS, dict(lr=0.5, momentum=0.9, weight_decay=1e-3, eta=0.02, max_grad_norm=1.0)),
    "SONew": (kfopt.SONew, dict(lr=1e-2, band=1, weight_decay=1e-3)),
    "SONew-band2": (kfopt.SONew, dict(lr=1e-2, band=2, eps=0.05, relative_eps=True)),
    "HeavyBall": (kfopt.HeavyBall, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
}

#: (configuration, optimizer) runs per backend. The interpreter is slow (a step of this model takes
#: ~0.4 s): it runs each kernel family once over 4 ranks (LAMB, LARS and SONew with band 2 -- halos of
#: two rows, relative damping -- on world 4; the kernels under HSDP: ``test_tuned_configs_under_fsdp2_and_hsdp``);
#: the PyTorch path runs every pair. Both use the same reductions and halos (``kfopt.sharding``,
#: ``kfopt.halos``).
_CONFIGS = ("fsdp4", "fsdp2", "fsdp1", "hsdp22")
BACKEND_CASES = {"torch": tuple((c, n) for c in _CONFIGS for n in OPTIMIZERS),
                 "triton": (("fsdp4", "LAMB"), ("fsdp4", "LARS"), ("fsdp4", "SONew-band2"))}
#: the tuning test: LAMB's and LARS's launches share the norm pipeline, SONew's are its own
TUNED = ("LAMB", "SONew")
BACKEND_NAN = {"torch": ("LAMB", "LARS", "SONew-band2", "HeavyBall"), "triton": ("LAMB", "SONew-band2")}


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 1), nn.Tanh(),
                         nn.Linear(1, 3))


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g))
            for _ in range(STEPS)]


def loss_fn(y, t):
    return ((y - t) ** 2).sum(1).mean()


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(model, opt, data, share=0, shares=1, nan_at=None, nan_here=False):
    """Steps on ``data``; this rank takes share ``share`` of ``shares`` of every global batch. At step
    ``nan_at`` the rank with ``nan_here`` puts a NaN into its shard of the first weight's gradient."""
    size = GLOBAL_BATCH // shares
    for i, (x, t) in enumerate(data):
        opt.zero_grad()
        loss_fn(model(x[share * size:(share + 1) * size]), t[share * size:(share + 1) * size]).backward()
        if i == nan_at and nan_here:
            g = model[0].weight.grad
            (g.to_local() if hasattr(g, "to_local") else g).view(-1)[0] = float("nan")
        opt.step()


def snapshot(model, opt):
    """Full parameters, full state tensors (by parameter order) and the skip count."""
    params = [full(p.detach()).clone() for p in model.parameters()]
    state = [{k: full(v).clone() for k, v in sorted(opt.state[p].items())} for p in model.parameters()]
    return params, state, int(opt.skipped_steps)


def _sharded_model(mesh):
    from torch.distributed.fsdp import fully_shard

    model = build_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def sharded_runs(rank, world, backend):
    """Every configuration on 4 ranks; returns {(config, optimizer): snapshot} and the error messages."""
    if backend == "torch":
        os.environ["KFOPT_BACKEND"] = "torch"
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard

    mesh4 = init_device_mesh("cpu", (4,))
    mesh22 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    mesh41 = init_device_mesh("cpu", (4, 1), mesh_dim_names=("replicate", "shard"))
    shard2 = mesh22.get_local_rank("shard")
    configs = {"fsdp4": (mesh4, rank, 4), "fsdp2": (mesh22["shard"], shard2, 2), "fsdp1": (mesh41["shard"], 0, 1),
               "hsdp22": (mesh22, rank, 4)}
    data = batches()
    out = {}
    for config, name in BACKEND_CASES[backend]:
        mesh, share, shares = configs[config]
        cls, kwargs = OPTIMIZERS[name]
        model = _sharded_model(mesh)
        opt = cls(model.parameters(), **kwargs)
        train(model, opt, data, share, shares)
        out[config, name] = snapshot(model, opt)
    # a NaN in rank 1's shard at step 3 of 5: every rank skips that step (and only that one)
    for name in BACKEND_NAN[backend]:
        cls, kwargs = OPTIMIZERS[name]
        model = _sharded_model(mesh4)
        opt = cls(model.parameters(), **kwargs)
        train(model, opt, data[:3], rank, 4)
        before = snapshot(model, opt)
        train(model, opt, data[3:4], rank, 4, nan_at=0, nan_here=rank == 1)
        after_nan = snapshot(model, opt)
        train(model, opt, data[4:], rank, 4)
        out["nan", name] = (before, after_nan, snapshot(model, opt))
    errors = {}
    for label, placements, mesh in (("shard1", [Shard(1)], mesh4), ("partial", [Partial()], mesh4),
                                    ("shard_both", [Shard(0), Shard(0)], mesh22)):
        bad = nn.Parameter(DTensor.from_local(torch.ones(4, 4), mesh, placements))
        for name, (cls, kwargs) in OPTIMIZERS.items():
            try:
                cls([bad], **kwargs)
                errors[label, name] = None
            except ValueError as exc:
                errors[label, name] = str(exc)
    mixed = _sharded_model(mesh4)
    try:
        kfopt.LAMB([*mixed.parameters(), nn.Parameter(torch.ones(3))])
        errors["mixed"] = None
    except ValueError as exc:
        errors["mixed"] = str(exc)
    return out, errors


def single_process(name, data, nan_at=None):
    cls, kwargs = OPTIMIZERS[name]
    model = build_model()
    opt = cls(model.parameters(), **kwargs)
    train(model, opt, data)
    return snapshot(model, opt)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def rel_state(state, reference, key):
    """``rel`` of a state tensor; SONew's lag statistics EMA(g_i g_(i+j)) relative to the size of the
    diagonal ones, EMA(g_i^2), which bounds them (their own norm can be small by cancellation)."""
    if key != "offdiag":
        return rel(state[key], reference[key])
    scale = reference["diag"].double().norm().item() * max(1, reference[key].shape[0]) ** 0.5
    return (state[key].double() - reference[key].double()).norm().item() / max(scale, 1e-30)


_RUNS = {}


def results_for(backend):
    """The 4-rank runs and the single-process references of ``backend`` (run once per test session)."""
    if backend not in _RUNS:
        if backend == "torch":
            os.environ["KFOPT_BACKEND"] = "torch"
        try:
            ranks = run_distributed(sharded_runs, 4, backend, timeout=480)
            reference = {name: single_process(name, batches()) for name in {n for _, n in BACKEND_CASES[backend]}}
        finally:
            os.environ.pop("KFOPT_BACKEND", None)
        _RUNS[backend] = ranks, reference
    return _RUNS[backend]


@pytest.mark.distributed
@pytest.mark.parametrize("backend,config,name", [(b, c, n) for b, cases in BACKEND_CASES.items() for c, n in cases])
def test_sharded_equals_single_process(backend, config, name):
    ranks, reference = results_for(backend)
    ref_params, ref_state, _ = reference[name]
    for rank, (out, _) in enumerate(ranks):
        params, state, skipped = out[config, name]
        assert skipped == 0
        for i, (p, q) in enumerate(zip(params, ref_params)):
            assert p.shape == q.shape
            assert rel(p, q) < TOL, f"rank {rank} param {i}: {rel(p, q)}"
        for i, (s, r) in enumerate(zip(state, ref_state)):
            assert s.keys() == r.keys()
            for k in s:
                assert rel_state(s, r, k) < TOL or torch.equal(s[k], r[k]), f"rank {rank} state {i} {k}"
        # identical replicated state on every rank: full parameters and full state bit-equal to rank 0's
        params0, state0, _ = ranks[0][0][config, name]
        assert all(torch.equal(a, b) for a, b in zip(params, params0))
        assert all(torch.equal(s[k], s0[k]) for s, s0 in zip(state, state0) for k in s)


@pytest.mark.distributed
@pytest.mark.parametrize("backend,name", [(b, n) for b, names in BACKEND_NAN.items() for n in names])
def test_nan_in_one_shard_skips_on_every_rank(backend, name):
    ranks, _ = results_for(backend)
    for rank, (out, _) in enumerate(ranks):
        before, after_nan, end = out["nan", name]
        assert after_nan[2] == 1 and end[2] == 1, f"rank {rank} skipped {after_nan[2]}, {end[2]}"
        assert all(torch.equal(a, b) for a, b in zip(before[0], after_nan[0])), f"rank {rank} stepped on NaN"
        assert all(torch.equal(s[k], t[k]) for s, t in zip(before[1], after_nan[1]) for k in s)
        ends0 = ranks[0][0]["nan", name][2]
        assert all(torch.equal(a, b) for a, b in zip(end[0], ends0[0]))
        assert not all(torch.equal(a, b) for a, b in zip(end[0], after_nan[0]))  # the next step is taken


@pytest.mark.distributed
def test_unsupported_placements_raise_at_construction():
    ranks, _ = results_for("torch")
    errors = ranks[0][1]
    for name in OPTIMIZERS:
        assert "Shard(dim=1)" in errors["shard1", name] and "params'][0]" in errors["shard1", name]
        assert "Partial" in errors["partial", name]
        assert "Shard(dim=0), Shard(dim=0)" in errors["shard_both", name]
    assert errors["mixed"] is not None and "param_groups[0]['params'][8]" in errors["mixed"]


SAVE_AFTER = 3


def checkpoint_runs(rank, world, directory):
    """Checkpoints of every optimizer on 4 ranks (PyTorch path): DCP saved at world 4 resumed at world 2 and
    1, saved at world 2 resumed at world 4, a plain single-process state_dict() loaded into a sharded run
    and a full state dict of a sharded run loaded into a plain optimizer. Returns the full final
    parameters of each resumed run and of the uninterrupted one, per optimizer."""
    os.environ["KFOPT_BACKEND"] = "torch"
    from torch.distributed.device_mesh import init_device_mesh

    meshes = (init_device_mesh("cpu", (4,)), init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")),
              init_device_mesh("cpu", (4, 1), mesh_dim_names=("replicate", "shard")))
    out = {}
    for name in OPTIMIZERS:
        for label, params in _checkpoint_runs(rank, name, meshes, os.path.join(directory, name)).items():
            out[name, label] = params
    return out


def _checkpoint_runs(rank, name, meshes, directory):
    """One optimizer's runs of :func:`checkpoint_runs`, its checkpoints under ``directory``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict)

    mesh4, mesh22, mesh41 = meshes
    shard2 = mesh22.get_local_rank("shard")
    cls, kwargs = OPTIMIZERS[name]
    data = batches()
    out = {}

    def sharded(mesh):
        model = _sharded_model(mesh)
        return model, cls(model.parameters(), **kwargs)

    def save(model, opt, path):
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=os.path.join(directory, path))

    def load(model, opt, path):
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(sd, checkpoint_id=os.path.join(directory, path))
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])

    model, opt = sharded(mesh4)
    train(model, opt, data, rank, 4)
    out["uninterrupted"] = snapshot(model, opt)[0]

    model, opt = sharded(mesh4)
    train(model, opt, data[:SAVE_AFTER], rank, 4)
    save(model, opt, "w4")
    full_osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    full_params = [full(p.detach()).clone() for p in model.parameters()]

    for label, mesh, share, shares in (("w4->w2", mesh22["shard"], shard2, 2), ("w4->w1", mesh41["shard"], 0, 1)):
        model, opt = sharded(mesh)
        load(model, opt, "w4")
        train(model, opt, data[SAVE_AFTER:SAVE_AFTER + 1], share, shares)
        if label == "w4->w2":
            save(model, opt, "w2")
        train(model, opt, data[SAVE_AFTER + 1:], share, shares)
        out[label] = snapshot(model, opt)[0]
    model, opt = sharded(mesh4)
    load(model, opt, "w2")
    train(model, opt, data[SAVE_AFTER + 1:], rank, 4)
    out["w2->w4"] = snapshot(model, opt)[0]

    # a plain single-process state_dict() into a sharded run (every rank loads the same file)
    plain = build_model()
    plain_opt = cls(plain.parameters(), **kwargs)
    train(plain, plain_opt, data[:SAVE_AFTER])
    plain_sd = plain_opt.state_dict()
    model = build_model()
    model.load_state_dict(plain.state_dict())
    for layer in model:
        if isinstance(layer, nn.Linear):
            from torch.distributed.fsdp import fully_shard

            fully_shard(layer, mesh=mesh4)
    fully_shard(model, mesh=mesh4)
    opt = cls(model.parameters(), **kwargs)
    opt.load_state_dict(plain_sd)
    train(model, opt, data[SAVE_AFTER:], rank, 4)
    out["plain->w4"] = snapshot(model, opt)[0]

    # the full state dict of a sharded run into a plain single-process optimizer
    plain = build_model()
    with torch.no_grad():
        for p, q in zip(plain.parameters(), full_params):
            p.copy_(q)
    plain_opt = cls(plain.parameters(), **kwargs)
    plain_opt.load_state_dict(full_osd)
    train(plain, plain_opt, data[SAVE_AFTER:])
    out["w4->plain"] = snapshot(plain, plain_opt)[0]
    return out


@pytest.mark.distributed
def test_checkpoints_reshard_and_resume(tmp_path):
    os.environ["KFOPT_BACKEND"] = "torch"
    try:
        ranks = run_distributed(checkpoint_runs, 4, str(tmp_path), timeout=240)
    finally:
        os.environ.pop("KFOPT_BACKEND", None)
    for name in OPTIMIZERS:
        reference = ranks[0][name, "uninterrupted"]
        for rank, out in enumerate(ranks):
            for label in ("w4->w2", "w4->w1", "w2->w4", "plain->w4", "w4->plain"):
                for i, (p, q) in enumerate(zip(out[name, label], reference)):
                    assert rel(p, q) < TOL, f"{name} rank {rank} {label} param {i}: {rel(p, q)}"


def tuned_runs(rank, world, cache_dir):
    """The ``TUNED`` optimizers on 4 ranks (Triton interpreter) under FSDP2 and HSDP with tuning switched on
    (as on a GPU) and a fake timer that makes every rank prefer a different candidate and *run* a rank-dependent
    number of them (1 to 3 launches per candidate): a collective made while timing would pair up wrongly
    across ranks or hang. Returns each run's selections, local shards and full parameters."""
    import kfopt.autotune.space as space
    from torch.distributed.device_mesh import init_device_mesh

    selected, timing = [], {}
    real_select = space.ConfigSpace.select

    def select(cs, *, run, **kwargs):
        def timed_run(config):
            timing["candidate"] = (cs, config)
            return run(config)

        config = real_select(cs, run=timed_run, **kwargs)
        mode = space._DISTRIBUTED_MODE.get()
        selected.append((mode[0] if mode else None, cs.kernel, cs.configs.index(config),
                         [cs.configs.index(preferred(cs, r)) for r in range(world)]))
        return config

    def preferred(cs, r):
        others = [c for c in cs.configs if c != cs.default]
        return others[(r + 1) % len(others)]

    def rank_preference(fn):
        for _ in range(1 + rank % 3):
            fn()
        cs, config = timing["candidate"]
        return 0.0 if config == preferred(cs, rank) else 1.0

    from kfopt.kernels.lamb import LAMB_CONFIGS
    from kfopt.kernels.lars import LARS_CONFIGS
    from kfopt.kernels.sonew import SONEW_CONFIGS

    # five candidates each: the interpreter runs every timed one
    for cs in (LAMB_CONFIGS, LARS_CONFIGS, SONEW_CONFIGS):
        cs.configs = (cs.default, *[c for c in cs.configs if c != cs.default][:world])
    os.environ["KFOPT_AUTOTUNE_CACHE"] = os.path.join(cache_dir, f"rank{rank}.json")
    space.can_benchmark = lambda device: True
    space.benchmark = rank_preference
    space.ConfigSpace.select = select
    meshes = {"fsdp4": init_device_mesh("cpu", (4,)),
              "hsdp22": init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))}
    data = batches()[:2]
    out = {}
    for config, mesh in meshes.items():
        for name in TUNED:
            cls, kwargs = OPTIMIZERS[name]
            selected.clear()
            model = _sharded_model(mesh)
            opt = cls(model.parameters(), **kwargs)
            train(model, opt, data, rank, 4)
            out[config, name] = {"selected": list(selected), "full": snapshot(model, opt)[0],
                                 "local": [p.detach().to_local().clone() for p in model.parameters()]}
    return out


@pytest.mark.distributed
def test_tuned_configs_under_fsdp2_and_hsdp(tmp_path):
    """FSDP2: every rank tunes its own shard (per-rank configs); HSDP: the replicas of a shard (ranks
    {0, 2} and {1, 3} of the (2, 2) mesh) agree on the config of their first rank, so they stay
    bit-identical; timing makes no collective; the result is the single-process one."""
    ranks = run_distributed(tuned_runs, 4, str(tmp_path), timeout=420)
    for config in ("fsdp4", "hsdp22"):
        for name in TUNED:
            reference = single_process(name, batches()[:2])[0]
            for rank, out in enumerate(ranks):
                run = out[config, name]
                assert run["selected"], f"{config} {name}: rank {rank} launched no kernel"
                for mode, kernel, index, preferred in run["selected"]:
                    assert len(set(preferred)) == 4  # the ranks prefer different candidates
                    if config == "fsdp4":
                        assert (mode, index) == ("per-rank", preferred[rank]), (config, name, rank, kernel)
                    else:
                        assert (mode, index) == ("agree", preferred[rank % 2]), (config, name, rank, kernel)
                for i, (p, q) in enumerate(zip(run["full"], reference)):
                    assert rel(p, q) < TOL, f"{config} {name} rank {rank} param {i}: {rel(p, q)}"
            for rank in (2, 3):  # HSDP replicas hold bit-identical shards
                mine, replica = ranks[rank]["hsdp22", name]["local"], ranks[rank - 2]["hsdp22", name]["local"]
                assert all(torch.equal(a, b) for a, b in zip(mine, replica)), f"{name}: rank {rank} drifted"
