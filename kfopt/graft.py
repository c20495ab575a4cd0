r"""Grafting for the Kronecker-factored optimizers (K-FAC, MKOR/MKOR-H, SINGD): ``graft="adam"``.

The preconditioner chooses each tensor's direction, a first-order method its step length (Distributed
Shampoo's grafting; SONew does the same with its own statistics). With ``graft`` "adam" (or "rmsprop",
"sgd") the optimizer's own update is replaced by, per parameter tensor (``kfopt.kernels.graft``)::

    m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2        (g: the raw gradient; (b1, b2) = graft_betas)
    a  = m^ / (sqrt(v^) + graft_eps)                            (the AdamW direction; "rmsprop":
                                                                 g / (sqrt(v^) + graft_eps), "sgd": g)
    buf <- mu buf + P,  q = buf  (mu = the method's momentum, when nonzero)   or   q = P
    d  = (||a|| / ||q||) q       for the weight and bias of a preconditioned layer (P: the
                                 preconditioner applied to the new m for "adam", to g for
                                 "rmsprop" and "sgd"; d = 0 where ||q|| = 0)
    d  = a                       for every other parameter (embeddings, norms, skipped layers)
    w <- w - lr (d + weight_decay w)                            (decoupled weight decay)

so ``||d|| = ||a||``: the step of AdamW with the same ``lr``, schedule and ``weight_decay`` in length, the
preconditioner's in direction -- a user coming from AdamW keeps those settings.

"adam" preconditions the first moment ``m`` (Distributed Shampoo's "filtered gradient"), so that
direction and length come from the same average; why, and what it measured: ``docs/grafting.md``. The
rmsprop and sgd lengths are those of the raw gradient, which they precondition. The method's momentum
``mu`` then averages a second time: the recipes use ``mu = 0``. ``graft="none"`` (the default) is the
method's own update. ``graft`` is global (every param group has the constructor's value);
``graft_betas`` and ``graft_eps`` are per group (schedulable).

State per parameter (fp32 whatever the parameter dtype; checkpointed and checked on load):
``graft_exp_avg``, ``graft_exp_avg_sq`` (shape of p), ``graft_step`` (0-d) and, while the method's
momentum is nonzero, ``graft_momentum_buffer`` (shape of p; preconditioned tensors only).

Sharded parameters (FSDP2/HSDP, ``kfopt.sharding``): the state of shape p is a DTensor placed like p
(``torch.distributed.checkpoint`` saves and reshards it), ``graft_step`` a plain 0-d tensor (the same on
every rank); the kernel steps the local shards and sums the per-tensor sums of squares of ``||a||`` and
``||q||`` over the shard group (``reduce``, one all-reduce of ``2 T`` fp32 values for ``T`` tensors), so the
norms, the ratios and the skip verdict are those of the whole tensors, the same on every rank (HSDP's
replicas hold the same shards and compute the same).

A step whose update is not finite anywhere (a NaN/inf gradient, a preconditioned gradient blown up by
its factors) or whose tensor ``lr`` is NaN, negative or infinite changes no parameter or graft state and
counts in ``skipped_steps`` -- decided on the device, no host synchronisation; the optimizers then keep
their factors too (``kfopt.composed``, ``kfopt.singd``) and count a blow-up from finite gradients in
``blown_up_steps`` (``kfopt.optimizer``). ``lr`` may be a one-element tensor: the kernel reads it from its
device table.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kfopt.kernels.graft import GRAFTS as _KERNEL_GRAFTS
from kfopt.kernels import graft_step

from .sharding import local
from .validation import TensorSpec, check_betas, check_positive

#: the grafts (first-order methods whose step length the preconditioned direction takes), "none" first
GRAFTS = ("none", *_KERNEL_GRAFTS)
#: the defaults of ``graft_betas`` and ``graft_eps`` in every grafting optimizer (AdamW's)
GRAFT_BETAS, GRAFT_EPS = (0.9, 0.999), 1e-8


def graft_defaults(graft, graft_betas, graft_eps) -> dict:
    """The graft entries of an optimizer's ``defaults`` (a betas list becomes a tuple)."""
    return {"graft": graft, "graft_betas": tuple(graft_betas) if isinstance(graft_betas, list) else graft_betas,
            "graft_eps": graft_eps}


def check_graft_group(group: dict) -> None:
    """ValueError naming a bad graft hyperparameter of ``group``."""
    if not isinstance(group["graft"], str) or group["graft"] not in GRAFTS:
        raise ValueError(f"graft: expected one of {', '.join(map(repr, GRAFTS))}, got {group['graft']!r}")
    check_betas("graft_betas", group["graft_betas"])
    check_positive("graft_eps", group["graft_eps"])


def graft_state_spec(p: torch.Tensor) -> dict[str, TensorSpec]:
    """The graft's per-parameter state (all optional: a parameter gets it at its first grafted step)."""
    shape = tuple(p.shape)
    return {"graft_exp_avg": (shape, (torch.float32,), False), "graft_exp_avg_sq": (shape, (torch.float32,), False),
            "graft_step": ((), (torch.float32,), False),
            "graft_momentum_buffer": (shape, (torch.float32,), False)}


def create_graft_state(state: dict, p: torch.Tensor, buffer: bool) -> None:
    """Parameter ``p``'s missing graft state (module docstring) as zeros, which step as a missing state:
    the moments (and with ``buffer`` the momentum buffer) fp32 like ``p`` (a DTensor placed like a sharded
    ``p``, contiguous), ``graft_step`` a plain 0-d fp32 tensor."""
    keys = ("graft_exp_avg", "graft_exp_avg_sq") + (("graft_momentum_buffer",) if buffer else ())
    for key in keys:
        if key not in state:
            state[key] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
    if "graft_step" not in state:
        state["graft_step"] = torch.zeros((), dtype=torch.float32, device=p.device)


def first_moments(state, entries: list[tuple[dict, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """The new first moments ``m + (1 - b1) (g - m)`` (fp32, float64 for float64 gradients; ``m = 0``
    before a parameter's first grafted step; ``b1 = graft_betas[0]`` of its group) of ``entries``:
    ``(group, param, raw gradient)``, on the local shards of sharded parameters (``g`` a local shard).
    Not stored: the grafting kernel updates the moments when the step is taken."""
    out: list[torch.Tensor | None] = [None] * len(entries)
    by_beta: dict[float, list[int]] = {}
    for i, (group, _, _) in enumerate(entries):
        by_beta.setdefault(group["graft_betas"][0], []).append(i)
    for beta1, index in by_beta.items():
        grads = [entries[i][2].to(torch.promote_types(entries[i][2].dtype, torch.float32)) for i in index]
        moments = [state[entries[i][1]].get("graft_exp_avg") for i in index]
        moments = [torch.zeros_like(g) if m is None else local(m).to(g.dtype) for m, g in zip(moments, grads)]
        for i, m in zip(index, torch._foreach_lerp(moments, grads, 1.0 - beta1)):
            out[i] = m
    return out


def grafted_step(state, entries: list[tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor | None, float]],
                 skipped: torch.Tensor | None, found_inf: torch.Tensor | None = None,
                 reduce: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """One grafted update (module docstring) of ``entries``: ``(group, param, raw gradient, preconditioned
    gradient or None for a first-order parameter, momentum)``; ``state`` the optimizer's per-parameter
    state; ``found_inf`` the caller's own device verdict (nonzero: skip; the same on every shard). Sharded
    parameters: the kernel steps the local shards, ``reduce`` the shard group's in-place SUM all-reduce
    (``kfopt.sharding.ShardLayout.reduce``). Returns the device flag ``ok`` (0: the step was skipped and
    counted in ``skipped``)."""
    if not entries:
        return torch.ones(())
    cols = {k: [] for k in ("p", "g", "d", "m", "v", "b", "s", "lr", "b1", "b2", "eps", "wd", "mu", "graft", "pre")}
    for group, p, g, direction, momentum in entries:
        s = state[p]
        precondition = direction is not None
        create_graft_state(s, p, precondition and momentum != 0)
        buffer = local(s["graft_momentum_buffer"]) if precondition and "graft_momentum_buffer" in s else None
        for key, value in (("p", local(p)), ("g", local(g)), ("d", local(direction if precondition else g)),
                           ("m", local(s["graft_exp_avg"])), ("v", local(s["graft_exp_avg_sq"])), ("b", buffer),
                           ("s", s["graft_step"]), ("lr", group["lr"]),
                           ("b1", group["graft_betas"][0]), ("b2", group["graft_betas"][1]),
                           ("eps", group["graft_eps"]), ("wd", group["weight_decay"]),
                           ("mu", momentum if buffer is not None else 0.0), ("graft", group["graft"]),
                           ("pre", precondition)):
            cols[key].append(value)
    return graft_step(cols["p"], cols["g"], cols["d"], cols["m"], cols["v"], cols["b"], cols["s"], lr=cols["lr"],
                      beta1=cols["b1"], beta2=cols["b2"], graft_eps=cols["eps"], weight_decay=cols["wd"],
                      momentum=cols["mu"], graft=cols["graft"], precondition=cols["pre"], skipped=skipped,
                      found_inf=found_inf, reduce=reduce)
