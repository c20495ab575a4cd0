"""KFAC with KAISA on 2 and 4 gloo processes (DistributedDataParallel on CPU): COMM-OPT, HYBRID-OPT
and MEM-OPT give the parameters of one process on the concatenated global batch, identical on every
rank; a checkpoint saved at world size 2 continues at world sizes 1 and 4; at world size 2 with one
grad worker per layer, rank 0's checkpoint taken after step 1, 5, 9, 10 or 11 (the default inverse-update
interval of 10: after an update, between updates, just before, at and after the next) continues on
both ranks bit for bit as the uninterrupted run; grafted COMM-OPT K-FAC whose inverse-update step blows up
skips it alike on both ranks (the rank that received a layer's second-order data restores it too).

One spawn per world size runs every configuration (process start-up dominates the cost).
"""

import copy
import os

import pytest
import torch
from contracts.helpers import assert_same_tree, infinite_direction
from distributed import run_distributed
from torch import nn

from kfopt.kfac import KFAC, KFACPreconditioner

GLOBAL_BATCH = 8
STEPS = 5
#: steps before the checkpoint; with inv_update_steps=2 the last inverse update (step index 2) used
#: the saved factors, so continuing from the checkpoint equals continuing the run
SAVE_AFTER = 3
COMMON = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, damping=1e-2, kl_clip=1e-3, inv_update_steps=2)
TOL = 1e-4  # fp32: local sums averaged over ranks vs one global sum, amplified by the eigen solve


def build_model() -> nn.Module:
    """Four preconditioned layers of different sizes (so that MEM-OPT on 4 ranks gives each rank one)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(75, 8), nn.Tanh(),
                         nn.Linear(8, 8, bias=False), nn.Tanh(), nn.Linear(8, 3))


def batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 2, 5, 5, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g))
            for _ in range(steps)]


def loss_fn(y, t):
    return ((y - t) ** 2).sum(1).mean()


def train(model, opt, data, rank=0, world=1):
    """Steps on ``data``; each rank takes its contiguous share of every global batch."""
    share = GLOBAL_BATCH // world
    for x, t in data:
        opt.zero_grad()
        loss_fn(model(x[rank * share:(rank + 1) * share]), t[rank * share:(rank + 1) * share]).backward()
        opt.step()


#: unequal local batches: rank r takes rows UNEQUAL[world][r]:UNEQUAL[world][r + 1] of the global batch
UNEQUAL = {1: [0, 8], 2: [0, 3, 8], 4: [0, 1, 3, 6, 8]}


def unequal_batch_factors(rank=0, world=1):
    """Factors after one step where each rank backpropagates the mean loss of its unequal share."""
    model = build_model()
    precond = KFACPreconditioner(model)
    x, t = batches()[0]
    lo, hi = UNEQUAL[world][rank], UNEQUAL[world][rank + 1]
    loss_fn(model(x[lo:hi]), t[lo:hi]).backward()
    precond.step()
    return {name: [f.clone() for f in precond.factors(name)] for name in precond.layers}


def kaisa_ranks(rank, world, configs, checkpoint):
    """Per config: the parameters after STEPS steps (and the checkpoint after SAVE_AFTER if asked), how
    many layers' second-order data this rank holds; then, if ``checkpoint`` is given, the parameters
    after continuing it for the remaining steps with each config. Also the factors of a step on
    unequal local batches."""
    os.environ["KFOPT_BACKEND"] = "torch"
    from torch.nn.parallel import DistributedDataParallel

    data = batches()
    out = {"unequal": unequal_batch_factors(rank, world)}
    for name, (kwargs, save) in configs.items():
        model = build_model()
        ddp = DistributedDataParallel(model)
        opt = KFAC(ddp, **COMMON, **kwargs)
        train(ddp, opt, data[:SAVE_AFTER], rank, world)
        if save:
            out[name + "/checkpoint"] = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
        train(ddp, opt, data[SAVE_AFTER:], rank, world)
        out[name] = [p.detach().clone() for p in model.parameters()]
        out[name + "/stored"] = sum(layer.second is not None for layer in opt.preconditioner._layers)
        if checkpoint is not None:
            model = build_model()
            ddp = DistributedDataParallel(model)
            opt = KFAC(ddp, **COMMON, **kwargs)
            model.load_state_dict(checkpoint["model"])
            opt.load_state_dict(checkpoint["opt"])
            train(ddp, opt, data[SAVE_AFTER:], rank, world)
            out[name + "/resumed"] = [p.detach().clone() for p in model.parameters()]
    return out


#: the resume run: the default inverse-update interval (10), one grad worker per layer on 2 ranks,
#: checkpoints (steps taken) after the first update, mid-interval, just before, at and after the second
RESUME = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, damping=1e-2, grad_worker_fraction=0.5)
RESUME_STEPS, RESUME_SAVES = 12, (1, 5, 9, 10, 11)


def resume_ranks(rank, world, compute_method):
    """The uninterrupted run (parameters after each step, final state dict), and for each checkpoint of
    rank 0 (broadcast to every rank) a fresh model and optimizer on every rank loading it and taking the
    remaining steps (parameters after each, final state dict)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ["KFOPT_BACKEND"] = "torch"
    data = batches(RESUME_STEPS)

    def fresh():
        model = build_model()
        ddp = DistributedDataParallel(model)
        return model, ddp, KFAC(ddp, **RESUME, compute_method=compute_method)

    model, ddp, opt = fresh()
    params, checkpoints = [], {}
    for step in range(RESUME_STEPS):
        train(ddp, opt, data[step:step + 1], rank, world)
        params.append([p.detach().clone() for p in model.parameters()])
        if step + 1 in RESUME_SAVES:
            saved = [copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})]
            dist.broadcast_object_list(saved, src=0)
            checkpoints[step + 1] = saved[0]
    out = {"params": params, "state": copy.deepcopy(opt.state_dict()), "resumed": {},
           "stored": sum(layer.second is not None for layer in opt.preconditioner._layers),
           "saved_forms": {k: (sorted(c["opt"]["kfac"]["second_order"]), sorted(c["opt"]["kfac"]["decomposed"]))
                           for k, c in checkpoints.items()}}
    for saved_after, checkpoint in checkpoints.items():
        model, ddp, opt = fresh()
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["opt"])
        resumed = []
        for step in range(saved_after, RESUME_STEPS):
            train(ddp, opt, data[step:step + 1], rank, world)
            resumed.append([p.detach().clone() for p in model.parameters()])
        out["resumed"][saved_after] = {"params": resumed, "state": copy.deepcopy(opt.state_dict())}
    return out


#: grafted K-FAC whose step BLOWN_UP (an inverse-update step: inv_update_steps=2) blows up
GRAFTED, BLOWN_UP = dict(COMMON, lr=1e-2, momentum=0.0, graft="adam"), 2


def blown_up_run(rank=0, world=1):
    """Grafted K-FAC (on 2 ranks COMM-OPT under DDP: each layer decomposed by one rank and broadcast to the
    other) whose step ``BLOWN_UP`` gets an infinite preconditioned gradient from finite gradients: the
    parameters, every layer's second-order data and the blow-up count after STEPS steps."""
    import kfopt.graft

    model = build_model()
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)
    opt = KFAC(net, **GRAFTED, **({"grad_worker_fraction": 1.0} if world > 1 else {}))
    for step, batch in enumerate(batches()):
        graft_step = kfopt.graft.graft_step
        if step == BLOWN_UP:
            kfopt.graft.graft_step = infinite_direction(graft_step)
        try:
            train(net, opt, [batch], rank, world)
        finally:
            kfopt.graft.graft_step = graft_step
    return {"params": [p.detach().clone() for p in model.parameters()],
            "second": [t.clone() for layer in opt.preconditioner._layers for t in layer.second],
            "blown up": int(opt.blown_up_steps)}


def world2_ranks(rank, world, configs):
    return {**kaisa_ranks(rank, world, configs, None), "blown up": blown_up_run(rank, world),
            "resume": {method: resume_ranks(rank, world, method) for method in ("eigen", "inverse")}}


@pytest.fixture(scope="module")
def single_process():
    """The references, on one process (KFOPT_BACKEND=torch, one thread): the parameters after STEPS
    steps on the global batches, and the factors of one step on the first global batch."""
    backend, threads = os.environ.get("KFOPT_BACKEND"), torch.get_num_threads()
    os.environ["KFOPT_BACKEND"] = "torch"
    torch.set_num_threads(1)
    try:
        model = build_model()
        train(model, KFAC(model, **COMMON), batches())
        return {"params": [p.detach().clone() for p in model.parameters()], "factors": unequal_batch_factors()}
    finally:
        torch.set_num_threads(threads)
        if backend is None:
            os.environ.pop("KFOPT_BACKEND")
        else:
            os.environ["KFOPT_BACKEND"] = backend


def check_unequal(results, reference):
    """Factors from unequal local batches equal those of the global batch (fp32), on every rank."""
    for res in results:
        for name, factors in reference.items():
            for f, ref in zip(res["unequal"][name], factors):
                assert ((f - ref).norm() / ref.norm()).item() <= 1e-6, name


@pytest.fixture(scope="module")
def world2():
    configs = {"comm-opt": (dict(grad_worker_fraction=1.0), True),
               "mem-opt": (dict(grad_worker_fraction=0.5, symmetric_comm=True), False)}
    return run_distributed(world2_ranks, 2, configs, timeout=180)


def check_ranks(results, name, reference, tol=TOL):
    for rank, res in enumerate(results):
        for p, q, ref in zip(res[name], results[0][name], reference):
            assert torch.equal(p, q), f"{name}: rank {rank} differs from rank 0"
            rel = ((p.double() - ref.double()).norm() / ref.double().norm()).item()
            assert rel <= tol, f"{name}: rank {rank} relative error {rel:.2e} vs the single process"


@pytest.mark.distributed
def test_a_grafted_step_that_blows_up_is_skipped_alike_on_every_rank(world2, monkeypatch):
    """A blown-up grafted step on an inverse-update step puts the old second-order data back on every rank
    (the rank that decomposed a layer and the one that received it): after the run every rank holds the
    same second-order data and parameters, those of one process with the same blow-up."""
    monkeypatch.setenv("KFOPT_BACKEND", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = blown_up_run()
    finally:
        torch.set_num_threads(threads)
    for rank, res in enumerate(world2):
        run = res["blown up"]
        assert run["blown up"] == 1 == reference["blown up"], f"rank {rank}"
        for name in ("second", "params"):
            for t, first in zip(run[name], world2[0]["blown up"][name]):
                assert torch.equal(t, first), f"{name}: rank {rank} differs from rank 0"
    for rank, res in enumerate(world2):
        for p, ref in zip(res["blown up"]["params"], reference["params"]):
            rel = ((p.double() - ref.double()).norm() / ref.double().norm()).item()
            assert rel <= TOL, f"rank {rank}: relative error {rel:.2e} vs the single process"


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_match_one(world2, single_process):
    check_unequal(world2, single_process["factors"])
    for name in ("comm-opt", "mem-opt"):
        check_ranks(world2, name, single_process["params"])
    assert [res["comm-opt/stored"] for res in world2] == [4, 4]  # COMM-OPT: all eigen data everywhere
    assert sum(res["mem-opt/stored"] for res in world2) == 4  # MEM-OPT: each layer's on one rank
    saved = [res["comm-opt/checkpoint"]["opt"]["kfac"] for res in world2]
    assert saved[0]["steps"] == SAVE_AFTER
    for name, factors in saved[0]["factors"].items():  # factors are global: identical on both ranks
        assert all(torch.equal(factors[k], saved[1]["factors"][name][k]) for k in ("A", "G"))


@pytest.mark.distributed
@pytest.mark.slow
def test_four_processes_match_one_and_resume_a_two_process_checkpoint(world2, single_process):
    configs = {"comm-opt": (dict(grad_worker_fraction=1.0), False),
               "hybrid-opt": (dict(grad_worker_fraction=0.5, symmetric_comm=True), False),
               "mem-opt": (dict(grad_worker_fraction=0.25, assignment_strategy="memory"), False)}
    results = run_distributed(kaisa_ranks, 4, configs, world2[0]["comm-opt/checkpoint"], timeout=300)
    check_unequal(results, single_process["factors"])
    for name in configs:
        check_ranks(results, name, single_process["params"])
        check_ranks(results, name + "/resumed", single_process["params"])
    assert [res["mem-opt/stored"] for res in results] == [1, 1, 1, 1]
    # HYBRID-OPT: two grad-worker groups of two ranks; each group stores its layers' data twice
    assert sum(res["hybrid-opt/stored"] for res in results) == 8


@pytest.mark.distributed
def test_two_process_checkpoint_resumes_on_one_process(world2, single_process, monkeypatch):
    monkeypatch.setenv("KFOPT_BACKEND", "torch")
    checkpoint = world2[0]["comm-opt/checkpoint"]
    model = build_model()
    opt = KFAC(model, **COMMON)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    train(model, opt, batches()[SAVE_AFTER:])
    for p, ref, two in zip(model.parameters(), single_process["params"], world2[0]["comm-opt"]):
        assert ((p - ref).norm() / ref.norm()).item() <= TOL
        assert ((p - two).norm() / two.norm()).item() <= TOL


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_checkpoint_with_one_grad_worker_per_layer_resumes_bit_identically(world2, method):
    """grad_worker_fraction=0.5 on 2 ranks: each layer's second-order data lives on one rank; rank 0's
    checkpoint carries its own layers' data and the factors (and damping) the last inverse update
    decomposed for the others, and every rank continues from it exactly as the uninterrupted run."""
    runs = [res["resume"][method] for res in world2]
    assert sum(run["stored"] for run in runs) == 4  # each layer's data on one rank only
    held, decomposed = runs[0]["saved_forms"][RESUME_SAVES[0]]
    assert held and decomposed  # rank 0's checkpoint holds both forms
    for rank, run in enumerate(runs):
        for saved_after, resumed in run["resumed"].items():
            for step, (got, expected) in enumerate(zip(resumed["params"], run["params"][saved_after:]),
                                                   start=saved_after + 1):
                for i, (p, q) in enumerate(zip(got, expected)):
                    assert torch.equal(p, q), f"rank {rank}, resumed after step {saved_after}: parameter {i} " \
                        f"differs after step {step} by {(p - q).abs().max().item():.3e}"
            state, expected = resumed["state"], run["state"]
            if rank > 0 and saved_after > RESUME_SAVES[-2]:
                # no inverse update since the load: rank 1 keeps rank 0's saved data of the layers it
                # does not hold, where its own run keeps the factors they were decomposed from
                state, expected = ({**s, "kfac": {k: v for k, v in s["kfac"].items()
                                                  if k not in ("second_order", "decomposed")}}
                                   for s in (state, expected))
            assert_same_tree(state, expected, f"rank {rank}, resumed after step {saved_after}")
