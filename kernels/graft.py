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
with the preconditioner's direction). ``a`` and the ratio ``||a|| / ||q||`` are :func:`graft_vector` and
:func:`graft_ratio`, which SONew's in-kernel graft (``kernels.sonew``) calls too (``docs/grafting.md``).

**Shards** (FSDP2: ``reduce``, an in-place SUM all-reduce over the shard group). When each tensor passed
is this rank's dim-0 shard of a larger one (possibly empty), the per-tensor sums of squares
``(sum a^2, sum q^2)`` of every shard are summed by ``reduce`` (one collective of ``2 T`` fp32 values for
``T`` tensors) before the square roots: the norms, the ratios ``||a|| / ||q||`` and the verdict below are
those of the whole tensors, identical on every shard (a non-finite value in one shard makes the summed
norm non-finite on all of them). The caller's ``found_inf`` must already be the same on every shard.

**Non-finite updates.** When any tensor's ``||a||`` or ``||q||`` is not finite (a NaN/inf gradient or
preconditioned gradient, a factor that blew up, a sum of squares overflowing fp32), or the caller's
``found_inf`` flag is set, nothing is written:
params, moments, buffers and steps keep their values, ``skipped`` is incremented, all on the device
(no host synchronisation). The returned 0-d fp32 flag is 1 for a step taken, 0 for a skipped one.

**Kernels** (one launch each over every tensor of a dtype group):

1. partials: the new moments, ``a`` and ``q`` in registers (nothing written), per-chunk
   ``(sum a^2, sum q^2)``;
2. per-tensor norms (``multi_tensor.launch_segment_norms``: two-level, fixed order, bit-reproducible;
   with ``reduce`` the sums of squares all-reduced before the square roots);
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

:data:`GRAFT` declares the op (``op_declaration``): :class:`GraftHyperparameters` is the kernels'
hyperparameter table, its tensors and their checks, and :func:`graft_traffic`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import triton
import triton.language as tl

from kfopt.autotune import Config, shape_bucket

from .multi_tensor import (
    FP32_MAX,
    REDUCE_BLOCK,
    chunked_configs,
    inv_bias_correction,
    launch_chunks,
    launch_segment_norms,
    program_chunk,
    tensor_norms_reference,
)
from .op_declaration import (
    Call,
    ElementwiseOp,
    HyperparameterError,
    Hyperparameters,
    TensorArg,
    Traffic,
    like_param,
    log_decay,
    one_element,
    within,
)

#: First-order methods whose step size a direction can take, by their number in the kernels' tables.
#: One table for :func:`graft_step` and SONew's in-kernel graft (``kernels.sonew``), which adds "none"
#: (0: no grafting, the preconditioned direction as it is; for ``graft_step`` not a kernel mode: the
#: optimizers keep their own step).
GRAFTS = {"adam": 1, "rmsprop": 2, "sgd": 3}


@dataclass(frozen=True)
class GraftHyperparameters(Hyperparameters):
    """One tensor's grafting hyperparameters; the fields in order are the columns of the kernels' table.
    ``graft`` is stored as its number in :data:`GRAFTS`; ``has_buffer`` is whether the tensor's
    ``momentum_buffers`` entry is a tensor (None: no buffer, ``momentum`` must be 0). Numbers outside
    their ranges are a ValueError (tensor values skip the step, ``op_declaration``)."""

    lr: float = field(metadata=within("[0, inf)"))
    beta1: float = field(default=0.9, metadata=within("[0, 1)"))
    beta2: float = field(default=0.999, metadata=within("[0, 1)"))
    graft_eps: float = field(default=1e-8, metadata=within("(0, inf)"))
    weight_decay: float = field(default=0.0, metadata=within("[0, inf)"))
    momentum: float = field(default=0.0, metadata=within("[0, inf)"))
    has_buffer: bool = field(default=True, metadata={"from_tensors": True})
    precondition: bool = True
    graft: str = field(default="adam", metadata={"choices": GRAFTS})
    ln_beta1: float = field(init=False)
    ln_beta2: float = field(init=False)

    def derive(self) -> dict:
        ln_beta1, ln_beta2 = log_decay("beta1", self.beta1), log_decay("beta2", self.beta2)
        self.check_ranges()
        if not self.has_buffer and (isinstance(self.momentum, torch.Tensor) or self.momentum != 0.0):
            raise HyperparameterError("momentum_buffers", f"None (no buffer) but momentum = {self.momentum!r}: "
                                                          "a momentum needs a buffer")
        return dict(ln_beta1=ln_beta1, ln_beta2=ln_beta2)


def graft_traffic(shapes: Sequence[tuple], dtype: torch.dtype, buffers: Sequence[bool] | None = None,
                  grad_dtype: torch.dtype | None = None, direction_dtype: torch.dtype | None = None) -> Traffic:
    """One call on fp32 state, every tensor preconditioned (``buffers[i]``: tensor i has a momentum
    buffer; default none): pass 1 (g, P, m, v (+ buf) read) + pass 4 (w, g, P, m, v (+ buf) read; w, m, v
    (+ buf) written) = 2 s_p + 2 s_g + 2 s_P + 24 (+ 12) bytes per parameter: 48 (60) fp32. About 40
    flops per parameter (the moments, ``a`` and ``q`` twice, the norms and the update)."""
    s_p = torch.finfo(dtype).bits // 8
    s_g = torch.finfo(grad_dtype or dtype).bits // 8
    s_d = torch.finfo(direction_dtype or dtype).bits // 8
    buffers = [False] * len(shapes) if buffers is None else buffers
    per_param = 2 * (s_p + s_g + s_d) + 24
    total = sum(math.prod(s) * (per_param + (12 if b else 0)) for s, b in zip(shapes, buffers, strict=True))
    return Traffic(bytes=total, flops=40 * sum(math.prod(s) for s in shapes))


GRAFT = ElementwiseOp(
    "graft_step", GraftHyperparameters,
    (TensorArg("params", written=True),
     TensorArg("grads", written=False, shape=like_param),
     TensorArg("directions", written=False, shape=like_param),
     TensorArg("exp_avgs", written=True, state=True, shape=like_param, layout="contiguous"),
     TensorArg("exp_avg_sqs", written=True, state=True, shape=like_param, layout="contiguous"),
     TensorArg("momentum_buffers", written=True, state=True, shape=like_param, layout="contiguous", optional=True),
     TensorArg("steps", written=True, state=True, shape=one_element, layout="contiguous")),
    graft_traffic,
    dtype_columns=3,
)
A = GRAFT.addr
H = GRAFT.hyper

_ADAM, _RMSPROP, _SGD = (tl.constexpr(GRAFTS[k]) for k in ("adam", "rmsprop", "sgd"))

GRAFT_CONFIGS = chunked_configs("graft_step")


# ----------------------------------------------------------------------------- the graft's math, shared
# graft_step's kernels below and SONew's direction and apply kernels (kernels.sonew) compute the graft
# vector and the ratio with these two functions; their references with the two after them.


@triton.jit
def graft_vector(graft, g, m, v, inv_bc1, inv_bc2, eps):
    """The graft vector ``a`` of graft number ``graft`` (:data:`GRAFTS`) from the gradient ``g`` and the new
    moments ``m``, ``v`` (fp32): ``m^ / (sqrt(v^) + eps)`` ("adam"), ``g / (sqrt(v^) + eps)`` ("rmsprop"),
    ``g`` ("sgd"), 0 for any other number (SONew's "none"); ``m^ = m inv_bc1``, ``v^ = v inv_bc2``. One
    square root and one division, both correctly rounded."""
    rms = tl.sqrt_rn(v * inv_bc2) + eps
    scaled = tl.div_rn(tl.where(graft == _RMSPROP, g, m * inv_bc1), rms)
    return tl.where((graft == _ADAM) | (graft == _RMSPROP), scaled, tl.where(graft == _SGD, g, 0.0))


@triton.jit
def graft_ratio(a_norm, q_norm):
    """The scale ``||a|| / ||q||`` of the direction ``q``, 0 where ``||q|| = 0`` (correctly rounded)."""
    return tl.where(q_norm > 0, tl.div_rn(a_norm, tl.where(q_norm > 0, q_norm, 1.0)), 0.0)


def graft_vector_reference(graft: int, g: torch.Tensor, m_hat: torch.Tensor, v_hat: torch.Tensor,
                           eps: float) -> torch.Tensor | None:
    """:func:`graft_vector` in the reference's dtype from the bias-corrected moments (None for a number
    that is no graft: SONew's "none")."""
    if int(graft) == GRAFTS["sgd"]:
        return g
    if int(graft) not in (GRAFTS["adam"], GRAFTS["rmsprop"]):
        return None
    return (m_hat if int(graft) == GRAFTS["adam"] else g) / (v_hat.sqrt() + eps)


def graft_ratio_reference(a_norm: torch.Tensor, q_norm: torch.Tensor) -> torch.Tensor:
    """:func:`graft_ratio` on tensors."""
    return torch.where(q_norm > 0, a_norm / torch.where(q_norm > 0, q_norm, 1), 0)


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _pointers(addr_ptr, tid, G_DT: tl.constexpr, D_DT: tl.constexpr):
    row = addr_ptr + tid * A.width
    g_ptr = tl.load(row + A.grads).to(tl.pointer_type(G_DT))
    d_ptr = tl.load(row + A.directions).to(tl.pointer_type(D_DT))
    m_ptr = tl.load(row + A.exp_avgs).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + A.exp_avg_sqs).to(tl.pointer_type(tl.float32))
    buf_ptr = tl.load(row + A.momentum_buffers).to(tl.pointer_type(tl.float32))
    step_ptr = tl.load(row + A.steps).to(tl.pointer_type(tl.float32))
    return g_ptr, d_ptr, m_ptr, v_ptr, buf_ptr, step_ptr


@triton.jit
def _vectors(g_ptr, d_ptr, m_ptr, v_ptr, buf_ptr, offs, n, h, inv_bc1, inv_bc2):
    """New ``m``, ``v``, ``buf`` and the graft vector ``a`` and direction ``q`` at ``offs`` (< ``n``)."""
    b1 = tl.load(h + H.beta1)
    b2 = tl.load(h + H.beta2)
    eps = tl.load(h + H.graft_eps)
    mom = tl.load(h + H.momentum)
    has_buf = tl.load(h + H.has_buffer) != 0
    pre = tl.load(h + H.precondition) != 0
    graft = tl.load(h + H.graft).to(tl.int32)
    mask = offs < n
    n_pre = tl.where(pre, n, 0)
    n_buf = tl.where(has_buf, n_pre, 0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = b1 * tl.load(m_ptr + offs, mask=mask, other=0.0) + (1.0 - b1) * g
    v = b2 * tl.load(v_ptr + offs, mask=mask, other=0.0) + (1.0 - b2) * g * g
    a = graft_vector(graft, g, m, v, inv_bc1, inv_bc2, eps)
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
    h = hyper_ptr + tid * H.width
    t = tl.load(step_ptr) + 1.0
    inv_bc1 = inv_bias_correction(t, tl.load(h + H.ln_beta1))
    inv_bc2 = inv_bias_correction(t, tl.load(h + H.ln_beta2))
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
        step_ptrs = tl.load(addr_ptr + idx * A.width + A.steps, mask=mask, other=0).to(tl.pointer_type(tl.float32))
        tl.store(step_ptrs, tl.load(step_ptrs, mask=mask, other=0.0) + ok, mask=mask)


@triton.jit
def _graft_apply_kernel(
    addr_ptr, numel_ptr, chunk_tensor_ptr, chunk_start_ptr, hyper_ptr, norms_ptr, ok_ptr,
    P_DT: tl.constexpr, G_DT: tl.constexpr, D_DT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    """Pass 4: moments, buffer and ``w <- w - lr (d + wd w)``, d = (||a|| / ||q||) q or a."""
    pid, tid, start, n = program_chunk(chunk_tensor_ptr, chunk_start_ptr, numel_ptr)
    p_ptr = tl.load(addr_ptr + tid * A.width + A.params).to(tl.pointer_type(P_DT))
    g_ptr, d_ptr, m_ptr, v_ptr, buf_ptr, step_ptr = _pointers(addr_ptr, tid, G_DT, D_DT)
    h = hyper_ptr + tid * H.width
    t = tl.load(step_ptr)  # already advanced by the verdict (read only when the step is taken)
    inv_bc1 = inv_bias_correction(t, tl.load(h + H.ln_beta1))
    inv_bc2 = inv_bias_correction(t, tl.load(h + H.ln_beta2))
    lr = tl.load(h + H.lr)
    wd = tl.load(h + H.weight_decay)
    pre = tl.load(h + H.precondition) != 0
    has_buf = tl.load(h + H.has_buffer) != 0
    a_norm = tl.load(norms_ptr + tid * 2)
    q_norm = tl.load(norms_ptr + tid * 2 + 1)
    scale = graft_ratio(a_norm, q_norm)
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


def graft_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    directions: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor | None],
    steps: Sequence[torch.Tensor],
    *,
    skipped: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor], None] | None = None,
    **hyperparameters,
) -> torch.Tensor:
    """One grafted step over all tensors, in place (module docstring for the math).

    ``hyperparameters``: the fields of :class:`GraftHyperparameters` (``lr`` required; ``beta1``,
    ``beta2``, ``graft_eps``, ``weight_decay``, ``momentum``, ``precondition``, ``graft`` with its
    defaults), each a number or one per tensor; ``graft`` is "adam", "rmsprop" or "sgd".
    ``grads``: the raw gradients; ``directions``: the preconditioned gradients ``P`` (read only where
    ``precondition`` is true; pass the gradient where it is not). ``momentum_buffers[i]`` None: no
    buffer (``momentum[i]`` must be 0). ``params`` fp32/bf16/fp16 of any layout (non-contiguous ones
    are updated through a contiguous copy), ``grads``/``directions`` fp32/bf16/fp16 of the params'
    shape; ``exp_avgs``, ``exp_avg_sqs``, ``momentum_buffers`` contiguous fp32 of the params' shape
    (float64 on the reference path); ``steps`` 0-d fp32 counts of completed steps; ``skipped`` an
    optional 0-d int32 counter; ``found_inf`` an optional 0-d device flag from the caller's own checks
    (nonzero: skip the step, counted in ``skipped``, e.g. a GradScaler's or non-finite statistics).
    ``reduce``: the tensors are this rank's dim-0 shards of larger ones (module docstring, Shards): an
    in-place SUM all-reduce over the shard group of the per-tensor sums of squares. Returns the step's
    0-d fp32 ``ok`` flag (device tensor). Argument checks: :data:`GRAFT` (``kernels.checks``):
    ValueError naming the argument for bad hyperparameters, shapes, or tensors the step writes sharing
    memory.
    """
    call = _bind(params, grads, directions, exp_avgs, exp_avg_sqs, momentum_buffers, steps, hyperparameters,
                 skipped, found_inf)
    return _run(call, lambda c: _graft_reference(c, reduce), lambda c: _launch(c, reduce))


def _bind(params, grads, directions, exp_avgs, exp_avg_sqs, momentum_buffers, steps, hyperparameters, skipped,
          found_inf) -> Call:
    """:meth:`GRAFT.bind` with each tensor's ``has_buffer`` read off its ``momentum_buffers`` entry; the
    caller's ``found_inf`` flag (any dtype) as fp32."""
    if isinstance(found_inf, torch.Tensor) and not found_inf.is_floating_point():
        found_inf = found_inf.to(torch.float32)
    return GRAFT.bind((params, grads, directions, exp_avgs, exp_avg_sqs, momentum_buffers, steps), hyperparameters,
                      skipped=skipped, found_inf=found_inf,
                      from_tensors=lambda t: {"has_buffer": [b is not None for b in t["momentum_buffers"]]})


def _run(call: Call, reference, launch) -> torch.Tensor:
    """:meth:`GRAFT.run`, with the ``ok`` flag 1 for a call without tensors."""
    if call.device is None:
        return torch.ones(())
    return GRAFT.run(call, reference, launch)


def _launch(call: Call, reduce: Callable[[torch.Tensor], None] | None) -> torch.Tensor:
    """The Triton path of :func:`graft_step` (module docstring, Kernels)."""
    params, device, skipped, found_inf = call.tensors["params"], call.device, call.skipped, call.found_inf
    work = [p if p.is_contiguous() else p.contiguous() for p in params]
    written = {**call.tensors, "params": work}
    columns = {**written, "grads": [g.contiguous() for g in call.tensors["grads"]],
               "directions": [d.contiguous() for d in call.tensors["directions"]],
               "momentum_buffers": [b if b is not None else m  # placeholder: never read or written
                                    for b, m in zip(call.tensors["momentum_buffers"], call.tensors["exp_avgs"])]}

    def run(config: Config) -> torch.Tensor:
        table = GRAFT.table(columns, call.records, config["CHUNK"], device)
        partial = torch.zeros((max(table.n_chunks, 1), 2), dtype=torch.float32, device=device)
        ok = torch.empty((), dtype=torch.float32, device=device)

        launch_chunks(_graft_partials_kernel, table, config, lambda lo, hi: (partial[lo:hi],))
        norms = launch_segment_norms(table, partial, ok, step_col=None, reduce=reduce)
        _graft_verdict_kernel[(1,)](norms, table.n, table.addr, ok, skipped if skipped is not None else ok,
                                    found_inf if found_inf is not None else ok, HAS_SKIPPED=skipped is not None,
                                    HAS_FOUND_INF=found_inf is not None, RBLOCK=REDUCE_BLOCK)
        launch_chunks(_graft_apply_kernel, table, config, lambda lo, hi: (norms, ok))
        return ok

    ok = GRAFT_CONFIGS.launch(device=device, bucket=shape_bucket(sum(p.numel() for p in params)),
                              dtype=params[0].dtype, run=run, restore=GRAFT.restore(written, skipped))
    for p, w in zip(params, work):
        if w is not p:
            p.copy_(w)
    return ok


# ----------------------------------------------------------------------------- reference


def graft_step_reference(params, grads, directions, exp_avgs, exp_avg_sqs, momentum_buffers, steps, *,
                         skipped=None, found_inf=None, reduce=None, **hyperparameters) -> torch.Tensor:
    """Plain PyTorch grafted step with :func:`graft_step`'s arguments and contract. Math in fp32, or
    float64 when the params are float64 (the tests' reference); the bias corrections ``1 - b^t`` in
    float64."""
    call = _bind(params, grads, directions, exp_avgs, exp_avg_sqs, momentum_buffers, steps, hyperparameters,
                 skipped, found_inf)
    return _run(call, lambda c: _graft_reference(c, reduce), None)


def _graft_reference(call: Call, reduce: Callable[[torch.Tensor], None] | None) -> torch.Tensor:
    """The reference's math on a bound call (``reduce``: the shards' sums of squares summed)."""
    params, grads, directions, exp_avgs, exp_avg_sqs, momentum_buffers, steps = (
        call.tensors[a.name] for a in GRAFT.tensors)
    records = [r.on_host() for r in call.records]
    results = []
    for p, g, d, m, v, b, s, h in zip(params, grads, directions, exp_avgs, exp_avg_sqs, momentum_buffers, steps,
                                      records):
        dtype = torch.promote_types(p.dtype, torch.float32)
        g = g.to(dtype)
        t = s.to(torch.float64) + 1
        bc1, bc2 = (1 - h.beta1 ** t).to(dtype), (1 - h.beta2 ** t).to(dtype)
        m_new = h.beta1 * m.to(dtype) + (1 - h.beta1) * g
        v_new = h.beta2 * v.to(dtype) + (1 - h.beta2) * g * g
        a = graft_vector_reference(h.graft, g, m_new / bc1, v_new / bc2, h.graft_eps)
        pre = bool(h.precondition)
        q = d.to(dtype) if pre else torch.zeros_like(a)
        buf_new = None
        if b is not None and pre:
            buf_new = h.momentum * b.to(dtype) + q
            q = buf_new
        results.append((m_new, v_new, buf_new, a, q))
    norms = tensor_norms_reference([(a, q) for _, _, _, a, q in results], reduce)
    ok = torch.stack([torch.isfinite(x) for pair in norms for x in pair]).all()
    if call.found_inf is not None:
        ok = ok & (call.found_inf == 0).to(ok.device)
    for p, m, v, b, s, h, (m_new, v_new, buf_new, a, q), (a_norm, q_norm) in zip(
            params, exp_avgs, exp_avg_sqs, momentum_buffers, steps, records, results, norms):
        dtype = torch.promote_types(p.dtype, torch.float32)
        if h.precondition:
            d = q * graft_ratio_reference(a_norm, q_norm)
        else:
            d = a
        w = p.to(dtype)
        w_new = w - h.lr * (d + h.weight_decay * w)
        m.copy_(torch.where(ok, m_new, m.to(dtype)))
        v.copy_(torch.where(ok, v_new, v.to(dtype)))
        if buf_new is not None:
            b.copy_(torch.where(ok, buf_new, b.to(dtype)))
        p.copy_(torch.where(ok, w_new, w))
        s.add_(ok.to(s.dtype))
    if call.skipped is not None:
        call.skipped.add_((~ok).to(call.skipped.dtype))
    return ok.to(torch.float32)
