"""K-FAC, MKOR, MKOR-H and SINGD under FSDP2 (``fully_shard`` per layer and at the root) and HSDP on gloo
ranks (``kfopt.sharded_distribution.Sharded``): after 5 steps on the same global batch the full parameters
and the factors equal one process's, every rank holds the same factors (SINGD's in their structure's free
parameters), K-FAC's second-order data and MKOR's inverse factors live on each layer's owner alone, MKOR's
owners precondition their own layers, a NaN in one rank's shard skips MKOR's and SINGD's step on every
rank (K-FAC's under a GradScaler or base LAMB; MKOR's and SINGD's under a GradScaler too), K-FAC's,
MKOR's, MKOR-H's and SINGD's distributed checkpoints resume on other meshes, and placements other than
row shards raise at construction naming the layer. Grafted K-FAC, MKOR, MKOR-H and SINGD (``GRAFT_CASES``)
equal one process's on shard groups of 4, 2 (HSDP (2, 2)), 1 ((4, 1)) and 2 ranks, skip a NaN in one rank's
shard on every rank, resume their distributed checkpoints (the graft's state in them) on HSDP and 2 ranks,
and refuse at construction a model that mixes sharded and plain parameters.

One launch of 4 ranks runs the shard groups of 4 (mesh (4,)), of 2 (HSDP on a (2, 2) mesh: each
replicate group exchanges on its own) and of 1 (a (4, 1) mesh); one launch of 2 ranks a mesh (2,).
The model has a Conv2d, a Linear with an odd row count (33) and one with fewer rows than ranks (3).
Kernels run on the torch backend (``KFOPT_BACKEND=torch``) except in the shard group of 4 with eigen
K-FAC and with Toeplitz SINGD, and of 2 with MKOR (and MKOR grafting Adam), which run them through Triton
(its interpreter on CPU).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from tests.distributed import run_distributed

STEPS = 5
GLOBAL_BATCH = 8
#: (compute_method, kl_clip, inv_update_steps)
CASES = {"eigen": ("eigen", 1e-3, 2), "inverse": ("inverse", None, 1)}
#: SINGD's structures of (K, C): K is 19 x 19 (Conv2d), 49 x 49, 34 x 34; C is 3 x 3, 33 x 33, 3 x 3
SINGD_CASES = {"singd-dense": ("dense", "dense"), "singd-block": ("block4diagonal", "block5diagonal"),
               "singd-toeplitz": ("triltoeplitz", "triutoeplitz")}


def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 33), nn.Tanh(),
                         nn.Linear(33, 3))


def data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 2, 4, 4, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g)


#: MKOR (LAMB base) and MKOR-H (which hands over to LAMB within the 5 steps): factor updates at steps 0, 2, 4
MKOR_CASES = {"mkor": {}, "mkorh": dict(switch_window=1, switch_patience=1, switch_fraction=0.99)}


def make_kfac(model, case, fraction=None, **kwargs):
    """K-FAC of ``CASES[case]``; ``fraction`` None: the default ``grad_worker_fraction`` (under FSDP2
    ``1 / shard size``)."""
    from kfopt import KFAC

    method, kl_clip, inv_steps = CASES[case]
    if fraction is not None:
        kwargs["grad_worker_fraction"] = fraction
    return KFAC(model, **{"lr": 0.1, "momentum": 0.9, "damping": 1e-2, "kl_clip": kl_clip, "compute_method": method,
                          "inv_update_steps": inv_steps, **kwargs})


SINGD_FACTORS = dict(T=2, lr_cov=0.1, damping=1e-2)


class PreconditionerThenSGD:
    """``precond.step(); sgd.step()``: SINGD's preconditioner alone in front of torch's SGD."""

    def __init__(self, model):
        from kfopt.singd import SINGDPreconditioner

        self.preconditioner = SINGDPreconditioner(model, **SINGD_FACTORS)
        self.sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
        self.zero_grad = self.sgd.zero_grad

    def step(self):
        self.preconditioner.step()
        self.sgd.step()


def make_singd(model, case, **kwargs):
    from kfopt import SINGD

    if case == "singd-preconditioner":
        return PreconditionerThenSGD(model)
    return SINGD(model, **{"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2, "structures": SINGD_CASES[case],
                           **SINGD_FACTORS, **kwargs})


def make_mkor(model, case, lr=0.02, **kwargs):
    """MKOR or MKOR-H of ``MKOR_CASES[case]`` (one owner per layer and shard group)."""
    from kfopt import MKOR, MKORH

    return (MKORH if case == "mkorh" else MKOR)(model, lr=lr, inv_freq=2, **MKOR_CASES[case], **kwargs)


#: grafted K-FAC and SINGD (the direction's momentum 0.9: a buffer), MKOR and MKOR-H (switching within the
#: run to the graft's AdamW update for every parameter; ``kfopt.graft``): (case, graft)
GRAFT_CASES = {"kfac-adam": ("eigen", "adam"), "mkor-adam": ("mkor", "adam"), "mkor-sgd": ("mkor", "sgd"),
               "mkorh-adam": ("mkorh", "adam"), "singd-adam": ("singd-block", "adam")}


def make(model, case, fraction=None):
    """K-FAC (``grad_worker_fraction``: its default, or ``fraction``), MKOR or SINGD, or one of them
    grafted (``GRAFT_CASES``)."""
    if case in GRAFT_CASES:
        base, graft = GRAFT_CASES[case]
        if base in SINGD_CASES:
            return make_singd(model, base, graft=graft, lr=0.01)
        if base in CASES:
            return make_kfac(model, base, graft=graft)
        # grafted MKOR-H at lr 0.01 switches after step 4 of 5 (at 0.02 after the last): a grafted step follows
        return make_mkor(model, base, graft=graft, **({"lr": 0.01} if base == "mkorh" else {}))
    if case in CASES:
        return make_kfac(model, case, fraction)
    return make_mkor(model, case) if case in MKOR_CASES else make_singd(model, case)


def factors(opt):
    """K-FAC's (A, G) per layer; MKOR's inverse factors (JL, JR) as ``scale * F`` by name, of the layers
    this rank holds (MKOR-H: none once switched); SINGD's free parameters of (K, C), by name."""
    from kfopt import KFAC, MKOR

    pre = opt.preconditioner
    if isinstance(opt, KFAC):
        return [(layer.A.clone(), layer.G.clone()) for layer in pre._layers]
    if isinstance(opt, MKOR):
        return {name: pre.inverse_factors(name) for name in pre.held_layers}
    return [{f"{key}.{name}": t.clone() for key in "KC" for name, t in getattr(layer, key).named_tensors().items()}
            for layer in pre._layers]


def same_tensors(a, b) -> bool:
    """Whether the nested lists, tuples and dicts of tensors ``a`` and ``b`` are equal, bit for bit."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same_tensors, a, b))
    return torch.equal(a, b)


def train(model, opt, part, steps=range(STEPS), scaler=None, bad_grad=None):
    """``steps`` of the global batches; ``part``: the rows of the global batch this rank feeds (a mean loss
    over them); ``scaler``: a GradScaler steps; ``bad_grad``: ``(step, value)`` written into the first
    element of this rank's (local) gradient of the Linear ``model[3]``'s weight after that step's
    backward."""
    for step in steps:
        x, t = data(step)
        opt.zero_grad()
        loss = ((model(x[part]) - t[part]) ** 2).sum(1).mean()
        (loss if scaler is None else scaler.scale(loss)).backward()
        if bad_grad is not None and step == bad_grad[0]:
            grad = model[3].weight.grad
            (grad.to_local() if hasattr(grad, "to_local") else grad).view(-1)[0] = bad_grad[1]
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        if hasattr(opt, "observe"):  # MKOR-H: each step's loss (averaged over the ranks)
            opt.observe(loss.detach())


def single_process(case, **kwargs):
    """The reference: one process on the global batch (the caller sets the torch backend)."""
    model = build_model()
    opt = make(model, case)
    train(model, opt, slice(None), **kwargs)
    return [p.detach().clone() for p in model.parameters()], factors(opt), getattr(opt, "switched_at", None)


def sharded_model(mesh):
    """``build_model()`` with ``fully_shard`` on each Linear/Conv2d and the root."""
    from torch.distributed.fsdp import fully_shard

    model = build_model()
    for layer in model:
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def rows(dp_rank, dp_size):
    per = GLOBAL_BATCH // dp_size
    return slice(dp_rank * per, (dp_rank + 1) * per)


def sharded_run(mesh, dp_rank, dp_size, case, backend="torch", fraction=None):
    os.environ.pop("KFOPT_BACKEND", None)
    if backend == "torch":
        os.environ["KFOPT_BACKEND"] = "torch"

    model = sharded_model(mesh)
    opt = make(model, case, fraction)
    part = rows(dp_rank, dp_size)
    train(model, opt, part)
    pre = opt.preconditioner
    out = {"params": [p.detach().full_tensor() for p in model.parameters()], "factors": factors(opt),
           "owners": pre.distributor.owners, "switched_at": getattr(opt, "switched_at", None)}
    if case in CASES:  # K-FAC: the second-order data of the layers this rank holds
        out["held"] = [layer.second is not None for layer in pre._layers]
    elif case == "mkor":  # the layers this rank preconditioned at the last step: those it owns
        out["preconditioned"] = len(pre.last_ratios)
    if case == "singd-block" and dp_size == 2:  # a NaN in one rank's shard: the step skipped on every rank
        from kfopt.sharding import local

        before = [p.detach().full_tensor() for p in model.parameters()]
        x, t = data(STEPS)
        opt.zero_grad()
        ((model(x[part]) - t[part]) ** 2).sum(1).mean().backward()
        if dp_rank == 1:  # rank 1 holds rows 17..32 of 33; block-diagonal K and C keep the NaN in them
            local(model[3].weight.grad)[-1, 0] = float("nan")
        opt.step()
        out["nan"] = {"unchanged": all(torch.equal(p.detach().full_tensor(), b)
                                       for p, b in zip(model.parameters(), before)),
                      "skipped": int(opt.skipped_steps)}
    if case in GRAFT_CASES:  # the graft's state is laid out like the parameters
        out["state like params"] = all(
            t.placements == p.placements and t.shape == p.shape for p in model.parameters()
            for key, t in opt.state[p].items() if key.startswith("graft_") and key != "graft_step")
        out["state keys"] = sorted({key for p in model.parameters() for key in opt.state[p] if key.startswith("graft_")})
    if case in GRAFT_CASES and dp_size == 2:  # a NaN in rank 1's shard: every rank skips, factors kept
        before = ([p.detach().full_tensor() for p in model.parameters()], factors(opt))
        x, t = data(STEPS)
        opt.zero_grad()
        ((model(x[part]) - t[part]) ** 2).sum(1).mean().backward()
        if dp_rank == 1:
            model[3].weight.grad.to_local()[0, 0] = float("nan")
        opt.step()
        after = ([p.detach().full_tensor() for p in model.parameters()], factors(opt))
        kept = same_tensors(after[1], before[1])
        out["nan"] = {"unchanged": all(map(torch.equal, after[0], before[0])), "factors kept": kept,
                      "skipped": int(opt.skipped_steps), "blown up": int(opt.blown_up_steps)}
    return out


def mkor_nan_in_one_shard(mesh, rank):
    """One factor-update step of MKOR whose gradient is NaN in rank 0's shard of layer 3 only: every rank
    skips it (the finite verdict is reduced over the shard group): parameters, factors and event counts
    unchanged."""
    from torch.distributed.fsdp import fully_shard

    from kfopt import MKOR

    model = build_model()
    for layer in model:
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = MKOR(model, lr=0.1, inv_freq=1)
    x, t = data(0)
    per = GLOBAL_BATCH // mesh.size()
    ((model(x[rank * per:(rank + 1) * per]) - t[rank * per:(rank + 1) * per]) ** 2).sum(1).mean().backward()
    if rank == 0:
        model[3].weight.grad.to_local()[0, 0] = float("nan")
    opt.step()
    return {"params": [p.detach().full_tensor() for p in model.parameters()],
            "factors": factors(opt), "events": opt.factor_events.clone(),
            "skipped": int(opt.skipped_steps)}


#: the step whose gradient has a non-finite element on one rank (an inverse update in the eigen case)
BAD_STEP = 2


def snapshot(model, opt):
    pre = opt.preconditioner
    return {"params": [p.detach().full_tensor().clone() for p in model.parameters()],
            "factors": [t.clone() for layer in pre._layers for t in (layer.A, layer.G)],
            "second": [None if layer.second is None else [t.clone() for t in layer.second] for layer in pre._layers],
            "skipped": int(opt.skipped_steps), "steps": pre.steps}


def non_finite_runs(mesh, shard_rank, dp_rank, dp_size):
    """Eigen K-FAC with an inf (under a GradScaler) or a NaN (base LAMB) in shard rank 1's gradient
    shard of ``model[3].weight`` at ``BAD_STEP`` (on every replica: HSDP's replicas hold the same
    gradients): snapshots before and after that step and after the last, and the scaler's scales."""
    os.environ["KFOPT_BACKEND"] = "torch"
    out = {}
    for kind in ("scaler", "lamb"):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4) if kind == "scaler" else None
        model = sharded_model(mesh)
        opt = make_kfac(model, "eigen", grad_scaler=scaler) if scaler else make_kfac(model, "eigen", base="lamb")
        part = rows(dp_rank, dp_size)
        train(model, opt, part, range(BAD_STEP), scaler)
        before, scale = snapshot(model, opt), scaler.get_scale() if scaler else None
        bad = (BAD_STEP, float("inf") if scaler else float("nan")) if shard_rank == 1 else None
        train(model, opt, part, range(BAD_STEP, BAD_STEP + 1), scaler, bad)
        after = snapshot(model, opt)
        train(model, opt, part, range(BAD_STEP + 1, STEPS), scaler)
        out[kind] = (before, after, snapshot(model, opt), (scale, scaler.get_scale()) if scaler else None)
    return out


def mkor_snapshot(model, opt):
    return {"params": [p.detach().full_tensor().clone() for p in model.parameters()], "factors": factors(opt),
            "events": opt.factor_events.clone(), "skipped": int(opt.skipped_steps), "steps": opt.preconditioner.steps}


def mkor_scaler_run(mesh, rank):
    """MKOR under a GradScaler with an inf in rank 1's gradient shard of ``model[3].weight`` at
    ``BAD_STEP`` (a factor-update step): snapshots before and after that step and after the last, and the
    scaler's scales."""
    os.environ["KFOPT_BACKEND"] = "torch"
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    model = sharded_model(mesh)
    opt = make_mkor(model, "mkor", grad_scaler=scaler)
    part = rows(rank, mesh.size())
    train(model, opt, part, range(BAD_STEP), scaler)
    before, scale = mkor_snapshot(model, opt), scaler.get_scale()
    train(model, opt, part, range(BAD_STEP, BAD_STEP + 1), scaler, (BAD_STEP, float("inf")) if rank == 1 else None)
    after = mkor_snapshot(model, opt)
    train(model, opt, part, range(BAD_STEP + 1, STEPS), scaler)
    return before, after, mkor_snapshot(model, opt), (scale, scaler.get_scale())


#: steps before the checkpoint: the eigen case's next inverse update is at step 4, so step 3 preconditions
#: with the second-order data the checkpoint carried (MKOR's factors likewise; MKOR-H switches at step 4,
#: after the load)
SAVE_AFTER = 3


def save_checkpoint(model, opt, directory):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    dcp.save({"model": get_model_state_dict(model), "optim": opt.distributed_state_dict()}, checkpoint_id=directory)


def load_checkpoint(model, opt, directory):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model), "optim": opt.distributed_state_dict()}
    dcp.load(state, checkpoint_id=directory)
    set_model_state_dict(model, state["model"])
    opt.load_distributed_state_dict(state["optim"])


def resumed(mesh, dp_rank, dp_size, directory, save_to=None, case="eigen"):
    """Eigen K-FAC (or MKOR, MKOR-H: ``case``) on ``mesh`` resumed from the checkpoint in ``directory`` for
    the steps after ``SAVE_AFTER`` (saved again right after the load into ``save_to`` if given): the full
    parameters, ``state_dict()``'s RuntimeError right after the load (a layer whose data only its holders
    loaded) or None, and MKOR-H's ``switched_at``."""
    os.environ["KFOPT_BACKEND"] = "torch"
    model = sharded_model(mesh)
    opt = make(model, case)
    load_checkpoint(model, opt, directory)
    if save_to is not None:  # a distributed checkpoint can be taken right away
        save_checkpoint(model, opt, save_to)
    error = None
    try:
        opt.state_dict()
    except RuntimeError as err:
        error = str(err)
    train(model, opt, rows(dp_rank, dp_size), range(SAVE_AFTER, STEPS))
    if case in CASES:
        opt.state_dict()  # after an inverse update every rank has what its plain checkpoint needs
    return [p.detach().full_tensor() for p in model.parameters()], error, getattr(opt, "switched_at", None)


#: the grafted cases of the shard group of 4, HSDP (2, 2) and the checkpoints (all of them on 2 ranks)
GRAFTED_CHECKPOINTS = ("kfac-adam", "mkor-adam", "singd-adam")

#: SINGD's case of the checkpoint and GradScaler runs (factor updates at steps 0, 2, 4: T=2)
SINGD_CHECKPOINTED = "singd-block"


def singd_resumed(mesh, dp_rank, dp_size, directory):
    """SINGD on ``mesh`` resumed from the checkpoint the 4 ranks wrote in ``directory`` after ``SAVE_AFTER``
    steps, trained to the end: the full parameters and every rank's factors."""
    os.environ["KFOPT_BACKEND"] = "torch"
    model = sharded_model(mesh)
    opt = make_singd(model, SINGD_CHECKPOINTED)
    load_checkpoint(model, opt, directory)
    assert opt.steps == SAVE_AFTER
    train(model, opt, rows(dp_rank, dp_size), range(SAVE_AFTER, STEPS))
    return [p.detach().full_tensor() for p in model.parameters()], factors(opt)


def singd_scaler_run(mesh, rank):
    """SINGD under a GradScaler with an inf in shard rank 1's gradient shard of ``model[3].weight`` at
    ``BAD_STEP`` (a factor-update step): snapshots (parameters, factors, skips, steps) before and after that
    step and after the last, and the scaler's scales before and after it."""
    from kfopt import SINGD

    os.environ["KFOPT_BACKEND"] = "torch"
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    model = sharded_model(mesh)
    opt = SINGD(model, lr=0.1, momentum=0.9, weight_decay=1e-2, structures=SINGD_CASES[SINGD_CHECKPOINTED],
                grad_scaler=scaler, **SINGD_FACTORS)

    def snap():
        return {"params": [p.detach().full_tensor().clone() for p in model.parameters()], "factors": factors(opt),
                "skipped": int(opt.skipped_steps), "steps": opt.steps}

    train(model, opt, rows(rank, 4), range(BAD_STEP), scaler)
    before, scale = snap(), scaler.get_scale()
    train(model, opt, rows(rank, 4), range(BAD_STEP, BAD_STEP + 1), scaler,
          (BAD_STEP, float("inf")) if rank == 1 else None)
    after = snap()
    train(model, opt, rows(rank, 4), range(BAD_STEP + 1, STEPS), scaler)
    return before, after, snap(), (scale, scaler.get_scale())


def placement_errors(mesh):
    """Constructing K-FAC, SINGD and MKOR on a fully_shard model whose Linear weight is column-sharded
    (Shard(1)), on one with a plain (unsharded) Linear added, and grafted on one with a plain LayerNorm
    added: their errors, by case and class."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    from kfopt import KFAC, MKOR, SINGD

    column = build_model()
    fully_shard(column, mesh=mesh)
    column[3].weight = nn.Parameter(distribute_tensor(column[3].weight.full_tensor().detach(), mesh, [Shard(1)]))
    plain_layer, plain_norm = sharded_model(mesh), sharded_model(mesh)
    plain_layer.append(nn.Linear(3, 2))  # a preconditioned layer FSDP2 does not shard
    plain_norm.append(nn.LayerNorm(3))  # a first-order parameter: the graft's norms would span one rank
    errors = {}
    for case, net, kwargs in (("Shard(1)", column, {}), ("plain layer", plain_layer, {}),
                              ("plain norm, grafted", plain_norm, {"graft": "adam"})):
        for cls in (KFAC, SINGD, MKOR):
            try:
                cls(net, lr=0.1, **kwargs)
                errors[case, cls.__name__] = None
            except ValueError as err:
                errors[case, cls.__name__] = str(err)
    return errors


def square_layer_checkpoint(mesh):
    """A single-process SINGD checkpoint of bias-free square Linears (their dense factors have the weight's
    shape) loaded into SINGD on the same model under FSDP2: whether every factor and factor momentum
    loaded whole, and whether the momentum buffer loaded as this rank's shard."""
    from torch.distributed.fsdp import fully_shard

    from kfopt import SINGD

    os.environ["KFOPT_BACKEND"] = "torch"

    def square_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 6, bias=False), nn.Tanh(), nn.Linear(6, 6, bias=False))

    plain = square_model()
    opt = SINGD(plain, lr=0.1, momentum=0.9, T=1)
    plain(torch.randn(4, 6, generator=torch.Generator().manual_seed(0))).square().sum().backward()
    opt.step()
    saved = opt.state_dict()
    model = square_model()
    for layer in model[::2]:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = SINGD(model, lr=0.1, momentum=0.9, T=1)
    sharded.load_state_dict(saved)
    out = {}
    for i, p in enumerate(model.parameters()):
        for key, value in sharded.state[p].items():
            want = saved["state"][i][key]
            out[f"{i} {key}"] = (torch.equal(value.full_tensor(), want) if key == "momentum_buffer" and
                                 hasattr(value, "full_tensor") else torch.equal(value, want))
    return out


def ranks_program(rank, world, directory):
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from kfopt import SINGD

    out = {}
    if world == 2:
        mesh = init_device_mesh("cpu", (2,))
        # the explicit fraction 1/2 (FSDP2's) and the default
        out = {f"w2 {case}": sharded_run(mesh, rank, 2, case, "triton" if case in ("mkor", "mkor-adam") else "torch",
                                         fraction=0.5 if case == "eigen" else None)
               for case in [*CASES, *MKOR_CASES, *SINGD_CASES, "singd-preconditioner", *GRAFT_CASES]}
        out["w4->w2"] = resumed(mesh, rank, 2, directory)
        out["square checkpoint"] = square_layer_checkpoint(mesh)
        for case in [*MKOR_CASES, *GRAFTED_CHECKPOINTS]:
            out[f"{case} w4->w2"] = resumed(mesh, rank, 2, os.path.join(directory, case), case=case)
        out["singd w4->w2"] = singd_resumed(mesh, rank, 2, os.path.join(directory, "singd"))
        out["fraction"] = None
        try:
            make_kfac(build_model_sharded(mesh), "eigen", 1.0)
        except ValueError as err:
            out["fraction"] = str(err)
        for name, build in (("base part", lambda model: make_kfac(model, "eigen")),
                            ("mkorh base part", lambda model: make_mkor(model, "mkorh"))):
            model = build_model_sharded(mesh)
            opt = build(model)
            out[name] = None
            try:  # the base's part alone would resume without the preconditioner
                part = get_optimizer_state_dict(model, opt) if name == "base part" else \
                    opt.distributed_state_dict()["optimizer"]
                set_optimizer_state_dict(model, opt, part)
            except ValueError as err:
                out[name] = str(err)
        out["mkorh get"] = None
        try:  # MKOR's plain state_dict(), which it calls, needs every layer's factors on this rank
            get_optimizer_state_dict(model, opt)
        except RuntimeError as err:
            out["mkorh get"] = str(err)
        model = build_model_sharded(mesh)
        opt = make_singd(model, SINGD_CHECKPOINTED)
        out["singd base part"] = None
        try:  # nor SINGD without its steps and counts (every parameter's state: the distributed one's part)
            set_optimizer_state_dict(model, opt, opt.distributed_state_dict()["optimizer"])
        except ValueError as err:
            out["singd base part"] = str(err)
        return out
    mesh4 = init_device_mesh("cpu", (4,))
    mesh22 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    mesh41 = init_device_mesh("cpu", (4, 1), mesh_dim_names=("replicate", "shard"))
    for case in [*CASES, *MKOR_CASES, *SINGD_CASES]:
        triton = case in ("eigen", "singd-toeplitz")
        out[f"w4 {case}"] = sharded_run(mesh4, rank, 4, case, "triton" if triton else "torch")
        out[f"hsdp22 {case}"] = sharded_run(mesh22, rank, 4, case)
        out[f"w1 {case}"] = sharded_run(mesh41, rank, 4, case)
    for case in GRAFTED_CHECKPOINTS:
        out[f"w4 {case}"] = sharded_run(mesh4, rank, 4, case)
        out[f"hsdp22 {case}"] = sharded_run(mesh22, rank, 4, case)
        out[f"w1 {case}"] = sharded_run(mesh41, rank, 4, case)
    out["placements"] = placement_errors(mesh4)
    out["nan mkor"] = mkor_nan_in_one_shard(mesh4, rank)
    out["non-finite w4"] = non_finite_runs(mesh4, rank, rank, 4)
    out["non-finite hsdp22"] = non_finite_runs(mesh22, mesh22.get_local_rank("shard"), rank, 4)
    model = sharded_model(mesh4)
    opt = make_kfac(model, "eigen")
    train(model, opt, rows(rank, 4), range(SAVE_AFTER))
    save_checkpoint(model, opt, directory)  # resumed here on other meshes, and on 2 ranks (world == 2)
    out["w4->hsdp22"] = resumed(mesh22, rank, 4, directory, save_to=os.path.join(directory, "hsdp22"))
    out["w4->w1"] = resumed(mesh41, rank, 4, directory)
    out["w4->hsdp22->w4"] = resumed(mesh4, rank, 4, os.path.join(directory, "hsdp22"))
    out["scaler mkor"] = mkor_scaler_run(mesh4, rank)
    for case in [*MKOR_CASES, *GRAFTED_CHECKPOINTS]:  # checkpoints resumed here and on 2 ranks
        os.environ["KFOPT_BACKEND"] = "torch"
        model = sharded_model(mesh4)
        opt = make(model, case)
        train(model, opt, rows(rank, 4), range(SAVE_AFTER))
        save_checkpoint(model, opt, os.path.join(directory, case))
        out[f"{case} w4->hsdp22"] = resumed(mesh22, rank, 4, os.path.join(directory, case), case=case)
    os.environ["KFOPT_BACKEND"] = "torch"
    model = sharded_model(mesh4)
    opt = make_singd(model, SINGD_CHECKPOINTED)
    train(model, opt, rows(rank, 4), range(SAVE_AFTER))
    save_checkpoint(model, opt, os.path.join(directory, "singd"))
    out["singd w4->hsdp22"] = singd_resumed(mesh22, rank, 4, os.path.join(directory, "singd"))
    out["singd scaler"] = singd_scaler_run(mesh4, rank)
    dist.barrier()
    return out


def build_model_sharded(mesh):
    from torch.distributed.fsdp import fully_shard

    model = build_model()
    fully_shard(model, mesh=mesh)
    return model


_RUNS = {}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The folder of the distributed checkpoint the 4 ranks write and the 2 ranks resume."""
    return str(tmp_path_factory.mktemp("kronecker-dcp"))


def runs(world, directory):
    """Every rank's results of ``ranks_program`` on ``world`` ranks (the 2 ranks after the 4: they resume
    the 4 ranks' checkpoint)."""
    if world == 2:
        runs(4, directory)
    if world not in _RUNS:
        _RUNS[world] = run_distributed(ranks_program, world, directory, timeout=300)
    return _RUNS[world]


CONFIGS = [("w4", 4), ("hsdp22", 4), ("w1", 4), ("w2", 2)]
ALL_CASES = [*CASES, *MKOR_CASES]


def relative_error(p, e):
    return float((p - e).abs().max() / e.abs().max())


def assert_params_close(params, expected, rank):
    """Every parameter of a rank's run within 1e-5 (relative, max norm) of one process's."""
    for i, (p, e) in enumerate(zip(params, expected)):
        err = relative_error(p, e)
        assert err < 1e-5, f"rank {rank}: parameter {i}: relative error {err}"


@pytest.mark.distributed
@pytest.mark.parametrize("case", ALL_CASES)
@pytest.mark.parametrize("config,world", CONFIGS)
def test_sharded_kronecker_equals_one_process(config, world, case, monkeypatch, checkpoints):
    monkeypatch.setenv("KFOPT_BACKEND", "torch")
    expected, expected_factors, switched_at = single_process(case)
    ranks = runs(world, checkpoints)
    if case == "mkorh":
        assert switched_at is not None and 0 < switched_at < STEPS  # the hand-over happens within the run
    for rank, out in enumerate(ranks):
        run = out[f"{config} {case}"]
        assert_params_close(run["params"], expected, rank)
        assert not torch.equal(run["params"][0], build_model()[0].weight.detach())  # it trained
        assert run["switched_at"] == switched_at
        shard = {"w4": 4, "hsdp22": 2, "w1": 1, "w2": 2}[config]
        me = rank % shard if config != "hsdp22" else rank % 2
        if case in MKOR_CASES:  # each layer's factors on its owners alone (none once MKOR-H has switched)
            assert list(run["factors"]) == [name for name, owner in zip(expected_factors, run["owners"])
                                            if owner == me], f"rank {rank}"
            for name, (jl, jr) in run["factors"].items():
                ea, eg = expected_factors[name]
                assert max(relative_error(jl, ea), relative_error(jr, eg)) < 1e-5, f"rank {rank}: layer {name}"
                for other in ranks:  # HSDP: the other replicate group's owner holds the same bits
                    if name in other[f"{config} {case}"]["factors"]:
                        assert all(map(torch.equal, (jl, jr), other[f"{config} {case}"]["factors"][name]))
        else:
            assert len(run["factors"]) == len(expected_factors)
            for (a, g), (a0, g0), (ea, eg) in zip(run["factors"], ranks[0][f"{config} {case}"]["factors"],
                                                  expected_factors):
                assert torch.equal(a, a0) and torch.equal(g, g0), f"rank {rank}: factors differ from rank 0's"
                assert max(relative_error(a, ea), relative_error(g, eg)) < 1e-5, f"rank {rank}: factors"
        if "held" in run:  # K-FAC: the second-order data lives on the owners alone
            assert run["held"] == [owner == me for owner in run["owners"]]
        if "preconditioned" in run:  # MKOR: each owner preconditions its own layers
            assert run["preconditioned"] == sum(owner == me for owner in run["owners"])


@pytest.mark.distributed
def test_sharded_mkor_skips_a_nan_in_one_shard_on_every_rank(checkpoints):
    initial = [p.detach() for p in build_model().parameters()]
    for rank, out in enumerate(runs(4, checkpoints)):
        run = out["nan mkor"]
        assert run["skipped"] == 1, f"rank {rank}"
        for p, p0 in zip(run["params"], initial):
            assert torch.equal(p, p0), f"rank {rank}: a parameter changed"
        for jl, jr in run["factors"].values():
            assert torch.equal(jl, torch.eye(len(jl))) and torch.equal(jr, torch.eye(len(jr))), f"rank {rank}"
        assert not run["events"].any(), f"rank {rank}: {run['events']}"
    assert sum(len(out["nan mkor"]["factors"]) for out in runs(4, checkpoints)) == 3  # one owner per layer


def one_process_with_an_inf(build):
    """The reference of the GradScaler skip tests: one process on the global batch, the optimizer
    ``build(model, scaler)`` under a GradScaler, an inf in ``model[3]``'s weight gradient at ``BAD_STEP``."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    model = build_model()
    train(model, build(model, scaler), slice(None), scaler=scaler, bad_grad=(BAD_STEP, float("inf")))
    return model


@pytest.mark.distributed
def test_sharded_mkor_under_a_grad_scaler_skips_an_inf_in_one_shard_on_every_rank(monkeypatch, checkpoints):
    """The inf is in rank 1's shard alone, on a factor-update step: every rank skips it (parameters, the
    owners' factors and event counts, steps unchanged), the scale halves, and the run goes on as one
    process's with the same skip."""
    monkeypatch.setenv("KFOPT_BACKEND", "torch")
    model = one_process_with_an_inf(lambda m, scaler: make_mkor(m, "mkor", grad_scaler=scaler))
    ranks = runs(4, checkpoints)
    assert sum(len(out["scaler mkor"][0]["factors"]) for out in ranks) == 3  # each layer's on its owner
    for rank, out in enumerate(ranks):
        before, after, end, scales = out["scaler mkor"]
        assert (before["skipped"], after["skipped"], end["skipped"]) == (0, 1, 1), f"rank {rank}"
        assert after["steps"] == before["steps"] == BAD_STEP and scales == (16.0, 8.0), f"rank {rank}"
        assert all(torch.equal(p, q) for p, q in zip(before["params"], after["params"])), f"rank {rank}"
        assert before["factors"].keys() == after["factors"].keys() and torch.equal(before["events"], after["events"])
        assert all(torch.equal(f, g) for name in before["factors"]
                   for f, g in zip(before["factors"][name], after["factors"][name])), f"rank {rank}"
        assert not all(torch.equal(f, g) for name in end["factors"]  # the factors go on updating after it
                       for f, g in zip(end["factors"][name], after["factors"][name])) or not end["factors"]
        assert_params_close(end["params"], [e.detach() for e in model.parameters()], rank)


_SINGLE = {}


def cached_single_process(case):
    """``single_process(case)``, computed once per test session (several SINGD tests compare with it)."""
    if case not in _SINGLE:
        _SINGLE[case] = single_process(case)
    return _SINGLE[case]


def assert_singd_factors(run_factors, first_factors, expected_factors, rank):
    """A rank's SINGD factors (free parameters per layer): bit-identical to rank 0's, the shapes of one
    process's and within 1e-5 of them."""
    for layer, (mine, first, single) in enumerate(zip(run_factors, first_factors, expected_factors)):
        assert mine.keys() == single.keys()
        for key, t in mine.items():
            assert torch.equal(t, first[key]), f"rank {rank}: layer {layer} {key} differs from rank 0's"
            assert t.shape == single[key].shape
            if t.numel():  # a block-diagonal factor with no full block (C of side 3, blocks of 5)
                err = relative_error(t, single[key])
                assert err < 1e-5, f"rank {rank}: layer {layer} {key}: relative error {err}"


@pytest.mark.distributed
@pytest.mark.parametrize("config,world,case", [(config, world, case) for config, world in CONFIGS
                                               for case in SINGD_CASES] + [("w2", 2, "singd-preconditioner")])
def test_sharded_singd_equals_one_process(config, world, case, monkeypatch, checkpoints):
    """Parameters within 1e-5 of one process's, factors (free parameters, the structure's own shapes)
    bit-identical on every rank and within 1e-5 of one process's; ``singd-preconditioner``: dense SINGD's
    preconditioner alone in front of torch's SGD."""
    monkeypatch.setenv("KFOPT_BACKEND", "torch")
    params, expected_factors, _ = cached_single_process(case)
    ranks = runs(world, checkpoints)
    for rank, out in enumerate(ranks):
        run = out[f"{config} {case}"]
        assert_params_close(run["params"], params, rank)
        assert not torch.equal(run["params"][0], build_model()[0].weight.detach())  # it trained
        assert_singd_factors(run["factors"], ranks[0][f"{config} {case}"]["factors"], expected_factors, rank)
        if case == "singd-toeplitz":  # O(d): one coefficient per diagonal
            assert [t.shape for f in run["factors"] for t in f.values()] == [(19,), (3,), (49,), (33,), (34,), (3,)]
        if config == "w2" and case == "singd-block":
            assert run["nan"] == {"unchanged": True, "skipped": 1}, f"rank {rank}: {run['nan']}"


@pytest.mark.distributed
def test_placements_and_fraction_errors(checkpoints):
    for out in runs(4, checkpoints):
        errors = out["placements"]  # K-FAC's, SINGD's and MKOR's
        assert len(errors) == 9
        for (case, cls), error in errors.items():
            # SINGD checks its parameters' sharding before its capture does (its base, HeavyBall, agrees
            # verdicts over the shard group: kfopt.composed), MKOR's preconditioner before its capture
            expected = {"Shard(1)": ("3.weight", "Shard(dim=1)") if cls == "SINGD" else ("layer '3'", "Shard(dim=1)"),
                        "plain layer": ("layer '6' is not sharded",) if cls == "KFAC" else ("6.bias is not sharded like",),
                        "plain norm, grafted": ("6.bias is not sharded like", "mix sharded and unsharded")}[case]
            assert error is not None and all(e in error for e in expected), (case, cls, error)
    for out in runs(2, checkpoints):
        assert out["fraction"] is not None and "grad_worker_fraction" in out["fraction"]
        for name in ("base part", "mkorh base part", "mkorh get", "singd base part"):
            assert out[name] is not None and "distributed_state_dict()" in out[name], (name, out[name])


@pytest.mark.distributed
@pytest.mark.parametrize("config", ["w4", "hsdp22"])
def test_a_non_finite_gradient_shard_skips_the_step_on_every_rank(config, monkeypatch, checkpoints):
    """Only shard rank 1 has the bad value; every rank skips: under a GradScaler nothing changes but the
    skip count and the scale (factors, second-order data and steps too, on an inverse-update step), and
    the run goes on as one process's with the same skip; with base LAMB the weights stay."""
    monkeypatch.setenv("KFOPT_BACKEND", "torch")
    model = one_process_with_an_inf(lambda m, scaler: make_kfac(m, "eigen", grad_scaler=scaler))
    ranks = runs(4, checkpoints)
    for rank, out in enumerate(ranks):
        for kind in ("scaler", "lamb"):
            before, after, end, scales = out[f"non-finite {config}"][kind]
            assert (before["skipped"], after["skipped"], end["skipped"]) == (0, 1, 1), (rank, kind)
            assert all(torch.equal(p, q) for p, q in zip(before["params"], after["params"])), (rank, kind)
            assert not any(torch.equal(p, q) for p, q in zip(after["params"], end["params"])), (rank, kind)
            for p, q in zip(end["params"], ranks[0][f"non-finite {config}"][kind][2]["params"]):
                assert torch.equal(p, q), (rank, kind)
        before, after, end, scales = out[f"non-finite {config}"]["scaler"]
        assert after["steps"] == before["steps"] == BAD_STEP and scales == (16.0, 8.0)
        assert all(torch.equal(f, g) for f, g in zip(before["factors"], after["factors"]))
        assert [s is None for s in before["second"]] == [s is None for s in after["second"]]
        assert all(torch.equal(t, u) for s, r in zip(before["second"], after["second"]) if s for t, u in zip(s, r))
        assert_params_close(end["params"], [e.detach() for e in model.parameters()], rank)


@pytest.mark.distributed
@pytest.mark.parametrize("label,world", [("w4->hsdp22", 4), ("w4->w1", 4), ("w4->w2", 2), ("w4->hsdp22->w4", 4),
                                         *[(f"{case} w4->{to}", world) for case in [*MKOR_CASES, *GRAFTED_CHECKPOINTS]
                                           for to, world in (("hsdp22", 4), ("w2", 2))]])
def test_distributed_checkpoints_resume_on_other_shard_groups(label, world, monkeypatch, checkpoints):
    """A checkpoint written by 4 ranks (shard group 4) resumed by shard groups of 2 (HSDP (2, 2), and 2
    processes) and 1 ((4, 1)), and the HSDP run's checkpoint (saved right after its load: replicas hold
    the same data) resumed by 4 ranks: each owner loads its layers' second-order data (eigen K-FAC;
    MKOR's and MKOR-H's inverse factors, and MKOR-H's switch criterion, which switches after the load;
    grafted K-FAC, MKOR and SINGD with the graft's moments and momentum buffers, DTensors resharded on
    load), and the run ends as one process's uninterrupted run."""
    monkeypatch.setenv("KFOPT_BACKEND", "torch")
    case = label.split()[0] if " " in label else "eigen"
    expected, _, switched_at = single_process(case)
    for rank, out in enumerate(runs(world, checkpoints)):
        params, error, resumed_switched_at = out[label]
        assert resumed_switched_at == switched_at, f"rank {rank}"
        assert_params_close(params, expected, rank)
        if label == "w4->w1" or case.startswith("singd"):  # every rank holds every layer (SINGD: its factors)
            assert error is None
        else:
            assert error is not None and "distributed_state_dict()" in error


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_distributed_checkpoint_of_an_optimizer_without_per_parameter_state(tmp_path, monkeypatch):
    """One process, SGD without momentum (no per-parameter state): DCP's state-creating zero step leaves
    K-FAC alone (steps, factors, weights), and the checkpoint resumes the run bit for bit."""
    import torch.distributed.checkpoint as dcp

    monkeypatch.setenv("KFOPT_BACKEND", "torch")
    model = build_model()
    opt = make_kfac(model, "eigen", momentum=0.0)
    train(model, opt, slice(None), range(SAVE_AFTER))
    weights = [p.detach().clone() for p in model.parameters()]
    factors = [f.clone() for f in opt.preconditioner.factors("3")]
    opt.zero_grad()  # no gradients and no state: DCP steps with zero gradients
    state = opt.distributed_state_dict()
    assert opt.preconditioner.steps == SAVE_AFTER and not opt.state
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), weights))
    assert all(torch.equal(f, g) for f, g in zip(opt.preconditioner.factors("3"), factors))
    dcp.save(state, checkpoint_id=str(tmp_path))
    train(model, opt, slice(None), range(SAVE_AFTER, STEPS))

    resumed_model = build_model()
    resumed_model.load_state_dict(dict(zip([n for n, _ in build_model().named_parameters()], weights)))
    resumed_opt = make_kfac(resumed_model, "eigen", momentum=0.0)
    state = resumed_opt.distributed_state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path))
    for key, bad, match in (("compute_method", "inverse", "compute_method"),
                            ("decomposed", {"0": {}}, "'second_order' and 'decomposed'")):
        with pytest.raises(ValueError, match=match):  # checked before anything changes
            resumed_opt.load_distributed_state_dict({**state, "kfac": {**state["kfac"], key: bad}})
        assert resumed_opt.preconditioner.steps == 0
    resumed_opt.load_distributed_state_dict(state)
    assert resumed_opt.preconditioner.steps == SAVE_AFTER
    train(resumed_model, resumed_opt, slice(None), range(SAVE_AFTER, STEPS))
    assert all(torch.equal(p, q) for p, q in zip(resumed_model.parameters(), model.parameters()))


@pytest.mark.distributed
@pytest.mark.parametrize("config,case", [*[(config, case) for config in ("w4", "hsdp22", "w1", "w2")
                                           for case in GRAFTED_CHECKPOINTS],
                                         ("w2", "mkor-sgd"), ("w2", "mkorh-adam")])
def test_sharded_grafting_equals_one_process(config, case, monkeypatch, checkpoints):
    """Grafted K-FAC, MKOR, MKOR-H and SINGD on shard groups of 4, 2 (HSDP (2, 2)), 1 (a (4, 1) mesh) and 2
    (``w2``, MKOR's graft kernel through Triton): the parameters after 5 steps within 1e-5 of one process's
    (the graft's norms are the whole tensors'), MKOR-H switching at the same step, the graft's state
    (moments, K-FAC's momentum buffers) DTensors placed like the parameters; ``w2``: a NaN in rank 1's
    gradient shard then skips the step on every rank, parameters and factors unchanged, one skip and no
    blow-up counted everywhere."""
    monkeypatch.setenv("KFOPT_BACKEND", "torch")
    expected, _, switched_at = single_process(case)
    if case == "mkorh-adam":
        assert switched_at is not None and 0 < switched_at < STEPS  # the hand-over happens within the run
    ranks = runs(4 if config != "w2" else 2, checkpoints)
    for rank, out in enumerate(ranks):
        run = out[f"{config} {case}"]
        assert_params_close(run["params"], expected, rank)
        assert run["switched_at"] == switched_at, f"rank {rank}"
        assert not torch.equal(run["params"][0], build_model()[0].weight.detach())  # it trained
        assert run["state like params"], f"rank {rank}"
        assert run["state keys"] == sorted(["graft_exp_avg", "graft_exp_avg_sq", "graft_step"] + (
            ["graft_momentum_buffer"] if case.startswith(("kfac", "singd")) else [])), f"rank {rank}"
        if config == "w2":
            assert run["nan"] == {"unchanged": True, "factors kept": True, "skipped": 1, "blown up": 0}, \
                f"rank {rank}: {run['nan']}"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("case", GRAFTED_CHECKPOINTS)
def test_grafted_distributed_checkpoint_in_one_process(case, tmp_path, monkeypatch):
    """One process: taking a grafted optimizer's DCP checkpoint changes nothing (no zero step: weights,
    graft moments and steps as they were), a fresh optimizer's template creates the graft state as zeros
    without a step, and the checkpoint resumes the run bit for bit."""
    import torch.distributed.checkpoint as dcp

    monkeypatch.setenv("KFOPT_BACKEND", "torch")
    model = build_model()
    opt = make(model, case)
    train(model, opt, slice(None), range(SAVE_AFTER))
    weights = [p.detach().clone() for p in model.parameters()]
    graft = {(i, k): t.clone() for i, p in enumerate(model.parameters()) for k, t in opt.state[p].items()}
    opt.zero_grad()
    dcp.save(opt.distributed_state_dict(), checkpoint_id=str(tmp_path))
    assert all(map(torch.equal, model.parameters(), weights)) and opt.preconditioner.steps == SAVE_AFTER
    assert {(i, k): t for i, p in enumerate(model.parameters()) for k, t in opt.state[p].items()}.keys() == graft.keys()
    assert all(torch.equal(opt.state[list(model.parameters())[i]][k], t) for (i, k), t in graft.items())
    train(model, opt, slice(None), range(SAVE_AFTER, STEPS))

    resumed_model = build_model()
    with torch.no_grad():
        for p, w in zip(resumed_model.parameters(), weights):
            p.copy_(w)
    resumed_opt = make(resumed_model, case)
    state = resumed_opt.distributed_state_dict()
    assert resumed_opt.preconditioner.steps == 0 and all(map(torch.equal, resumed_model.parameters(), weights))
    fresh = {(i, k): t for i, p in enumerate(resumed_model.parameters()) for k, t in resumed_opt.state[p].items()
             if k.startswith("graft_")}  # (SINGD's factors, in its weights' state, start as identities)
    assert fresh.keys() == {key for key in graft if key[1].startswith("graft_")} and not any(
        t.any() for t in fresh.values())
    dcp.load(state, checkpoint_id=str(tmp_path))
    resumed_opt.load_distributed_state_dict(state)
    assert resumed_opt.preconditioner.steps == SAVE_AFTER
    train(resumed_model, resumed_opt, slice(None), range(SAVE_AFTER, STEPS))
    assert all(torch.equal(p, q) for p, q in zip(resumed_model.parameters(), model.parameters()))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("save_after", [SAVE_AFTER, STEPS])
def test_mkorh_distributed_checkpoint_in_one_process(save_after, tmp_path, monkeypatch):
    """One process: MKOR-H's DCP checkpoint taken before its switch (at step 4) or after it (loaded into
    an MKORH switched by hand) resumes the run bit for bit, switching at the same step; a bad entry
    raises ValueError naming it before anything changes."""
    import torch.distributed.checkpoint as dcp

    monkeypatch.setenv("KFOPT_BACKEND", "torch")
    model = build_model()
    opt = make_mkor(model, "mkorh")
    train(model, opt, slice(None), range(save_after))
    assert opt.switched == (save_after == STEPS)
    weights = [p.detach().clone() for p in model.parameters()]
    dcp.save(opt.distributed_state_dict(), checkpoint_id=str(tmp_path))
    train(model, opt, slice(None), range(save_after, STEPS + 2))

    resumed_model = build_model()
    with torch.no_grad():
        for p, w in zip(resumed_model.parameters(), weights):
            p.copy_(w)
    resumed_opt = make_mkor(resumed_model, "mkorh")
    if opt.switched_at < save_after:
        resumed_opt.switch()
    state = resumed_opt.distributed_state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path))
    with pytest.raises(ValueError, match="window_count"):
        resumed_opt.load_distributed_state_dict({**state, "mkor": {**state["mkor"], "window_count": 1.5}})
    assert resumed_opt.preconditioner.steps == 0 and resumed_opt.window_means == []
    resumed_opt.load_distributed_state_dict(state)
    assert resumed_opt.preconditioner.steps == save_after
    train(resumed_model, resumed_opt, slice(None), range(save_after, STEPS + 2))
    assert resumed_opt.switched_at == opt.switched_at == 4
    assert all(torch.equal(p, q) for p, q in zip(resumed_model.parameters(), model.parameters()))


def test_the_mkor_vector_volume_of_the_docs():
    """docs/sharding.md's count of MKOR's all-reduced ``a`` and ``g`` values for a BERT-base block (four
    768 x 768 projections and the 768 -> 3072 -> 768 feed-forward, with biases) is MKOR's buffers'."""
    import re
    from pathlib import Path

    from kfopt.mkor import MKORPreconditioner

    page = (Path(__file__).resolve().parent.parent / "docs" / "sharding.md").read_text()
    (count,) = re.findall(r"the `a` and `g` vectors are ([\d,]+)\s+fp32 values \((\d+) KiB", page)
    block = nn.Sequential(*[nn.Linear(768, 768) for _ in range(4)], nn.Linear(768, 3072), nn.Linear(3072, 768))
    pre = MKORPreconditioner(block)
    values = pre._a_numerators().numel() + pre._g_numerators().numel()
    assert (f"{values:,}", str(round(values * 4 / 1024))) == count


@pytest.mark.distributed
@pytest.mark.parametrize("label,world", [("singd w4->hsdp22", 4), ("singd w4->w2", 2)])
def test_singd_distributed_checkpoints_resume_on_other_shard_groups(label, world, monkeypatch, checkpoints):
    """SINGD's checkpoint written by 4 ranks after ``SAVE_AFTER`` steps (momentum buffers as DTensors,
    factors as plain tensors), resumed by HSDP (2, 2) and by 2 processes: the run ends as one process's
    uninterrupted run, every rank with the same factors."""
    monkeypatch.setenv("KFOPT_BACKEND", "torch")
    expected, expected_factors, _ = cached_single_process(SINGD_CHECKPOINTED)
    ranks = runs(world, checkpoints)
    for rank, out in enumerate(ranks):
        params, run_factors = out[label]
        assert_params_close(params, expected, rank)
        assert_singd_factors(run_factors, ranks[0][label][1], expected_factors, rank)


@pytest.mark.distributed
def test_a_plain_singd_checkpoint_of_square_layers_loads_into_sharded_singd(checkpoints):
    """The dense factors of a bias-free square Linear have its weight's shape but are replicated: loading
    cuts the momentum buffer into the rank's shard and leaves the factors whole."""
    for rank, out in enumerate(runs(2, checkpoints)):
        loaded = out["square checkpoint"]
        assert any(key.endswith("momentum_buffer") for key in loaded) and any("K." in key for key in loaded)
        assert all(loaded.values()), f"rank {rank}: {loaded}"


@pytest.mark.distributed
def test_singd_grad_scaler_skips_an_inf_in_one_shard_on_every_rank(checkpoints):
    """An inf in shard rank 1's gradient only: torch's unscaling finds it on every rank (``found_inf``
    reduced over the mesh), every rank skips SINGD's factor-update step (parameters and factors unchanged,
    one skip, the scale halved), and the ranks go on in step."""
    ranks = runs(4, checkpoints)
    for rank, out in enumerate(ranks):
        before, after, end, scales = out["singd scaler"]
        assert (before["skipped"], after["skipped"], end["skipped"]) == (0, 1, 1), rank
        # steps counts the skipped step too (SINGD's GradScaler skip): the T schedule keeps its phase
        assert scales == (16.0, 8.0) and (before["steps"], after["steps"]) == (BAD_STEP, BAD_STEP + 1), rank
        assert all(torch.equal(p, q) for p, q in zip(before["params"], after["params"])), rank
        for f, g in zip(before["factors"], after["factors"]):
            assert all(torch.equal(f[key], g[key]) for key in f), rank
        assert not any(torch.equal(p, q) for p, q in zip(after["params"], end["params"])), rank
        for p, q in zip(end["params"], ranks[0]["singd scaler"][2]["params"]):
            assert torch.equal(p, q), rank
