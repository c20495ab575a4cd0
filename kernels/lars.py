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
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import triton
import triton.language as tl

from kfopt.autotune import Config, shape_bucket

from .aliasing import check_no_overlap
from .dispatch import check_kernel_dtype, check_same_device, check_same_shapes, is_dense, tl_dtype, use_triton
from .multi_tensor import (
    TensorTable,
    amp_tensors,
    chunked_configs,
    dense_like,
    for_each_launch,
    global_norm_reference,
    launch_global_norm,
    launch_segment_norms,
    per_tensor,
    program_chunk,
    tensor_norms_reference,
    trust_ratio,
    trust_ratio_reference,
)

# addr table columns (param, grad, momentum) and hyper table columns (constexpr: kernels index with them)
P, G, M, N_COLS = (tl.constexpr(i) for i in range(4))
LR, MOMENTUM, WD, ETA, NESTEROV, ADAPT, TRUST_MIN, TRUST_MAX, N_HYPER = (tl.constexpr(i) for i in range(9))

LARS_CONFIGS = chunked_configs("lars_step")


@triton.jit
def _lars_norms_kernel(
    addr_ptr, numel_ptr, chunk_tensor_ptr, chunk_start_ptr, hyper_ptr, clip_ptr, partial_ptr,
    P_DT: tl.constexpr, G_DT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    """Pass 1: partial[k] = (sum w^2, sum d^2) over chunk k, d = coef g + wd w."""
    pid, tid, start, n = program_chunk(chunk_tensor_ptr, chunk_start_ptr, numel_ptr)
    p_ptr = tl.load(addr_ptr + tid * N_COLS + P).to(tl.pointer_type(P_DT))
    g_ptr = tl.load(addr_ptr + tid * N_COLS + G).to(tl.pointer_type(G_DT))
    wd = tl.load(hyper_ptr + tid * N_HYPER + WD)
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
    p_ptr = tl.load(addr_ptr + tid * N_COLS + P).to(tl.pointer_type(P_DT))
    g_ptr = tl.load(addr_ptr + tid * N_COLS + G).to(tl.pointer_type(G_DT))
    m_ptr = tl.load(addr_ptr + tid * N_COLS + M).to(tl.pointer_type(tl.float32))
    h = hyper_ptr + tid * N_HYPER
    mu = tl.load(h + MOMENTUM)
    wd = tl.load(h + WD)
    nesterov = tl.load(h + NESTEROV)
    r = trust_ratio(tl.load(norms_ptr + tid * 2), tl.load(norms_ptr + tid * 2 + 1), tl.load(h + ETA),
                    tl.load(h + TRUST_MIN), tl.load(h + TRUST_MAX), tl.load(h + ADAPT))
    step_size = tl.load(h + LR) * r
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


def _lars_hyper(n, lr, momentum, weight_decay, eta, nesterov, adapt, trust_min, trust_max) -> list[list[float]]:
    cols = [per_tensor(name, value, n) for name, value in (
        ("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay), ("eta", eta),
        ("nesterov", nesterov), ("adapt", adapt), ("trust_min", trust_min), ("trust_max", trust_max))]
    return [[float(lr_i), float(mu), float(wd), float(eta_i), float(bool(nes)), float(bool(ad)), float(lo), float(hi)]
            for lr_i, mu, wd, eta_i, nes, ad, lo, hi in zip(*cols)]


def lars_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    *,
    lr,
    momentum=0.9,
    weight_decay=0.0,
    eta=0.001,
    nesterov=False,
    adapt=True,
    trust_min=0.0,
    trust_max=math.inf,
    max_grad_norm: float | None = None,
    skipped: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """One LARS step over all tensors, in place (see the module docstring for the math).

    Hyperparameters are scalars or one value per tensor; ``momentum_buffers`` are fp32 with the
    params' strides (float64 allowed on the reference path). Returns ``[||g_all||, clip coef, ok]``.
    ValueError when tensors the step writes (params, momentum_buffers, skipped) share memory, with each
    other or with a gradient, and (Triton path) when a param is not dense.
    ``grad_scale``/``found_inf``: a GradScaler's tensors (as ``GradScaler.step`` hands them to an optimizer
    with ``_step_supports_amp_scaling``): the gradients are divided by ``grad_scale`` in fp32 as they are
    loaded (they stay as stored) and the step is skipped (``skipped`` incremented) when ``found_inf`` is
    nonzero, on the device.
    ``reduce``: the tensors are this rank's shards (FSDP2): an in-place SUM all-reduce over the shard
    group of the gradient-norm partials and of the per-tensor ``[sum w^2, sum d^2]``, as for
    :func:`kfopt.kernels.lamb_step`.
    """
    n = len(params)
    check_same_shapes("grads", grads, params)
    check_same_shapes("momentum_buffers", momentum_buffers, params)
    hyper = _lars_hyper(n, lr, momentum, weight_decay, eta, nesterov, adapt, trust_min, trust_max)
    if n == 0:
        return torch.zeros(3)
    device = params[0].device
    for name, seq in (("params", params), ("grads", grads), ("momentum_buffers", momentum_buffers)):
        check_same_device(name, seq, device)
    check_no_overlap([("params", params), ("momentum_buffers", momentum_buffers), ("skipped", [skipped])],
                     [("grads", grads)])
    grad_scale, found_inf = amp_tensors(grad_scale, found_inf, device)
    if not use_triton(device):
        return lars_step_reference(params, grads, momentum_buffers, hyper=hyper, max_grad_norm=max_grad_norm,
                                   skipped=skipped, grad_scale=grad_scale, found_inf=found_inf, reduce=reduce)
    for i, (p, g, m) in enumerate(zip(params, grads, momentum_buffers)):
        check_kernel_dtype(f"params[{i}]", p)
        check_kernel_dtype(f"grads[{i}]", g)
        if m.dtype != torch.float32:
            raise TypeError(f"momentum_buffers[{i}]: expected float32 state, got {m.dtype}")
        if not is_dense(p):
            raise ValueError(f"params[{i}] must be dense (its elements filling one block of memory, in any "
                             f"order); got shape {tuple(p.shape)}, strides {p.stride()}")
        if m.stride() != p.stride():
            raise ValueError(f"momentum_buffers[{i}] must have the strides of params[{i}]")
    grads = [dense_like(g, p) for g, p in zip(grads, params)]
    total = sum(p.numel() for p in params)

    def run(config: Config) -> torch.Tensor:
        table = TensorTable.build([params, grads, momentum_buffers], hyper, config["CHUNK"], device,
                                  dtype_columns=(P, G))
        clip = launch_global_norm(table, G, 1, max_grad_norm, skipped, config, device, grad_scale, found_inf,
                                  reduce)
        partial = torch.empty((max(table.n_chunks, 1), 2), dtype=torch.float32, device=device)

        def launcher(kernel, out):
            def launch(lo, hi, dtypes):
                kernel[(hi - lo,)](
                    table.addr, table.numel, table.chunk_tensor[lo:hi], table.chunk_start[lo:hi], table.hyper,
                    clip, out(lo, hi), P_DT=tl_dtype(dtypes[0]), G_DT=tl_dtype(dtypes[1]),
                    BLOCK=config["BLOCK"], CHUNK=config["CHUNK"], num_warps=config.num_warps)
            return launch

        for_each_launch(table, launcher(_lars_norms_kernel, lambda lo, hi: partial[lo:hi]))
        norms = launch_segment_norms(table, partial, clip, step_col=None, reduce=reduce)
        for_each_launch(table, launcher(_lars_apply_kernel, lambda lo, hi: norms))
        return clip

    restore = [*params, *momentum_buffers] + ([skipped] if skipped is not None else [])
    return LARS_CONFIGS.launch(device=device, bucket=shape_bucket(total), dtype=params[0].dtype, run=run,
                               restore=restore)


def lars_step_reference(params, grads, momentum_buffers, *, hyper, max_grad_norm, skipped=None, grad_scale=None,
                        found_inf=None, reduce=None):
    """Plain PyTorch LARS (same contract as :func:`lars_step`; math in fp32, float64 for float64 params)."""
    clip = global_norm_reference(grads, max_grad_norm, skipped, grad_scale, found_inf, reduce)
    ok = clip[2] != 0
    directions = []
    for p, g, h in zip(params, grads, hyper):
        dtype = torch.promote_types(p.dtype, torch.float32)
        w = p.to(dtype)
        directions.append((w, g.to(dtype) * clip[1].to(dtype) + h[WD] * w))
    norms = tensor_norms_reference(directions, reduce)
    for p, m, h, (w, d), (w_norm, d_norm) in zip(params, momentum_buffers, hyper, directions, norms):
        r = trust_ratio_reference(w_norm, d_norm, h[ETA], h[TRUST_MIN], h[TRUST_MAX], bool(h[ADAPT]))
        m_new = h[MOMENTUM] * m.to(w.dtype) + h[LR] * r * d
        update = h[MOMENTUM] * m_new + h[LR] * r * d if h[NESTEROV] else m_new
        m.copy_(torch.where(ok, m_new, m.to(w.dtype)))
        p.copy_(torch.where(ok, w - update, w))
    return clip
