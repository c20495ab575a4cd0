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
hyperparameter table holds ``ln b_k``; ``-inf`` without bias correction gives 1), and is within ~1 fp32 ulp
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

:data:`LAMB` declares the op (``op_declaration``): :class:`LambHyperparameters` is the kernels'
hyperparameter table, its tensors and their checks, and :func:`lamb_traffic`.
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
    inv_bias_correction,
    program_chunk,
    tensor_norms_reference,
    trust_ratio,
    trust_ratio_reference,
)
from .norm_pipeline import launch_two_passes
from .op_declaration import (
    Call,
    ElementwiseOp,
    Hyperparameters,
    TensorArg,
    Traffic,
    like_param,
    log_decay,
    one_element,
    within,
)


@dataclass(frozen=True)
class LambHyperparameters(Hyperparameters):
    """One tensor's LAMB hyperparameters; the fields in order are the columns of the kernels' table."""

    lr: float = field(metadata=within("[0, inf)"))
    beta1: float = field(default=0.9, metadata=within("[0, 1)"))
    beta2: float = field(default=0.999, metadata=within("[0, 1)"))
    eps: float = field(default=1e-6, metadata=within("(0, inf)"))
    weight_decay: float = field(default=0.01, metadata=within("[0, inf)"))
    bias_correction: bool = True
    grad_averaging: bool = True
    adapt: bool = True
    trust_min: float = field(default=0.0, metadata=within("[0, inf)"))
    trust_max: float = field(default=math.inf, metadata=within("[0, inf]"))
    grad_weight: float = field(init=False)  # b3: 1 - b1 with grad averaging, else 1
    one_minus_beta2: float = field(init=False)
    ln_beta1: float = field(init=False)  # -inf without bias correction
    ln_beta2: float = field(init=False)

    def derive(self) -> dict:
        corrected = bool(self.bias_correction)
        return dict(grad_weight=1.0 - self.beta1 if self.grad_averaging else 1.0, one_minus_beta2=1.0 - self.beta2,
                    ln_beta1=log_decay("beta1", self.beta1, corrected),
                    ln_beta2=log_decay("beta2", self.beta2, corrected))


def lamb_traffic(shapes: Sequence[tuple], dtype: torch.dtype, grad_dtype: torch.dtype | None = None) -> Traffic:
    """One call on fp32 state: g pre-read (norm) + pass 1 (g, w, m, v read; m, v written) + pass 2 (w, m, v
    read; w written) = 2 s_g + 3 s_p + 24 bytes per parameter (44 fp32, 34 bf16); about 30 flops per
    parameter (norm 2, pass 1 19, pass 2 9)."""
    n = sum(math.prod(s) for s in shapes)
    s_p = torch.finfo(dtype).bits // 8
    s_g = torch.finfo(grad_dtype or dtype).bits // 8
    return Traffic(bytes=n * (2 * s_g + 3 * s_p + 24), flops=30 * n)


LAMB = ElementwiseOp(
    "lamb_step", LambHyperparameters,
    (TensorArg("params", written=True, layout="dense"),
     TensorArg("grads", written=False, shape=like_param),
     TensorArg("exp_avgs", written=True, state=True, shape=like_param, layout="param_strides"),
     TensorArg("exp_avg_sqs", written=True, state=True, shape=like_param, layout="param_strides"),
     TensorArg("steps", written=True, state=True, shape=one_element)),
    lamb_traffic,
)
A = LAMB.addr
H = LAMB.hyper

LAMB_CONFIGS = chunked_configs("lamb_step")


@triton.jit
def _lamb_moments_kernel(
    addr_ptr, numel_ptr, chunk_tensor_ptr, chunk_start_ptr, hyper_ptr, clip_ptr, partial_ptr,
    P_DT: tl.constexpr, G_DT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    """Pass 1: m, v update; partial[k] = (sum w^2, sum u^2) over chunk k."""
    pid, tid, start, n = program_chunk(chunk_tensor_ptr, chunk_start_ptr, numel_ptr)
    row = addr_ptr + tid * A.width
    p_ptr = tl.load(row + A.params).to(tl.pointer_type(P_DT))
    g_ptr = tl.load(row + A.grads).to(tl.pointer_type(G_DT))
    m_ptr = tl.load(row + A.exp_avgs).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + A.exp_avg_sqs).to(tl.pointer_type(tl.float32))
    t = tl.load(tl.load(row + A.steps).to(tl.pointer_type(tl.float32))) + 1.0
    h = hyper_ptr + tid * H.width
    b1 = tl.load(h + H.beta1)
    b2 = tl.load(h + H.beta2)
    b3 = tl.load(h + H.grad_weight)
    b4 = tl.load(h + H.one_minus_beta2)
    eps = tl.load(h + H.eps)
    wd = tl.load(h + H.weight_decay)
    inv_bc1 = inv_bias_correction(t, tl.load(h + H.ln_beta1))  # 1 / bc1 (1 without bias correction)
    inv_bc2 = inv_bias_correction(t, tl.load(h + H.ln_beta2))
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
    row = addr_ptr + tid * A.width
    p_ptr = tl.load(row + A.params).to(tl.pointer_type(P_DT))
    m_ptr = tl.load(row + A.exp_avgs).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + A.exp_avg_sqs).to(tl.pointer_type(tl.float32))
    t = tl.load(tl.load(row + A.steps).to(tl.pointer_type(tl.float32)))
    h = hyper_ptr + tid * H.width
    lr = tl.load(h + H.lr)
    eps = tl.load(h + H.eps)
    wd = tl.load(h + H.weight_decay)
    inv_bc1 = inv_bias_correction(t, tl.load(h + H.ln_beta1))
    inv_bc2 = inv_bias_correction(t, tl.load(h + H.ln_beta2))
    r = trust_ratio(tl.load(norms_ptr + tid * 2), tl.load(norms_ptr + tid * 2 + 1), 1.0,
                    tl.load(h + H.trust_min), tl.load(h + H.trust_max), tl.load(h + H.adapt))
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


def lamb_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    *,
    max_grad_norm: float | None = 1.0,
    skipped: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor], None] | None = None,
    **hyperparameters,
) -> torch.Tensor:
    """One LAMB step over all tensors, in place (see the module docstring for the math).

    ``hyperparameters``: the fields of :class:`LambHyperparameters` (``lr`` required; ``beta1``,
    ``beta2``, ``eps``, ``weight_decay``, ``bias_correction``, ``grad_averaging``, ``adapt``,
    ``trust_min``, ``trust_max`` with its defaults), each a number or one per tensor. ``params`` are
    fp32/bf16/fp16 (any dtype on the reference path); ``exp_avgs``/``exp_avg_sqs`` fp32 (or the params'
    dtype if that is float64, reference path only); ``steps`` 0-d fp32 tensors counting completed steps;
    ``skipped`` an optional 0-d int32 counter. Returns ``[||g_all||, clip coefficient, ok]`` as a device
    tensor (the coefficient the stored gradients are multiplied by). ``grad_scale``/``found_inf``: a
    GradScaler's tensors (as ``GradScaler.step`` hands them to an optimizer with
    ``_step_supports_amp_scaling``): the gradients are divided by ``grad_scale`` in fp32 as they are
    loaded (they stay as stored) and the step is skipped (``skipped`` incremented) when ``found_inf`` is
    nonzero, on the device.

    ``reduce``: the tensors are this rank's shards of larger ones (FSDP2): an in-place SUM all-reduce
    over the shard group, applied to the gradient-norm partials ``[sum g^2, non-finite count]`` and to
    the per-tensor ``[sum w^2, sum u^2]`` (two small collectives per step, no host synchronisation), so
    the clip coefficient, the skip verdict and the trust ratios are those of the whole tensors.

    With bias correction, betas must be in [0, 1). Argument checks: :data:`LAMB` (``kernels.checks``).
    """
    call = LAMB.bind((params, grads, exp_avgs, exp_avg_sqs, steps), hyperparameters, skipped=skipped,
                     grad_scale=grad_scale, found_inf=found_inf)
    return LAMB.run(call, lambda c: _lamb_reference(c, max_grad_norm, reduce),
                    lambda c: launch_two_passes(LAMB, c, LAMB_CONFIGS, _lamb_moments_kernel, _lamb_apply_kernel,
                                                max_grad_norm=max_grad_norm, reduce=reduce, step_col=A.steps))


def lamb_step_reference(params, grads, exp_avgs, exp_avg_sqs, steps, *, max_grad_norm=1.0, skipped=None,
                        grad_scale=None, found_inf=None, reduce=None, **hyperparameters) -> torch.Tensor:
    """Plain PyTorch LAMB with :func:`lamb_step`'s arguments and contract.

    Math in fp32, or float64 when the params are float64 (the tests' reference); the bias corrections
    ``1 - b^t`` always in float64 (they cancel: fp32 ``b^t`` would cost up to ~3e-8 / (1 - b) relative).
    """
    call = LAMB.bind((params, grads, exp_avgs, exp_avg_sqs, steps), hyperparameters, skipped=skipped,
                     grad_scale=grad_scale, found_inf=found_inf)
    return LAMB.run(call, lambda c: _lamb_reference(c, max_grad_norm, reduce), None)


def _lamb_reference(call: Call, max_grad_norm, reduce) -> torch.Tensor:
    """The reference's math on a bound call."""
    params, grads, exp_avgs, exp_avg_sqs, steps = (call.tensors[a.name] for a in LAMB.tensors)
    clip = global_norm_reference(grads, max_grad_norm, call.skipped, call.grad_scale, call.found_inf, reduce)
    ok = clip[2] != 0
    updates = []
    records = [r.on_host() for r in call.records]
    for p, g, m, v, s, h in zip(params, grads, exp_avgs, exp_avg_sqs, steps, records):
        dtype = torch.promote_types(p.dtype, torch.float32)
        w = p.to(dtype)
        g = g.to(dtype) * clip[1].to(dtype)
        t = s.to(torch.float64) + 1
        bc1 = (1 - h.beta1 ** t if h.bias_correction else torch.ones_like(t)).to(dtype)
        bc2 = (1 - h.beta2 ** t if h.bias_correction else torch.ones_like(t)).to(dtype)
        m_new = h.beta1 * m.to(dtype) + h.grad_weight * g
        v_new = h.beta2 * v.to(dtype) + h.one_minus_beta2 * g * g
        u = (m_new / bc1) / ((v_new / bc2).sqrt() + h.eps) + h.weight_decay * w
        updates.append((w, m_new, v_new, u))
    norms = tensor_norms_reference([(w, u) for w, _, _, u in updates], reduce)
    for (p, m, v, s, h), (w, m_new, v_new, u), (w_norm, u_norm) in zip(
            zip(params, exp_avgs, exp_avg_sqs, steps, records), updates, norms):
        r = trust_ratio_reference(w_norm, u_norm, 1.0, h.trust_min, h.trust_max, bool(h.adapt))
        m.copy_(torch.where(ok, m_new, m.to(m_new.dtype)))
        v.copy_(torch.where(ok, v_new, v.to(v_new.dtype)))
        p.copy_(torch.where(ok, w - h.lr * r * u, w))
        s.add_(ok.to(s.dtype))
    return clip
