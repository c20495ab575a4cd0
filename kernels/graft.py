"""Layer-wise grafting of a preconditioned direction onto a first-order step size, multi-tensor.

The step of K-FAC, MKOR/MKOR-H and SINGD with ``graft != "none"`` (Distributed Shampoo's grafting): the
preconditioner chooses each tensor's direction, a first-order method (Adam by default) its step size.
Per tensor, with ``g`` its raw (unpreconditioned) gradient, ``P`` its preconditioned gradient and
step ``t = step + 1`` (state ``step`` counts completed steps)::

    m   <- b1 m + (1 - b1) g ;   v <- b2 v + (1 - b2) g^2          (fp32 state, every tensor)
    a    = m^ / (sqrt(v^) + eps)  ("adam"),  g / (sqrt(v^) + eps)  ("rmsprop"),  g  ("sgd");
           m^ = m / (1 - b1^t),  v^ = v / (1 - b2^t)
    buf <- mu buf + P ;  q = buf        (tensors with a momentum buffer)   or   q = P
    d    = (||a|| / ||q||) q            (precondition; d = 0 where ||q|| = 0)
         = a                            (tensors no layer preconditions: the first-order update itself)
    w   <- w - lr (d + wd w)            (decoupled weight decay)

Norms are Frobenius norms of whole tensors (so ``||d|| = ||a||``: the first-order method's step length
with the preconditioner's direction).

**Non-finite updates.** When any tensor's ``||a||`` or ``||q||`` is not finite (a NaN/inf gradient or
preconditioned gradient, a factor that blew up, a sum of squares overflowing fp32), or the caller's
``found_inf`` flag is set, nothing is written:
params, moments, buffers and steps keep their values, ``skipped`` is incremented, all on the device
(no host synchronisation). The returned 0-d fp32 flag is 1 for a step taken, 0 for a skipped one.

**Kernels** (one launch each over every tensor of a dtype group):

1. partials: the new moments, ``a`` and ``q`` in registers (nothing written), per-chunk
   ``(sum a^2, sum q^2)``;
2. per-tensor norms (``multi_tensor.launch_segment_norms``: two-level, fixed order, bit-reproducible);
3. verdict (one program): ``ok`` = every norm finite and not ``found_inf``; ``skipped += 1 - ok``;
   ``step += ok``;
4. apply: recompute the moments and ``q`` from the old state (not yet written), store ``m``, ``v``,
   ``buf`` and ``w``.

Bytes per fp32 parameter: pass 1 reads g, P, m, v (+ buf) = 16 (20); pass 4 reads w, g, P, m, v (+ buf)
and writes w, m, v (+ buf) = 32 (40): 48 (60) in all, against AdamW's 28 (read w, g, m, v, write w, m,
v) -- recomputing the moments costs one more read of g, m, v and P instead of a scratch buffer.

Precision: as ``multi_tensor`` (bias corrections by ``inv_bias_correction``, correctly rounded square
roots and divisions, ``div_rn``/``sqrt_rn``).

Tensors the step writes (params, exp_avgs, exp_avg_sqs, momentum_buffers, steps, skipped) must not
share memory with each other or with a gradient or direction: ``aliasing.check_no_overlap`` raises a
ValueError naming the two entries. ``grads`` and ``directions`` may share memory (a tensor that is not
preconditioned passes its gradient as both).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from kfopt.autotune import Config, shape_bucket

from .aliasing import check_no_overlap
from .checks import check_contiguous, check_dtype, check_kernel_dtypes, check_same_device
from .dispatch import use_triton
from .multi_tensor import (
    FP32_MAX,
    REDUCE_BLOCK,
    TensorTable,
    chunked_configs,
    inv_bias_correction,
    launch_chunks,
    launch_segment_norms,
    per_tensor,
    program_chunk,
)
from .op_declaration import HyperparameterError, log_decay

#: First-order methods whose step size a direction can take, by name ("none": no grafting, not a
#: kernel mode: the optimizers keep their own step).
GRAFTS = {"adam": 0, "rmsprop": 1, "sgd": 2}

# addr table columns and hyper table columns (LN_Bk = ln(b_k), formed in float64 on the host)
P, G, D, M, V, BUF, STEP = range(7)
N_COLS = 7
LR, B1, B2, EPS, WD, MOM, HAS_BUF, PRECONDITION, GRAFT, LN_B1, LN_B2 = range(11)
N_HYPER = 11

_P, _G, _D, _M, _V, _BUF, _STEP = (tl.constexpr(c) for c in (P, G, D, M, V, BUF, STEP))
_N_COLS = tl.constexpr(N_COLS)
_LR, _B1, _B2, _EPS, _WD, _MOM, _HAS_BUF, _PRECONDITION, _GRAFT, _LN_B1, _LN_B2 = (
    tl.constexpr(c) for c in (LR, B1, B2, EPS, WD, MOM, HAS_BUF, PRECONDITION, GRAFT, LN_B1, LN_B2))
_N_HYPER = tl.constexpr(N_HYPER)
_ADAM, _RMSPROP = tl.constexpr(GRAFTS["adam"]), tl.constexpr(GRAFTS["rmsprop"])

GRAFT_CONFIGS = chunked_configs("graft_step")


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _pointers(addr_ptr, tid, G_DT: tl.constexpr, D_DT: tl.constexpr):
    row = addr_ptr + tid * _N_COLS
    g_ptr = tl.load(row + _G).to(tl.pointer_type(G_DT))
    d_ptr = tl.load(row + _D).to(tl.pointer_type(D_DT))
    m_ptr = tl.load(row + _M).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + _V).to(tl.pointer_type(tl.float32))
    buf_ptr = tl.load(row + _BUF).to(tl.pointer_type(tl.float32))
    step_ptr = tl.load(row + _STEP).to(tl.pointer_type(tl.float32))
    return g_ptr, d_ptr, m_ptr, v_ptr, buf_ptr, step_ptr


@triton.jit
def _vectors(g_ptr, d_ptr, m_ptr, v_ptr, buf_ptr, offs, n, h, inv_bc1, inv_bc2):
    """New ``m``, ``v``, ``buf`` and the graft vector ``a`` and direction ``q`` at ``offs`` (< ``n``)."""
    b1 = tl.load(h + _B1)
    b2 = tl.load(h + _B2)
    eps = tl.load(h + _EPS)
    mom = tl.load(h + _MOM)
    has_buf = tl.load(h + _HAS_BUF) != 0
    pre = tl.load(h + _PRECONDITION) != 0
    graft = tl.load(h + _GRAFT).to(tl.int32)
    mask = offs < n
    n_pre = tl.where(pre, n, 0)
    n_buf = tl.where(has_buf, n_pre, 0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = b1 * tl.load(m_ptr + offs, mask=mask, other=0.0) + (1.0 - b1) * g
    v = b2 * tl.load(v_ptr + offs, mask=mask, other=0.0) + (1.0 - b2) * g * g
    rms = tl.sqrt_rn(v * inv_bc2) + eps
    scaled = tl.div_rn(tl.where(graft == _ADAM, m * inv_bc1, g), rms)
    a = tl.where((graft == _ADAM) | (graft == _RMSPROP), scaled, g)
    p_dir = tl.load(d_ptr + offs, mask=offs < n_pre, other=0.0).to(tl.float32)
    buf = mom * tl.load(buf_ptr + offs, mask=offs < n_buf, other=0.0) + p_dir
    q = tl.where(has_buf, buf, p_dir)
    return m, v, buf, a, q


@triton.jit
def _graft_partials_kernel(
    addr_ptr, numel_ptr, chunk_tensor_ptr, chunk_start_ptr, hyper_ptr, partial_ptr,
    G_DT: tl.constexpr, D_DT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    """Pass 1: partial[k] = (sum a^2, sum q^2) over chunk k; writes nothing else."""
    pid, tid, start, n = program_chunk(chunk_tensor_ptr, chunk_start_ptr, numel_ptr)
    g_ptr, d_ptr, m_ptr, v_ptr, buf_ptr, step_ptr = _pointers(addr_ptr, tid, G_DT, D_DT)
    h = hyper_ptr + tid * _N_HYPER
    t = tl.load(step_ptr) + 1.0
    inv_bc1 = inv_bias_correction(t, tl.load(h + _LN_B1))
    inv_bc2 = inv_bias_correction(t, tl.load(h + _LN_B2))
    a_sq = tl.zeros([BLOCK], tl.float32)
    q_sq = tl.zeros([BLOCK], tl.float32)
    for off in range(0, tl.minimum(n - start, CHUNK), BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        mask = offs < n
        m, v, buf, a, q = _vectors(g_ptr, d_ptr, m_ptr, v_ptr, buf_ptr, offs, n, h, inv_bc1, inv_bc2)
        a_sq += tl.where(mask, a * a, 0.0)
        q_sq += tl.where(mask, q * q, 0.0)
    tl.store(partial_ptr + pid * 2, tl.sum(a_sq, axis=0))
    tl.store(partial_ptr + pid * 2 + 1, tl.sum(q_sq, axis=0))


@triton.jit
def _graft_verdict_kernel(
    norms_ptr, n_tensors, addr_ptr, ok_ptr, skipped_ptr, found_inf_ptr,
    HAS_SKIPPED: tl.constexpr, HAS_FOUND_INF: tl.constexpr, RBLOCK: tl.constexpr,
):
    """ok = every ||a||, ||q|| finite [and found_inf == 0]; skipped += 1 - ok; step_i += ok (one program)."""
    bad = tl.zeros([RBLOCK], tl.float32)
    for off in range(0, n_tensors, RBLOCK):
        idx = off + tl.arange(0, RBLOCK)
        mask = idx < n_tensors
        na = tl.load(norms_ptr + idx * 2, mask=mask, other=0.0)
        nq = tl.load(norms_ptr + idx * 2 + 1, mask=mask, other=0.0)
        finite = (tl.abs(na) <= FP32_MAX) & (tl.abs(nq) <= FP32_MAX)  # False for NaN
        bad += tl.where(finite, 0.0, 1.0)
    ok = tl.sum(bad, axis=0) == 0
    if HAS_FOUND_INF:
        ok = ok & (tl.load(found_inf_ptr) == 0)
    ok = ok.to(tl.float32)
    tl.store(ok_ptr, ok)
    if HAS_SKIPPED:
        tl.store(skipped_ptr, tl.load(skipped_ptr) + 1 - ok.to(tl.int32))
    for off in range(0, n_tensors, RBLOCK):
        idx = off + tl.arange(0, RBLOCK)
        mask = idx < n_tensors
        step_ptrs = tl.load(addr_ptr + idx * _N_COLS + _STEP, mask=mask, other=0).to(tl.pointer_type(tl.float32))
        tl.store(step_ptrs, tl.load(step_ptrs, mask=mask, other=0.0) + ok, mask=mask)


@triton.jit
def _graft_apply_kernel(
    addr_ptr, numel_ptr, chunk_tensor_ptr, chunk_start_ptr, hyper_ptr, norms_ptr, ok_ptr,
    P_DT: tl.constexpr, G_DT: tl.constexpr, D_DT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    """Pass 4: moments, buffer and ``w <- w - lr (d + wd w)``, d = (||a|| / ||q||) q or a."""
    pid, tid, start, n = program_chunk(chunk_tensor_ptr, chunk_start_ptr, numel_ptr)
    p_ptr = tl.load(addr_ptr + tid * _N_COLS + _P).to(tl.pointer_type(P_DT))
    g_ptr, d_ptr, m_ptr, v_ptr, buf_ptr, step_ptr = _pointers(addr_ptr, tid, G_DT, D_DT)
    h = hyper_ptr + tid * _N_HYPER
    t = tl.load(step_ptr)  # already advanced by the verdict (read only when the step is taken)
    inv_bc1 = inv_bias_correction(t, tl.load(h + _LN_B1))
    inv_bc2 = inv_bias_correction(t, tl.load(h + _LN_B2))
    lr = tl.load(h + _LR)
    wd = tl.load(h + _WD)
    pre = tl.load(h + _PRECONDITION) != 0
    has_buf = tl.load(h + _HAS_BUF) != 0
    a_norm = tl.load(norms_ptr + tid * 2)
    q_norm = tl.load(norms_ptr + tid * 2 + 1)
    scale = tl.where(q_norm > 0, tl.div_rn(a_norm, tl.where(q_norm > 0, q_norm, 1.0)), 0.0)
    n = tl.where(tl.load(ok_ptr) != 0, n, 0)  # a skipped step reads and writes nothing
    for off in range(0, tl.minimum(n - start, CHUNK), BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        mask = offs < n
        m, v, buf, a, q = _vectors(g_ptr, d_ptr, m_ptr, v_ptr, buf_ptr, offs, n, h, inv_bc1, inv_bc2)
        d = tl.where(pre, scale * q, a)
        w = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        tl.store(buf_ptr + offs, buf, mask=offs < tl.where(has_buf, tl.where(pre, n, 0), 0))
        tl.store(p_ptr + offs, (w - lr * (d + wd * w)).to(P_DT), mask=mask)


# ----------------------------------------------------------------------------- launcher


def _graft_hyper(n, momentum_buffers, lr, beta1, beta2, graft_eps, weight_decay, momentum, graft,
                 precondition) -> list[list[float]]:
    cols = [per_tensor(name, value, n) for name, value in (
        ("lr", lr), ("beta1", beta1), ("beta2", beta2), ("graft_eps", graft_eps), ("weight_decay", weight_decay),
        ("momentum", momentum), ("graft", graft), ("precondition", precondition))]
    rows = []
    for i, ((lr_i, b1, b2, eps, wd, mom, gr, pre), buf) in enumerate(zip(zip(*cols), momentum_buffers)):
        try:
            ln_b1, ln_b2 = log_decay("beta1", float(b1)), log_decay("beta2", float(b2))
        except HyperparameterError as e:
            given = beta1 if e.field == "beta1" else beta2
            raise ValueError(f"{e.field}[{i}]: {e.message}" if isinstance(given, (list, tuple)) else str(e)) from None
        if gr not in GRAFTS:
            raise ValueError(f"graft[{i}]: expected one of {sorted(GRAFTS)}, got {gr!r}")
        for name, value in (("lr", lr_i), ("graft_eps", eps), ("weight_decay", wd), ("momentum", mom)):
            if not float(value) >= 0.0:
                raise ValueError(f"{name}[{i}]: expected a number >= 0, got {value!r}")
        if not float(eps) > 0.0:
            raise ValueError(f"graft_eps[{i}]: expected a number > 0, got {eps!r}")
        if buf is None and float(mom) != 0.0:
            raise ValueError(f"momentum_buffers[{i}] is None but momentum[{i}] = {mom!r}: a momentum needs a buffer")
        rows.append([float(lr_i), float(b1), float(b2), float(eps), float(wd), float(mom), float(buf is not None),
                     float(bool(pre)), float(GRAFTS[gr]), ln_b1, ln_b2])
    return rows


def _check_shapes(params, grads, directions, exp_avgs, exp_avg_sqs, momentum_buffers, steps) -> None:
    n = len(params)
    for name, seq in (("grads", grads), ("directions", directions), ("exp_avgs", exp_avgs),
                      ("exp_avg_sqs", exp_avg_sqs), ("momentum_buffers", momentum_buffers), ("steps", steps)):
        if len(seq) != n:
            raise ValueError(f"{name}: expected {n} tensors, got {len(seq)}")
    for i, (p, g, d, m, v, b, s) in enumerate(zip(params, grads, directions, exp_avgs, exp_avg_sqs,
                                                   momentum_buffers, steps)):
        for name, t in ((f"grads[{i}]", g), (f"directions[{i}]", d), (f"exp_avgs[{i}]", m),
                        (f"exp_avg_sqs[{i}]", v), (f"momentum_buffers[{i}]", b)):
            if t is not None and t.shape != p.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
        if s.numel() != 1:
            raise ValueError(f"steps[{i}]: expected a one-element tensor, got shape {tuple(s.shape)}")


def graft_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    directions: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor | None],
    steps: Sequence[torch.Tensor],
    *,
    lr,
    beta1=0.9,
    beta2=0.999,
    graft_eps=1e-8,
    weight_decay=0.0,
    momentum=0.0,
    graft="adam",
    precondition=True,
    skipped: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> torch.Tensor:
    """One grafted step over all tensors, in place (module docstring for the math).

    ``grads``: the raw gradients; ``directions``: the preconditioned gradients ``P`` (read only where
    ``precondition`` is true; pass the gradient where it is not). Hyperparameters are scalars or one
    value per tensor; ``graft`` is "adam", "rmsprop" or "sgd". ``momentum_buffers[i]`` None: no
    buffer (``momentum[i]`` must be 0). ``params`` fp32/bf16/fp16 of any layout (non-contiguous ones
    are updated through a contiguous copy), ``grads``/``directions`` fp32/bf16/fp16 of the params'
    shape; ``exp_avgs``, ``exp_avg_sqs``, ``momentum_buffers`` contiguous fp32 of the params' shape
    (float64 on the reference path); ``steps`` 0-d fp32 counts of completed steps; ``skipped`` an
    optional 0-d int32 counter; ``found_inf`` an optional 0-d device flag from the caller's own checks
    (nonzero: skip the step, counted in ``skipped``, e.g. a GradScaler's or non-finite statistics).
    Returns the step's 0-d fp32 ``ok`` flag (device tensor). ValueError
    naming the argument for bad hyperparameters, shapes, or tensors the step writes sharing memory.
    """
    _check_shapes(params, grads, directions, exp_avgs, exp_avg_sqs, momentum_buffers, steps)
    n = len(params)
    hyper = _graft_hyper(n, momentum_buffers, lr, beta1, beta2, graft_eps, weight_decay, momentum, graft,
                         precondition)
    if n == 0:
        return torch.ones(())
    device = params[0].device
    check_same_device(device, params=params, grads=grads, directions=directions, exp_avgs=exp_avgs,
                      exp_avg_sqs=exp_avg_sqs, momentum_buffers=momentum_buffers, steps=steps, skipped=skipped)
    if found_inf is not None:
        found_inf = found_inf.reshape(()).to(device=device, dtype=torch.float32, non_blocking=True)
    check_no_overlap([("params", params), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                      ("momentum_buffers", momentum_buffers), ("steps", steps), ("skipped", [skipped])],
                     [("grads", grads), ("directions", directions)])
    if not use_triton(device):
        return graft_step_reference(params, grads, directions, exp_avgs, exp_avg_sqs, momentum_buffers, steps,
                                    lr=lr, beta1=beta1, beta2=beta2, graft_eps=graft_eps, weight_decay=weight_decay,
                                    momentum=momentum, graft=graft, precondition=precondition, skipped=skipped,
                                    found_inf=found_inf)
    for i, (p, g, d, m, v, b, s) in enumerate(zip(params, grads, directions, exp_avgs, exp_avg_sqs,
                                                   momentum_buffers, steps)):
        check_kernel_dtypes(**{f"params[{i}]": p, f"grads[{i}]": g, f"directions[{i}]": d})
        for name, t in ((f"exp_avgs[{i}]", m), (f"exp_avg_sqs[{i}]", v), (f"momentum_buffers[{i}]", b),
                        (f"steps[{i}]", s)):
            if t is not None:
                check_dtype(name, t, (torch.float32,), "state")
                check_contiguous(name, t)
    work = [p if p.is_contiguous() else p.contiguous() for p in params]
    grads = [g.contiguous() for g in grads]
    directions = [d.contiguous() for d in directions]
    buffers = [b if b is not None else m for b, m in zip(momentum_buffers, exp_avgs)]  # placeholder: never read
    total = sum(p.numel() for p in params)

    def run(config: Config) -> torch.Tensor:
        table = TensorTable.build([work, grads, directions, exp_avgs, exp_avg_sqs, buffers, steps], hyper,
                                  config["CHUNK"], device, dtype_columns=(P, G, D))
        partial = torch.zeros((max(table.n_chunks, 1), 2), dtype=torch.float32, device=device)
        ok = torch.empty((), dtype=torch.float32, device=device)

        launch_chunks(_graft_partials_kernel, table, config, lambda lo, hi: (partial[lo:hi],))
        norms = launch_segment_norms(table, partial, ok, step_col=None)
        _graft_verdict_kernel[(1,)](norms, table.n, table.addr, ok, skipped if skipped is not None else ok,
                                    found_inf if found_inf is not None else ok, HAS_SKIPPED=skipped is not None,
                                    HAS_FOUND_INF=found_inf is not None, RBLOCK=REDUCE_BLOCK)
        launch_chunks(_graft_apply_kernel, table, config, lambda lo, hi: (norms, ok))
        return ok

    restore = [*work, *exp_avgs, *exp_avg_sqs, *[b for b in momentum_buffers if b is not None], *steps] + (
        [skipped] if skipped is not None else [])
    ok = GRAFT_CONFIGS.launch(device=device, bucket=shape_bucket(total), dtype=params[0].dtype, run=run,
                              restore=restore)
    for p, w in zip(params, work):
        if w is not p:
            p.copy_(w)
    return ok


# ----------------------------------------------------------------------------- reference


def graft_step_reference(params, grads, directions, exp_avgs, exp_avg_sqs, momentum_buffers, steps, *, lr,
                         beta1=0.9, beta2=0.999, graft_eps=1e-8, weight_decay=0.0, momentum=0.0, graft="adam",
                         precondition=True, skipped=None, found_inf=None) -> torch.Tensor:
    """Plain PyTorch grafted step (same contract as :func:`graft_step`). Math in fp32, or float64 when
    the params are float64 (the tests' reference); the bias corrections ``1 - b^t`` in float64."""
    _check_shapes(params, grads, directions, exp_avgs, exp_avg_sqs, momentum_buffers, steps)
    n = len(params)
    hyper = _graft_hyper(n, momentum_buffers, lr, beta1, beta2, graft_eps, weight_decay, momentum, graft,
                         precondition)
    if n == 0:
        return torch.ones(())
    results, norms = [], []
    for p, g, d, m, v, b, s, h in zip(params, grads, directions, exp_avgs, exp_avg_sqs, momentum_buffers, steps,
                                      hyper):
        dtype = torch.promote_types(p.dtype, torch.float32)
        g = g.to(dtype)
        t = s.to(torch.float64) + 1
        bc1, bc2 = (1 - h[B1] ** t).to(dtype), (1 - h[B2] ** t).to(dtype)
        m_new = h[B1] * m.to(dtype) + (1 - h[B1]) * g
        v_new = h[B2] * v.to(dtype) + (1 - h[B2]) * g * g
        rms = (v_new / bc2).sqrt() + h[EPS]
        a = {GRAFTS["adam"]: (m_new / bc1) / rms, GRAFTS["rmsprop"]: g / rms, GRAFTS["sgd"]: g}[int(h[GRAFT])]
        pre = bool(h[PRECONDITION])
        q = d.to(dtype) if pre else torch.zeros_like(a)
        buf_new = None
        if b is not None and pre:
            buf_new = h[MOM] * b.to(dtype) + q
            q = buf_new
        results.append((m_new, v_new, buf_new, a, q))
        norms.append((a.norm(), q.norm()))
    ok = torch.stack([torch.isfinite(x) for pair in norms for x in pair]).all()
    if found_inf is not None:
        ok = ok & (found_inf.reshape(()) == 0).to(ok.device)
    for p, m, v, b, s, h, (m_new, v_new, buf_new, a, q), (a_norm, q_norm) in zip(
            params, exp_avgs, exp_avg_sqs, momentum_buffers, steps, hyper, results, norms):
        dtype = torch.promote_types(p.dtype, torch.float32)
        if h[PRECONDITION]:
            d = q * torch.where(q_norm > 0, a_norm / torch.where(q_norm > 0, q_norm, 1), 0)
        else:
            d = a
        w = p.to(dtype)
        w_new = w - h[LR] * (d + h[WD] * w)
        m.copy_(torch.where(ok, m_new, m.to(dtype)))
        v.copy_(torch.where(ok, v_new, v.to(dtype)))
        if buf_new is not None:
            b.copy_(torch.where(ok, buf_new, b.to(dtype)))
        p.copy_(torch.where(ok, w_new, w))
        s.add_(ok.to(s.dtype))
    if skipped is not None:
        skipped.add_((~ok).to(skipped.dtype))
    return ok.to(torch.float32)
