"""LARS step for many tensors in one multi-tensor pipeline (You, Gitman, Ginsburg 2017).

Per tensor w with gradient g and momentum buffer m::

    g  <- g * coef                           coef = min(1, max_grad_norm / ||g_all||) (or 1)
    d   = g + wd w
    r   = clamp(eta ||w|| / ||d||, lo, hi)   (1 if a norm is 0, or if the tensor is not adapted)
    m  <- mu m + lr r d
    w  <- w - m                              (nesterov: w <- w - (mu m + lr r d))

Launches (no host synchronisation): gradient-norm pass + reduction (``multi_tensor``); pass 1 reads
g, w and writes per-chunk partials of ||w||^2 and ||d||^2; a per-tensor reduction forms the norms;
pass 2 reads g, w, m and writes m, w. fp32: 32 bytes per parameter (4 + 8 + 20).
A non-finite gradient skips the whole step (nothing written) and increments ``skipped``.

Precision: the norms are correctly rounded square roots (``sqrt_rn``: on sm_90 ``sqrt.rn.f32``, not
``sqrt.approx.ftz.f32``, which flushes a denormal ||w||^2 to a zero norm and so a trust ratio to 1)
and the trust ratio a correctly rounded division (``div_rn``; likewise the clip coefficient); the
elementwise update has no division or transcendental. Tensors the step writes must not share memory
(``aliasing.check_no_overlap``: a ValueError names the two entries).

:data:`LARS` declares the op (``op_declaration``): :class:`LarsHyperparameters` is the kernels'
hyperparameter table, its tensors and their checks, and :func:`lars_traffic`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import triton
import triton.language as tl

from .multi_tensor import (
    chunked_configs,
    global_norm_reference,
    program_chunk,
    tensor_norms_reference,
    trust_ratio,
    trust_ratio_reference,
)
from .norm_pipeline import launch_two_passes
from .op_declaration import Call, ElementwiseOp, Hyperparameters, TensorArg, Traffic, like_param, within


@dataclass(frozen=True)
class LarsHyperparameters(Hyperparameters):
    """One tensor's LARS hyperparameters; the fields in order are the columns of the kernels' table."""

    lr: float = field(metadata=within("[0, inf)"))
    momentum: float = field(default=0.9, metadata=within("[0, 1)"))
    weight_decay: float = field(default=0.0, metadata=within("[0, inf)"))
    eta: float = field(default=0.001, metadata=within("[0, inf)"))
    nesterov: bool = False
    adapt: bool = True
    trust_min: float = field(default=0.0, metadata=within("[0, inf)"))
    trust_max: float = field(default=math.inf, metadata=within("[0, inf]"))


def lars_traffic(shapes: Sequence[tuple], dtype: torch.dtype, grad_dtype: torch.dtype | None = None) -> Traffic:
    """One call on an fp32 buffer: g pre-read + pass 1 (g, w) + pass 2 (g, w, m read; m, w written) =
    3 s_g + 3 s_p + 8 bytes per parameter (32 fp32, 20 bf16); about 19 flops per parameter (norm 2,
    pass 1 7, pass 2 10)."""
    n = sum(math.prod(s) for s in shapes)
    s_p = torch.finfo(dtype).bits // 8
    s_g = torch.finfo(grad_dtype or dtype).bits // 8
    return Traffic(bytes=n * (3 * s_g + 3 * s_p + 8), flops=19 * n)


LARS = ElementwiseOp(
    "lars_step", LarsHyperparameters,
    (TensorArg("params", written=True, layout="dense"),
     TensorArg("grads", written=False, shape=like_param),
     TensorArg("momentum_buffers", written=True, state=True, shape=like_param, layout="param_strides")),
    lars_traffic,
)
A = LARS.addr
H = LARS.hyper

LARS_CONFIGS = chunked_configs("lars_step")


@triton.jit
def _lars_norms_kernel(
    addr_ptr, numel_ptr, chunk_tensor_ptr, chunk_start_ptr, hyper_ptr, clip_ptr, partial_ptr,
    P_DT: tl.constexpr, G_DT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    """Pass 1: partial[k] = (sum w^2, sum d^2) over chunk k, d = coef g + wd w."""
    pid, tid, start, n = program_chunk(chunk_tensor_ptr, chunk_start_ptr, numel_ptr)
    row = addr_ptr + tid * A.width
    p_ptr = tl.load(row + A.params).to(tl.pointer_type(P_DT))
    g_ptr = tl.load(row + A.grads).to(tl.pointer_type(G_DT))
    wd = tl.load(hyper_ptr + tid * H.width + H.weight_decay)
    coef = tl.load(clip_ptr + 1)
    w_sq = tl.zeros([BLOCK], tl.float32)
    d_sq = tl.zeros([BLOCK], tl.float32)
    for off in range(0, CHUNK, BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        mask = offs < n
        w = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * coef + wd * w
        w_sq += w * w
        d_sq += d * d
    tl.store(partial_ptr + pid * 2, tl.sum(w_sq, axis=0))
    tl.store(partial_ptr + pid * 2 + 1, tl.sum(d_sq, axis=0))


@triton.jit
def _lars_apply_kernel(
    addr_ptr, numel_ptr, chunk_tensor_ptr, chunk_start_ptr, hyper_ptr, clip_ptr, norms_ptr,
    P_DT: tl.constexpr, G_DT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    """Pass 2: m <- mu m + lr r d ; w <- w - m (or the Nesterov form)."""
    pid, tid, start, n = program_chunk(chunk_tensor_ptr, chunk_start_ptr, numel_ptr)
    row = addr_ptr + tid * A.width
    p_ptr = tl.load(row + A.params).to(tl.pointer_type(P_DT))
    g_ptr = tl.load(row + A.grads).to(tl.pointer_type(G_DT))
    m_ptr = tl.load(row + A.momentum_buffers).to(tl.pointer_type(tl.float32))
    h = hyper_ptr + tid * H.width
    mu = tl.load(h + H.momentum)
    wd = tl.load(h + H.weight_decay)
    nesterov = tl.load(h + H.nesterov)
    r = trust_ratio(tl.load(norms_ptr + tid * 2), tl.load(norms_ptr + tid * 2 + 1), tl.load(h + H.eta),
                    tl.load(h + H.trust_min), tl.load(h + H.trust_max), tl.load(h + H.adapt))
    step_size = tl.load(h + H.lr) * r
    coef = tl.load(clip_ptr + 1)
    n = tl.where(tl.load(clip_ptr + 2) != 0, n, 0)  # a skipped step reads and writes nothing
    for off in range(0, CHUNK, BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        mask = offs < n
        w = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * coef + wd * w
        m = mu * tl.load(m_ptr + offs, mask=mask, other=0.0) + step_size * d
        update = tl.where(nesterov != 0, mu * m + step_size * d, m)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(p_ptr + offs, (w - update).to(P_DT), mask=mask)


def lars_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    *,
    max_grad_norm: float | None = None,
    skipped: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor], None] | None = None,
    **hyperparameters,
) -> torch.Tensor:
    """One LARS step over all tensors, in place (see the module docstring for the math).

    ``hyperparameters``: the fields of :class:`LarsHyperparameters` (``lr`` required; ``momentum``,
    ``weight_decay``, ``eta``, ``nesterov``, ``adapt``, ``trust_min``, ``trust_max`` with its defaults),
    each a number or one per tensor. ``momentum_buffers`` are fp32 with the params' strides (float64
    allowed on the reference path). Returns ``[||g_all||, clip coef, ok]``. ``grad_scale``/``found_inf``:
    a GradScaler's tensors, as for :func:`kfopt.kernels.lamb_step`. ``reduce``: the tensors are this
    rank's shards (FSDP2): an in-place SUM all-reduce over the shard group of the gradient-norm partials
    and of the per-tensor ``[sum w^2, sum d^2]``, as for :func:`kfopt.kernels.lamb_step`. Argument
    checks: :data:`LARS` (``kernels.checks``).
    """
    call = LARS.bind((params, grads, momentum_buffers), hyperparameters, skipped=skipped, grad_scale=grad_scale,
                     found_inf=found_inf)
    return LARS.run(call, lambda c: _lars_reference(c, max_grad_norm, reduce),
                    lambda c: launch_two_passes(LARS, c, LARS_CONFIGS, _lars_norms_kernel, _lars_apply_kernel,
                                                max_grad_norm=max_grad_norm, reduce=reduce, step_col=None))


def lars_step_reference(params, grads, momentum_buffers, *, max_grad_norm=None, skipped=None, grad_scale=None,
                        found_inf=None, reduce=None, **hyperparameters) -> torch.Tensor:
    """Plain PyTorch LARS with :func:`lars_step`'s arguments and contract (math in fp32, float64 for
    float64 params)."""
    call = LARS.bind((params, grads, momentum_buffers), hyperparameters, skipped=skipped, grad_scale=grad_scale,
                     found_inf=found_inf)
    return LARS.run(call, lambda c: _lars_reference(c, max_grad_norm, reduce), None)


def _lars_reference(call: Call, max_grad_norm, reduce) -> torch.Tensor:
    """The reference's math on a bound call."""
    params, grads, momentum_buffers = (call.tensors[a.name] for a in LARS.tensors)
    clip = global_norm_reference(grads, max_grad_norm, call.skipped, call.grad_scale, call.found_inf, reduce)
    ok = clip[2] != 0
    directions = []
    records = [r.on_host() for r in call.records]
    for p, g, h in zip(params, grads, records):
        dtype = torch.promote_types(p.dtype, torch.float32)
        w = p.to(dtype)
        directions.append((w, g.to(dtype) * clip[1].to(dtype) + h.weight_decay * w))
    norms = tensor_norms_reference(directions, reduce)
    for p, m, h, (w, d), (w_norm, d_norm) in zip(params, momentum_buffers, records, directions, norms):
        r = trust_ratio_reference(w_norm, d_norm, h.eta, h.trust_min, h.trust_max, bool(h.adapt))
        m_new = h.momentum * m.to(w.dtype) + h.lr * r * d
        update = h.momentum * m_new + h.lr * r * d if h.nesterov else m_new
        m.copy_(torch.where(ok, m_new, m.to(w.dtype)))
        p.copy_(torch.where(ok, w - update, w))
    return clip
