"""LAMB step for many tensors in one multi-tensor pipeline (You et al., ICLR 2020).

Per tensor w with gradient g, step t = step + 1 (state ``step`` counts completed steps)::

    g   <- g * coef                                  coef = min(1, max_grad_norm / ||g_all||)
    m   <- b1 m + b3 g                               b3 = 1 - b1 (grad_averaging) or 1
    v   <- b2 v + (1 - b2) g^2
    u   =  (m / bc1) / (sqrt(v / bc2) + eps) + wd w    bc_k = 1 - b_k^t  (1 without bias correction)
    r   =  clamp(||w|| / ||u||, lo, hi)  (1 if a norm is 0, or if the tensor is not adapted)
    w   <- w - lr r u

Precision (``multi_tensor``'s module docstring has the GPU details): ``1 / bc_k`` comes from
``inv_bias_correction``, float64 on the device from ``ln b_k`` formed in float64 on the host (the
hyper table holds ``ln b_k``; ``-inf`` without bias correction gives 1), and is within ~1 fp32 ulp
(an approximate ``1 - exp2(t log2 b)`` is off by ~1e-4 relative for b2 = 0.999 at t = 1). ``u`` is
``div_rn(m * (1 / bc1), sqrt_rn(v * (1 / bc2)) + eps)`` and the norms and the trust ratio are
correctly rounded too: on sm_90 no ``div.full``/``sqrt.approx``/``ex2.approx`` is involved, and a
compiled step differs from the interpreted one only by FMA contraction and summation order.

Launches (no host synchronisation): gradient-norm pass + reduction (``multi_tensor``); pass 1 reads
g, w, m, v, writes m, v and per-chunk partials of ||w||^2, ||u||^2; a per-tensor reduction forms the
norms and advances ``step`` where the step is taken; pass 2 reads w, m, v, recomputes u and writes w.
fp32 state: 44 bytes per parameter (4 for the norm pre-read, 24 pass 1, 16 pass 2).

If any gradient is non-finite (or ||g_all||^2 overflows fp32) nothing is written: w, m, v and step
keep their values and ``skipped`` (when given) is incremented. Tensors the step writes must not share
memory (``aliasing.check_no_overlap``: a ValueError names the two entries).
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
    inv_bias_correction,
    launch_global_norm,
    launch_segment_norms,
    log_decays,
    per_tensor,
    program_chunk,
    tensor_norms_reference,
    trust_ratio,
    trust_ratio_reference,
)

# addr table columns and hyper table columns (constexpr: the kernels index the tables with them).
# B3 = 1 - b1 (or 1 without grad averaging), B4 = 1 - b2 and LN_Bk = ln(b_k) (-inf without bias
# correction) are formed in float64 on the host.
P, G, M, V, STEP, N_COLS = (tl.constexpr(i) for i in range(6))
LR, B1, B2, B3, B4, LN_B1, LN_B2, EPS, WD, BIAS_CORRECTION, ADAPT, TRUST_MIN, TRUST_MAX, N_HYPER = (
    tl.constexpr(i) for i in range(14))

LAMB_CONFIGS = chunked_configs("lamb_step")


@triton.jit
def _lamb_moments_kernel(
    addr_ptr, numel_ptr, chunk_tensor_ptr, chunk_start_ptr, hyper_ptr, clip_ptr, partial_ptr,
    P_DT: tl.constexpr, G_DT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    """Pass 1: m, v update; partial[k] = (sum w^2, sum u^2) over chunk k."""
    pid, tid, start, n = program_chunk(chunk_tensor_ptr, chunk_start_ptr, numel_ptr)
    row = addr_ptr + tid * N_COLS
    p_ptr = tl.load(row + P).to(tl.pointer_type(P_DT))
    g_ptr = tl.load(row + G).to(tl.pointer_type(G_DT))
    m_ptr = tl.load(row + M).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + V).to(tl.pointer_type(tl.float32))
    t = tl.load(tl.load(row + STEP).to(tl.pointer_type(tl.float32))) + 1.0
    h = hyper_ptr + tid * N_HYPER
    b1 = tl.load(h + B1)
    b2 = tl.load(h + B2)
    b3 = tl.load(h + B3)
    b4 = tl.load(h + B4)
    eps = tl.load(h + EPS)
    wd = tl.load(h + WD)
    inv_bc1 = inv_bias_correction(t, tl.load(h + LN_B1))  # 1 / bc1 (1 without bias correction)
    inv_bc2 = inv_bias_correction(t, tl.load(h + LN_B2))
    coef = tl.load(clip_ptr + 1)
    n = tl.where(tl.load(clip_ptr + 2) != 0, n, 0)  # a skipped step reads and writes nothing
    w_sq = tl.zeros([BLOCK], tl.float32)
    u_sq = tl.zeros([BLOCK], tl.float32)
    for off in range(0, CHUNK, BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        mask = offs < n
        w = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * coef
        m = b1 * tl.load(m_ptr + offs, mask=mask, other=0.0) + b3 * g
        v = b2 * tl.load(v_ptr + offs, mask=mask, other=0.0) + b4 * g * g
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        u = tl.div_rn(m * inv_bc1, tl.sqrt_rn(v * inv_bc2) + eps) + wd * w
        w_sq += w * w
        u_sq += tl.where(mask, u * u, 0.0)
    tl.store(partial_ptr + pid * 2, tl.sum(w_sq, axis=0))
    tl.store(partial_ptr + pid * 2 + 1, tl.sum(u_sq, axis=0))


@triton.jit
def _lamb_apply_kernel(
    addr_ptr, numel_ptr, chunk_tensor_ptr, chunk_start_ptr, hyper_ptr, clip_ptr, norms_ptr,
    P_DT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    """Pass 2: w <- w - lr * r * u, u recomputed from the updated m, v (step already advanced)."""
    pid, tid, start, n = program_chunk(chunk_tensor_ptr, chunk_start_ptr, numel_ptr)
    row = addr_ptr + tid * N_COLS
    p_ptr = tl.load(row + P).to(tl.pointer_type(P_DT))
    m_ptr = tl.load(row + M).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + V).to(tl.pointer_type(tl.float32))
    t = tl.load(tl.load(row + STEP).to(tl.pointer_type(tl.float32)))
    h = hyper_ptr + tid * N_HYPER
    lr = tl.load(h + LR)
    eps = tl.load(h + EPS)
    wd = tl.load(h + WD)
    inv_bc1 = inv_bias_correction(t, tl.load(h + LN_B1))
    inv_bc2 = inv_bias_correction(t, tl.load(h + LN_B2))
    r = trust_ratio(tl.load(norms_ptr + tid * 2), tl.load(norms_ptr + tid * 2 + 1), 1.0,
                    tl.load(h + TRUST_MIN), tl.load(h + TRUST_MAX), tl.load(h + ADAPT))
    step_size = lr * r
    n = tl.where(tl.load(clip_ptr + 2) != 0, n, 0)  # a skipped step writes nothing
    for off in range(0, CHUNK, BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        mask = offs < n
        w = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        u = tl.div_rn(m * inv_bc1, tl.sqrt_rn(v * inv_bc2) + eps) + wd * w
        tl.store(p_ptr + offs, (w - step_size * u).to(P_DT), mask=mask)


def _lamb_hyper(n, lr, beta1, beta2, eps, weight_decay, bias_correction, grad_averaging, adapt, trust_min,
                trust_max) -> list[list[float]]:
    cols = [per_tensor(name, value, n) for name, value in (
        ("lr", lr), ("beta1", beta1), ("beta2", beta2), ("eps", eps), ("weight_decay", weight_decay),
        ("bias_correction", bias_correction), ("grad_averaging", grad_averaging), ("adapt", adapt),
        ("trust_min", trust_min), ("trust_max", trust_max))]
    corrected = [bool(bc) for bc in cols[5]]
    logs = zip(log_decays("beta1", beta1, n, corrected), log_decays("beta2", beta2, n, corrected))
    rows = []
    for (lr_i, b1, b2, eps_i, wd, bc, avg, ad, lo, hi), (ln_b1, ln_b2) in zip(zip(*cols), logs):
        rows.append([float(lr_i), float(b1), float(b2), 1.0 - float(b1) if avg else 1.0, 1.0 - float(b2),
                     ln_b1, ln_b2, float(eps_i), float(wd), float(bool(bc)), float(bool(ad)), float(lo), float(hi)])
    return rows


def lamb_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    *,
    lr,
    beta1=0.9,
    beta2=0.999,
    eps=1e-6,
    weight_decay=0.01,
    bias_correction=True,
    grad_averaging=True,
    adapt=True,
    trust_min=0.0,
    trust_max=math.inf,
    max_grad_norm: float | None = 1.0,
    skipped: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """One LAMB step over all tensors, in place (see the module docstring for the math).

    Hyperparameters are scalars or one value per tensor. ``params`` are fp32/bf16/fp16 (any dtype on
    the reference path); ``exp_avgs``/``exp_avg_sqs`` fp32 (or the params' dtype if that is float64,
    reference path only); ``steps`` 0-d fp32 tensors counting completed steps; ``skipped`` an optional
    0-d int32 counter. Returns ``[||g_all||, clip coefficient, ok]`` as a device tensor (the coefficient
    the stored gradients are multiplied by). ``grad_scale``/``found_inf``: a GradScaler's tensors (as
    ``GradScaler.step`` hands them to an optimizer with ``_step_supports_amp_scaling``): the gradients
    are divided by ``grad_scale`` in fp32 as they are loaded (they stay as stored) and the step is
    skipped (``skipped`` incremented) when ``found_inf`` is nonzero, on the device.

    ``reduce``: the tensors are this rank's shards of larger ones (FSDP2): an in-place SUM all-reduce
    over the shard group, applied to the gradient-norm partials ``[sum g^2, non-finite count]`` and to
    the per-tensor ``[sum w^2, sum u^2]`` (two small collectives per step, no host synchronisation), so
    the clip coefficient, the skip verdict and the trust ratios are those of the whole tensors.

    With bias correction, betas must be in [0, 1). ValueError when tensors the step writes (params,
    exp_avgs, exp_avg_sqs, steps, skipped) share memory, with each other or with a gradient, and
    (Triton path) when a param is not dense (its elements must fill one block of memory).
    """
    n = len(params)
    for name, seq in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)):
        check_same_shapes(name, seq, params)
    if len(steps) != n:
        raise ValueError(f"steps: expected {n} tensors, got {len(steps)}")
    hyper = _lamb_hyper(n, lr, beta1, beta2, eps, weight_decay, bias_correction, grad_averaging, adapt,
                        trust_min, trust_max)
    if n == 0:
        return torch.zeros(3)
    device = params[0].device
    for name, seq in (("params", params), ("grads", grads), ("exp_avgs", exp_avgs),
                      ("exp_avg_sqs", exp_avg_sqs), ("steps", steps)):
        check_same_device(name, seq, device)
    check_no_overlap([("params", params), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs), ("steps", steps),
                      ("skipped", [skipped])], [("grads", grads)])
    grad_scale, found_inf = amp_tensors(grad_scale, found_inf, device)
    if not use_triton(device):
        return lamb_step_reference(params, grads, exp_avgs, exp_avg_sqs, steps, hyper=hyper,
                                   max_grad_norm=max_grad_norm, skipped=skipped, grad_scale=grad_scale,
                                   found_inf=found_inf, reduce=reduce)
    for i, (p, g, m, v, s) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps)):
        check_kernel_dtype(f"params[{i}]", p)
        check_kernel_dtype(f"grads[{i}]", g)
        for name, t in ((f"exp_avgs[{i}]", m), (f"exp_avg_sqs[{i}]", v), (f"steps[{i}]", s)):
            if t.dtype != torch.float32:
                raise TypeError(f"{name}: expected float32 state, got {t.dtype}")
        if not is_dense(p):
            raise ValueError(f"params[{i}] must be dense (its elements filling one block of memory, in any "
                             f"order); got shape {tuple(p.shape)}, strides {p.stride()}")
        if m.stride() != p.stride() or v.stride() != p.stride():
            raise ValueError(f"exp_avgs[{i}]/exp_avg_sqs[{i}] must have the strides of params[{i}]")
        if s.numel() != 1:
            raise ValueError(f"steps[{i}]: expected a one-element tensor, got shape {tuple(s.shape)}")
    grads = [dense_like(g, p) for g, p in zip(grads, params)]
    total = sum(p.numel() for p in params)

    def run(config: Config) -> torch.Tensor:
        table = TensorTable.build([params, grads, exp_avgs, exp_avg_sqs, steps], hyper, config["CHUNK"],
                                  device, dtype_columns=(P, G))
        clip = launch_global_norm(table, G, 1, max_grad_norm, skipped, config, device, grad_scale, found_inf,
                                  reduce)
        partial = torch.empty((max(table.n_chunks, 1), 2), dtype=torch.float32, device=device)

        def moments(lo, hi, dtypes):
            _lamb_moments_kernel[(hi - lo,)](
                table.addr, table.numel, table.chunk_tensor[lo:hi], table.chunk_start[lo:hi],
                table.hyper, clip, partial[lo:hi], P_DT=tl_dtype(dtypes[0]), G_DT=tl_dtype(dtypes[1]),
                BLOCK=config["BLOCK"], CHUNK=config["CHUNK"], num_warps=config.num_warps)

        def apply(lo, hi, dtypes):
            _lamb_apply_kernel[(hi - lo,)](
                table.addr, table.numel, table.chunk_tensor[lo:hi], table.chunk_start[lo:hi],
                table.hyper, clip, norms, P_DT=tl_dtype(dtypes[0]),
                BLOCK=config["BLOCK"], CHUNK=config["CHUNK"], num_warps=config.num_warps)

        for_each_launch(table, moments)
        norms = launch_segment_norms(table, partial, clip, step_col=STEP, reduce=reduce)
        for_each_launch(table, apply)
        return clip

    restore = [*params, *exp_avgs, *exp_avg_sqs, *steps] + ([skipped] if skipped is not None else [])
    return LAMB_CONFIGS.launch(device=device, bucket=shape_bucket(total), dtype=params[0].dtype,
                               run=run, restore=restore)


def lamb_step_reference(params, grads, exp_avgs, exp_avg_sqs, steps, *, hyper, max_grad_norm, skipped=None,
                        grad_scale=None, found_inf=None, reduce=None):
    """Plain PyTorch LAMB (same contract as :func:`lamb_step`; ``hyper`` rows as built there).

    Math in fp32, or float64 when the params are float64 (the tests' reference); the bias corrections
    ``1 - b^t`` always in float64 (they cancel: fp32 ``b^t`` would cost up to ~3e-8 / (1 - b) relative).
    """
    clip = global_norm_reference(grads, max_grad_norm, skipped, grad_scale, found_inf, reduce)
    ok = clip[2] != 0
    updates = []
    for p, g, m, v, s, h in zip(params, grads, exp_avgs, exp_avg_sqs, steps, hyper):
        dtype = torch.promote_types(p.dtype, torch.float32)
        w = p.to(dtype)
        g = g.to(dtype) * clip[1].to(dtype)
        t = s.to(torch.float64) + 1
        bc1 = (1 - h[B1] ** t if h[BIAS_CORRECTION] else torch.ones_like(t)).to(dtype)
        bc2 = (1 - h[B2] ** t if h[BIAS_CORRECTION] else torch.ones_like(t)).to(dtype)
        m_new = h[B1] * m.to(dtype) + h[B3] * g
        v_new = h[B2] * v.to(dtype) + h[B4] * g * g
        u = (m_new / bc1) / ((v_new / bc2).sqrt() + h[EPS]) + h[WD] * w
        updates.append((w, m_new, v_new, u))
    norms = tensor_norms_reference([(w, u) for w, _, _, u in updates], reduce)
    for (p, m, v, s, h), (w, m_new, v_new, u), (w_norm, u_norm) in zip(
            zip(params, exp_avgs, exp_avg_sqs, steps, hyper), updates, norms):
        r = trust_ratio_reference(w_norm, u_norm, 1.0, h[TRUST_MIN], h[TRUST_MAX], bool(h[ADAPT]))
        m.copy_(torch.where(ok, m_new, m.to(m_new.dtype)))
        v.copy_(torch.where(ok, v_new, v.to(v_new.dtype)))
        p.copy_(torch.where(ok, w - h[LR] * r * u, w))
        s.add_(ok.to(s.dtype))
    return clip
