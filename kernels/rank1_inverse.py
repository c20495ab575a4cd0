r"""Sherman-Morrison updates of many inverse factors in one pipeline (MKOR; docs/mkor.md).

Each factor is the inverse ``J = L^{-1}`` of a running average ``L <- gamma L + (1 - gamma) v v^T``
(symmetric positive definite, ``L_0 = I``). It is stored as ``J = kappa * F``: ``F`` (the tensor
passed in ``factors``, fp32/bf16/fp16) and ``kappa`` (its fp32 entry of ``scales``). Per factor, with
``v`` its vector, ``gamma`` its decay, ``tau`` its stabiliser threshold and ``zeta`` its blend::

    stabilise:  J_b = I                          if F or kappa is not finite, or F == 0       (reset)
                J_b = zeta J + (1 - zeta) I      elif max|J_ij| = kappa max|F_ij| > tau        (blend)
                J_b = J                          otherwise
    update:     u = J_b v,   s = v^T u
                J <- J_b / gamma - beta u u^T,   beta = (1 - gamma) / (gamma (gamma + (1 - gamma) s))

which is exact Sherman-Morrison: ``J_new = (gamma L_b + (1 - gamma) v v^T)^{-1}`` for ``L_b = J_b^{-1}``.
Without a reset or blend, after k updates from ``J = I``, ``J = L_k^{-1}`` with
``L_k = gamma^k I + (1 - gamma) sum_{i<=k} gamma^(k-i) v_i v_i^T``.

Scale handling (no silent overflow in any storage dtype). The math is fp32 and never forms a quantity
that can leave the fp32 range for finite inputs: with ``nu = max_i |v_i|`` and ``w = v / nu``,
``p = F_b w`` and ``t = w^T p`` (``F_b = J_b / kappa_b``)::

    J_new = kappa_b [ F_b / gamma - c p p^T ],   c = (1 - gamma) / (gamma den),
    den   = gamma / (kappa_b nu^2) + (1 - gamma) t

(``nu^2`` overflowing only sends the first term of ``den`` to 0). The new factor is stored normalised,
``F <- F_b / m_b - beta' p p^T`` with ``beta' = (1 - gamma) / (den m_b)`` and
``kappa <- kappa_b m_b / gamma``, where ``m_b`` bounds ``max|F_b|`` (``max|F|``; ``zeta max|F| +
(1 - zeta) / kappa`` when blending; 1 after a reset). Since ``J_new <= J_b / gamma`` (positive
semi-definite order), ``max|F| <= 1`` after every update: 16-bit storage cannot overflow, and the
overall scale of ``J`` (which grows like ``gamma^-k`` along directions no vector refreshes, or shrinks
like ``1 / |v|^2``) lives in the fp32 ``kappa``. What fp16/bf16 storage still limits is the dynamic
range *within* a factor (its condition number), as for any 16-bit matrix.

Precision limit: the update forms ``F_b / m_b - beta' p p^T`` by a subtraction. Along a direction
that one update shrinks by more than about 1/eps of the storage dtype (fp32: ~1e7; fp16: ~1e3; bf16:
~1e2), the new value there is rounding noise of size ``eps max|F|``: the limit of storing a matrix
of that condition number in that dtype at all. In preconditioning this acts as damping; if the noise
later makes the factor indefinite along a vector, the factor is reset (below).

Safety (decided on the device per factor, counted in ``counts``, no host synchronisation):

* ``v`` with a NaN/inf entry: the factor is not updated (``counts[:, 2] += 1``); an ``F`` that is
  itself non-finite is still reset to ``I``.
* reset (``counts[:, 1] += 1``): ``F`` or ``kappa`` not finite, ``F == 0``, or ``J_b`` found
  numerically indefinite along ``v``: ``den <= 0`` (NaN included), ``t < 0``, or
  ``|p|^2 > 2 d m_b t`` (positive definiteness implies ``|F_b w|^2 <= lambda_max t <= d m_b t``).
  ``J_b = I`` then, and the update is applied to it.
* blend: ``counts[:, 0] += 1``.
* ``v == 0`` (``nu`` below the smallest normal fp32 counts as 0): the exact update ``J <- J_b / gamma``.

Launches (all factors of every size and dtype; one launch per (vector dtype, factor dtype) class for
the two passes over ``F``): a factor of side d is cut into ``cdiv(d, ROWS)`` row chunks (the
``kernels.multi_tensor`` chunk table, one program per chunk)::

    pass 1 (_matvec)        p[rows] = F[rows, :] w, and per chunk: partial t, |w|^2, |p|^2,
                            max|F|, #non-finite(F), nu, #non-finite(v)
    coefficients            one program per factor: reduce its chunks in order, decide
                            plain/blend/reset/skip, write (A, C, a, c, beta', 1/nu, write) and kappa
    pass 2 (_apply)         F[rows, :] <- A F + C I - beta' (a p + c w)_rows (a p + c w)^T

Cost per factor of side d, storage size s bytes: compulsory ``3 d^2 s`` bytes (F read twice,
written once) plus O(d) vectors (each program re-reads ``v``, and in pass 2 ``p``, from L2: about
``2 d`` elements per chunk in each pass); flops ``2 d^2`` (pass 1) + ``4 d^2`` (pass 2).
Results are deterministic (no atomics; reductions in a fixed order), hence identical on every rank
that applies the same update. ``F`` must be symmetric (it stays exactly symmetric); only the update's
math, not the symmetry, is exploited.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
import triton
import triton.language as tl

from kfopt.autotune import Config, ConfigSpace, shape_bucket

from .aliasing import check_no_overlap
from .checks import check_contiguous, check_dtype, check_kernel_dtype, check_same_device, check_shape, check_tensor
from .dispatch import store_needs_rounding, tl_dtype, use_triton
from .multi_tensor import FP32_MAX, REDUCE_BLOCK, TensorTable, per_tensor

#: smallest normal fp32: a vector whose largest entry is below it counts as zero
FP32_TINY = tl.constexpr(1.1754943508222875e-38)

# columns of the address table, the per-factor hyperparameters, the chunk partials, the coefficients
VEC, FAC = (tl.constexpr(i) for i in range(2))
DECAY, THRESHOLD, BLEND = (tl.constexpr(i) for i in range(3))
P_T, P_WW, P_PP, P_MAX, P_BAD, P_NU, P_VBAD, N_PARTIAL = (tl.constexpr(i) for i in range(8))
C_A, C_C, C_AP, C_CW, C_BETA, C_INV_NU, C_WRITE, N_COEF = (tl.constexpr(i) for i in range(8))

RANK1_CONFIGS = ConfigSpace(
    "rank1_inverse_update",
    [
        Config({"ROWS": rows, "BLOCK_C": block_c}, num_warps=warps)
        for rows in (4, 8, 16, 32)
        for block_c in (128, 256, 512)
        for warps in (4, 8)
    ],
    default=Config({"ROWS": 16, "BLOCK_C": 128}, num_warps=4),
)


@triton.jit
def _scaled_vector(v_ptr, cols, d, inv_nu):
    """``w = v / nu`` at ``cols`` (0 outside ``[0, d)``), fp32."""
    return tl.load(v_ptr + cols, mask=cols < d, other=0.0).to(tl.float32) * inv_nu


@triton.jit
def _matvec_kernel(
    addr_ptr, numel_ptr, chunk_tensor_ptr, chunk_start_ptr, p_ptr, partial_ptr, first_chunk,
    V_DT: tl.constexpr, F_DT: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Pass 1 for one chunk of rows: ``p[rows] = F[rows, :] w`` and the chunk's partials."""
    k = first_chunk + tl.program_id(0)
    fid = tl.load(chunk_tensor_ptr + k)
    r0 = tl.load(chunk_start_ptr + k)
    d = tl.load(numel_ptr + fid)
    v_ptr = tl.load(addr_ptr + fid * 2 + VEC).to(tl.pointer_type(V_DT))
    f_ptr = tl.load(addr_ptr + fid * 2 + FAC).to(tl.pointer_type(F_DT))

    vmax = tl.zeros([BLOCK_C], tl.float32)
    vbad = tl.zeros([BLOCK_C], tl.float32)
    for c in range(0, d, BLOCK_C):
        cols = c + tl.arange(0, BLOCK_C)
        v = tl.load(v_ptr + cols, mask=cols < d, other=0.0).to(tl.float32)
        finite = tl.abs(v) <= FP32_MAX
        vmax = tl.maximum(vmax, tl.where(finite, tl.abs(v), 0.0))
        vbad += tl.where(finite, 0.0, 1.0)
    nu = tl.max(vmax, axis=0)
    nu = tl.where(nu >= FP32_TINY, nu, 0.0)
    inv_nu = tl.where(nu > 0, 1.0 / nu, 0.0)

    rows = r0 + tl.arange(0, ROWS)
    row_ok = rows < d
    row_offs = rows.to(tl.int64) * d
    acc = tl.zeros([ROWS, BLOCK_C], tl.float32)
    fmax = tl.zeros([ROWS, BLOCK_C], tl.float32)
    fbad = tl.zeros([ROWS, BLOCK_C], tl.float32)
    for c in range(0, d, BLOCK_C):
        cols = c + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (cols[None, :] < d)
        f = tl.load(f_ptr + row_offs[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        w = _scaled_vector(v_ptr, cols, d, inv_nu)
        acc += f * w[None, :]
        finite = tl.abs(f) <= FP32_MAX
        fmax = tl.maximum(fmax, tl.where(finite, tl.abs(f), 0.0))
        fbad += tl.where(finite, 0.0, 1.0)
    p = tl.sum(acc, axis=1)
    w_rows = _scaled_vector(v_ptr, rows, d, inv_nu)
    tl.store(p_ptr + k * ROWS + tl.arange(0, ROWS), p, mask=row_ok)
    out = partial_ptr + k * N_PARTIAL
    tl.store(out + P_T, tl.sum(w_rows * p, axis=0))
    tl.store(out + P_WW, tl.sum(w_rows * w_rows, axis=0))
    tl.store(out + P_PP, tl.sum(tl.where(row_ok, p * p, 0.0), axis=0))
    tl.store(out + P_MAX, tl.max(tl.max(fmax, axis=1), axis=0))
    tl.store(out + P_BAD, tl.sum(tl.sum(fbad, axis=1), axis=0))
    tl.store(out + P_NU, nu)
    tl.store(out + P_VBAD, tl.sum(vbad, axis=0))


@triton.jit
def _coefficients_kernel(
    numel_ptr, bounds_ptr, hyper_ptr, partial_ptr, scales_ptr, counts_ptr, coef_ptr,
    HAS_COUNTS: tl.constexpr, RBLOCK: tl.constexpr,
):
    """One factor: reduce its chunks' partials, choose plain/blend/reset/skip, write the coefficients
    of pass 2 and the new scale (module docstring)."""
    fid = tl.program_id(0)
    lo = tl.load(bounds_ptr + fid * 2)
    hi = tl.load(bounds_ptr + fid * 2 + 1)
    d = tl.load(numel_ptr + fid).to(tl.float32)
    t_acc = tl.zeros([RBLOCK], tl.float32)
    ww_acc = tl.zeros([RBLOCK], tl.float32)
    pp_acc = tl.zeros([RBLOCK], tl.float32)
    max_acc = tl.zeros([RBLOCK], tl.float32)
    bad_acc = tl.zeros([RBLOCK], tl.float32)
    for off in range(lo, hi, RBLOCK):
        idx = off + tl.arange(0, RBLOCK)
        mask = idx < hi
        row = partial_ptr + idx * N_PARTIAL
        t_acc += tl.load(row + P_T, mask=mask, other=0.0)
        ww_acc += tl.load(row + P_WW, mask=mask, other=0.0)
        pp_acc += tl.load(row + P_PP, mask=mask, other=0.0)
        max_acc = tl.maximum(max_acc, tl.load(row + P_MAX, mask=mask, other=0.0))
        bad_acc += tl.load(row + P_BAD, mask=mask, other=0.0)
    t = tl.sum(t_acc, axis=0)
    ww = tl.sum(ww_acc, axis=0)
    pp = tl.sum(pp_acc, axis=0)
    m = tl.max(max_acc, axis=0)
    nu = tl.load(partial_ptr + lo * N_PARTIAL + P_NU)
    vec_ok = tl.load(partial_ptr + lo * N_PARTIAL + P_VBAD) == 0
    gamma = tl.load(hyper_ptr + fid * 3 + DECAY)
    tau = tl.load(hyper_ptr + fid * 3 + THRESHOLD)
    zeta = tl.load(hyper_ptr + fid * 3 + BLEND)
    kappa = tl.load(scales_ptr + fid)

    state_ok = (tl.sum(bad_acc, axis=0) == 0) & (m > 0) & (kappa > 0) & (kappa <= FP32_MAX)
    blend = state_ok & (kappa * m > tau)
    a = tl.where(blend, zeta, 1.0)  # F_b = a F + c I
    c = tl.where(blend, (1.0 - zeta) / kappa, 0.0)
    t_b = a * t + c * ww
    pp_b = a * a * pp + 2.0 * a * c * t + c * c * ww
    m_b = a * m + c
    has_nu = nu > 0
    den = tl.where(has_nu, gamma / (kappa * nu) / nu + (1.0 - gamma) * t_b, 1.0)
    definite = (den > 0) & (t_b >= 0) & (pp_b <= 2.0 * d * m_b * t_b)
    reset = (~state_ok) | (vec_ok & ~definite)
    a = tl.where(reset, 0.0, a)
    c = tl.where(reset, 1.0, c)
    kappa_b = tl.where(reset, 1.0, kappa)
    m_b = tl.where(reset, 1.0, m_b)
    t_b = tl.where(reset, ww, t_b)
    den = tl.where(has_nu, gamma / (kappa_b * nu) / nu + (1.0 - gamma) * t_b, 1.0)
    rank1 = vec_ok & has_nu
    beta = tl.where(rank1, (1.0 - gamma) / (den * m_b), 0.0)
    write = vec_ok | reset
    out = coef_ptr + fid * N_COEF
    tl.store(out + C_A, a / m_b)
    tl.store(out + C_C, c / m_b)
    tl.store(out + C_AP, tl.where(rank1, a, 0.0))
    tl.store(out + C_CW, tl.where(rank1, c, 0.0))
    tl.store(out + C_BETA, beta)
    tl.store(out + C_INV_NU, tl.where(has_nu, 1.0 / nu, 0.0))
    tl.store(out + C_WRITE, write.to(tl.float32))
    tl.store(scales_ptr + fid, tl.where(vec_ok, kappa_b * m_b / gamma, kappa_b))
    if HAS_COUNTS:
        cnt = counts_ptr + fid * 3
        tl.store(cnt, tl.load(cnt) + (blend & vec_ok & ~reset).to(tl.int32))
        tl.store(cnt + 1, tl.load(cnt + 1) + reset.to(tl.int32))
        tl.store(cnt + 2, tl.load(cnt + 2) + (~vec_ok).to(tl.int32))


@triton.jit
def _direction(p_ptr, v_ptr, idx, d, a_p, c_w, inv_nu):
    """``a p + c w`` at ``idx`` (0 where a term's coefficient is 0, so a NaN there cannot leak)."""
    in_range = idx < d
    p = tl.load(p_ptr + idx, mask=in_range, other=0.0)
    w = _scaled_vector(v_ptr, idx, d, inv_nu)
    return tl.where(a_p != 0, a_p * p, 0.0) + tl.where(c_w != 0, c_w * w, 0.0)


@triton.jit
def _round_to_bf16(x):
    """fp32 ``x`` rounded to the nearest bf16 value (ties to even), still fp32: the interpreter's own
    fp32 -> bf16 conversion truncates, which biases a factor rewritten at every update."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _apply_kernel(
    addr_ptr, numel_ptr, chunk_tensor_ptr, chunk_start_ptr, bounds_ptr, p_ptr, coef_ptr, first_chunk,
    V_DT: tl.constexpr, F_DT: tl.constexpr, ROUND_BF16: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Pass 2 for one chunk of rows: ``F <- A F + C I - beta' q q^T`` with ``q = a p + c w``."""
    k = first_chunk + tl.program_id(0)
    fid = tl.load(chunk_tensor_ptr + k)
    r0 = tl.load(chunk_start_ptr + k)
    d = tl.load(numel_ptr + fid)
    v_ptr = tl.load(addr_ptr + fid * 2 + VEC).to(tl.pointer_type(V_DT))
    f_ptr = tl.load(addr_ptr + fid * 2 + FAC).to(tl.pointer_type(F_DT))
    coef = coef_ptr + fid * N_COEF
    scale_f = tl.load(coef + C_A)
    eye = tl.load(coef + C_C)
    a_p = tl.load(coef + C_AP)
    c_w = tl.load(coef + C_CW)
    beta = tl.load(coef + C_BETA)
    inv_nu = tl.load(coef + C_INV_NU)
    n_rows = tl.where(tl.load(coef + C_WRITE) != 0, d, 0)  # a skipped factor is not written
    p_base = p_ptr + tl.load(bounds_ptr + fid * 2) * ROWS  # p of this factor's row 0

    rows = r0 + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    row_offs = rows.to(tl.int64) * d
    q_rows = _direction(p_base, v_ptr, rows, d, a_p, c_w, inv_nu)
    for c in range(0, d, BLOCK_C):
        cols = c + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (cols[None, :] < d)
        offs = row_offs[:, None] + cols[None, :]
        f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        q_cols = _direction(p_base, v_ptr, cols, d, a_p, c_w, inv_nu)
        new = tl.where(scale_f != 0, scale_f * f, 0.0) + tl.where(rows[:, None] == cols[None, :], eye, 0.0)
        new -= beta * (q_rows[:, None] * q_cols[None, :])  # q_i q_j == q_j q_i: F stays exactly symmetric
        if ROUND_BF16:
            new = _round_to_bf16(new)
        tl.store(f_ptr + offs, new.to(F_DT), mask=mask)


def _per_factor(n: int, decay, threshold, blend) -> list[list[float]]:
    """Checked ``[decay, threshold, blend]`` per factor."""
    rows = []
    for i, (g, tau, zeta) in enumerate(zip(per_tensor("decay", decay, n), per_tensor("threshold", threshold, n),
                                           per_tensor("blend", blend, n))):
        for name, value in (("decay", g), ("threshold", tau), ("blend", zeta)):
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise TypeError(f"{name}[{i}]: expected a Python float, got {type(value).__name__}")
        if not 0.0 < g < 1.0:
            raise ValueError(f"decay[{i}]: expected a number in (0, 1), got {g!r}")
        if math.isnan(tau) or tau <= 0:
            raise ValueError(f"threshold[{i}]: expected a number > 0 (inf disables blending), got {tau!r}")
        if not 0.0 <= zeta <= 1.0:
            raise ValueError(f"blend[{i}]: expected a number in [0, 1], got {zeta!r}")
        rows.append([float(g), float(tau), float(zeta)])
    return rows


def _check_args(factors, vectors, scales, counts) -> None:
    n = len(factors)
    if len(vectors) != n:
        raise ValueError(f"vectors: expected one vector per factor ({n}), got {len(vectors)}")
    for i, (f, v) in enumerate(zip(factors, vectors)):
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"factors[{i}]: expected a torch.Tensor, got {type(f).__name__}")
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"vectors[{i}]: expected a torch.Tensor, got {type(v).__name__}")
        if f.dim() != 2 or f.shape[0] != f.shape[1] or f.shape[0] == 0:
            raise ValueError(f"factors[{i}]: expected a non-empty square (d, d) matrix, got shape {tuple(f.shape)}")
        if not f.is_contiguous():
            raise ValueError(f"factors[{i}]: expected a contiguous tensor (updated in place), got strides {f.stride()}")
        if v.shape != (f.shape[0],):
            raise ValueError(f"vectors[{i}]: expected shape ({f.shape[0]},) for factors[{i}] of shape "
                             f"{tuple(f.shape)}, got {tuple(v.shape)}")
        for name, t in (("factors", f), ("vectors", v)):
            if not t.is_floating_point():
                raise TypeError(f"{name}[{i}]: expected a floating-point tensor, got {t.dtype}")
    check_tensor("scales", scales)
    check_dtype("scales", scales, (torch.float32,))
    check_shape("scales", scales, (n,))
    check_contiguous("scales", scales)
    if counts is not None:
        if not isinstance(counts, torch.Tensor):
            raise TypeError(f"counts: expected a torch.Tensor, got {type(counts).__name__}")
        check_dtype("counts", counts, (torch.int32,))
        check_shape("counts", counts, (n, 3))
        check_contiguous("counts", counts)
    if n:
        device = factors[0].device
        check_same_device(device, factors=factors, vectors=vectors, scales=scales, counts=counts)
    check_no_overlap([("factors", factors), ("scales", scales), ("counts", counts)], [("vectors", vectors)],
                     writer="the kernel")


def rank1_inverse_update(
    factors: Sequence[torch.Tensor],
    vectors: Sequence[torch.Tensor],
    scales: torch.Tensor,
    *,
    decay: float | Sequence[float],
    threshold: float | Sequence[float] = math.inf,
    blend: float | Sequence[float] = 0.9,
    counts: torch.Tensor | None = None,
) -> None:
    """Stabilise and Sherman-Morrison-update every inverse factor ``scales[i] * factors[i]`` with
    ``vectors[i]``, in place (module docstring for the math, the scale handling and the safety rules).

    ``factors[i]``: (d_i, d_i), contiguous, symmetric; fp32/bf16/fp16 on the Triton path (any float
    dtype on the reference path). ``vectors[i]``: (d_i,), any float dtype (a non-contiguous one is
    copied). ``scales``: (n,) contiguous fp32, the scalar of each factor (1 for a factor that holds
    ``J`` itself). ``decay`` in (0, 1), ``threshold`` > 0 (inf: never blend), ``blend`` in [0, 1]:
    scalars or one per factor. ``counts``: optional (n, 3) int32, incremented per factor by
    [blended, reset, skipped for a non-finite vector].
    """
    _check_args(factors, vectors, scales, counts)
    hyper = _per_factor(len(factors), decay, threshold, blend)
    if not factors:
        return
    device = factors[0].device
    if not use_triton(device):
        rank1_inverse_update_reference(factors, vectors, scales, decay=[h[0] for h in hyper],
                                       threshold=[h[1] for h in hyper], blend=[h[2] for h in hyper], counts=counts)
        return
    for i, (f, v) in enumerate(zip(factors, vectors)):
        check_kernel_dtype(f"factors[{i}]", f)
        check_kernel_dtype(f"vectors[{i}]", v)
    vectors = [v.contiguous() for v in vectors]

    def run(config: Config) -> None:
        rows = config["ROWS"]
        table = TensorTable.build([vectors, factors], hyper, rows, device, dtype_columns=[0, 1])
        p = torch.empty(table.n_chunks * rows, dtype=torch.float32, device=device)
        partial = torch.empty((table.n_chunks, N_PARTIAL), dtype=torch.float32, device=device)
        coef = torch.empty((table.n, N_COEF), dtype=torch.float32, device=device)
        common = dict(ROWS=rows, BLOCK_C=config["BLOCK_C"], num_warps=config.num_warps)
        for lo, hi, (v_dt, f_dt) in table.launches:
            _matvec_kernel[(hi - lo,)](table.addr, table.numel, table.chunk_tensor, table.chunk_start, p, partial,
                                       lo, V_DT=tl_dtype(v_dt), F_DT=tl_dtype(f_dt), **common)
        _coefficients_kernel[(table.n,)](table.numel, table.bounds, table.hyper, partial, scales,
                                         counts if counts is not None else scales, coef,
                                         HAS_COUNTS=counts is not None, RBLOCK=REDUCE_BLOCK)
        for lo, hi, (v_dt, f_dt) in table.launches:
            _apply_kernel[(hi - lo,)](table.addr, table.numel, table.chunk_tensor, table.chunk_start, table.bounds,
                                      p, coef, lo, V_DT=tl_dtype(v_dt), F_DT=tl_dtype(f_dt),
                                      ROUND_BF16=store_needs_rounding(f_dt), **common)

    dtypes = ",".join(sorted({str(f.dtype) for f in factors}))
    bucket = shape_bucket(max(f.shape[0] for f in factors), len(factors))
    restore = [*factors, scales] + ([counts] if counts is not None else [])
    RANK1_CONFIGS.launch(device=device, bucket=bucket, dtype=dtypes, run=run, restore=restore)


def rank1_inverse_update_reference(
    factors: Sequence[torch.Tensor],
    vectors: Sequence[torch.Tensor],
    scales: torch.Tensor,
    *,
    decay: float | Sequence[float],
    threshold: float | Sequence[float] = math.inf,
    blend: float | Sequence[float] = 0.9,
    counts: torch.Tensor | None = None,
) -> None:
    """Plain PyTorch twin of :func:`rank1_inverse_update` (same contract, same decisions, one factor
    at a time). Math in fp32, or float64 for float64 factors; no host synchronisation."""
    n = len(factors)
    hyper = _per_factor(n, decay, threshold, blend)
    for i, (f, v) in enumerate(zip(factors, vectors)):
        gamma, tau, zeta = hyper[i]
        dtype = torch.promote_types(f.dtype, torch.float32)
        d = f.shape[0]
        big = torch.finfo(torch.float32).max
        F = f.to(dtype)
        v = v.to(dtype)
        kappa = scales[i].to(dtype)
        v_finite = v.abs() <= big
        vec_ok = v_finite.all()
        nu = torch.where(v_finite, v.abs(), 0).max()
        nu = torch.where(nu >= torch.finfo(torch.float32).tiny, nu, 0)
        has_nu = nu > 0
        w = torch.where(v_finite, v, 0) * torch.where(has_nu, 1 / nu, 0)
        f_finite = F.abs() <= big
        m = torch.where(f_finite, F.abs(), 0).max()
        state_ok = f_finite.all() & (m > 0) & (kappa > 0) & (kappa <= big)
        F_clean = torch.where(f_finite, F, 0)
        p = F_clean @ w
        t, ww, pp = w @ p, w @ w, p @ p
        blended = state_ok & (kappa * m > tau)
        a = torch.where(blended, zeta, 1.0).to(dtype)
        c = torch.where(blended, (1 - zeta) / kappa, 0.0).to(dtype)
        t_b = a * t + c * ww
        pp_b = a * a * pp + 2 * a * c * t + c * c * ww
        m_b = a * m + c
        den = torch.where(has_nu, gamma / (kappa * nu) / nu + (1 - gamma) * t_b, 1.0)
        definite = (den > 0) & (t_b >= 0) & (pp_b <= 2 * d * m_b * t_b)
        reset = ~state_ok | (vec_ok & ~definite)
        a = torch.where(reset, 0.0, a)
        c = torch.where(reset, 1.0, c)
        kappa_b = torch.where(reset, 1.0, kappa)
        m_b = torch.where(reset, 1.0, m_b)
        t_b = torch.where(reset, ww, t_b)
        den = torch.where(has_nu, gamma / (kappa_b * nu) / nu + (1 - gamma) * t_b, 1.0)
        rank1 = vec_ok & has_nu
        beta = torch.where(rank1, (1 - gamma) / (den * m_b), 0.0)
        q = torch.where(rank1, a * p + c * w, 0.0)
        eye = torch.eye(d, dtype=dtype, device=f.device)
        new = a / m_b * F_clean + c / m_b * eye - beta * torch.outer(q, q)
        f.copy_(torch.where(vec_ok | reset, new, F).to(f.dtype))
        scales[i] = torch.where(vec_ok, kappa_b * m_b / gamma, kappa_b).to(scales.dtype)
        if counts is not None:
            counts[i] += torch.stack([blended & vec_ok & ~reset, reset, ~vec_ok]).to(counts.dtype)
