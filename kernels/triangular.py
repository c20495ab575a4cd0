"""Packed triangular x dense products (SINGD's triangular structures), the zero half skipped.

A lower-triangular d x d matrix ``T`` is stored packed: its rows one after the other, row i holding
``T[i, 0..i]``, so ``T[i, j]`` (j <= i) is ``packed[i (i + 1) / 2 + j]`` (d (d + 1) / 2 elements). An
upper-triangular matrix is ``T^T``: the same packing read transposed. Conventions (``op``, ``right``,
dtypes, strides) are those of :mod:`kfopt.kernels.structured`::

    triangular_matmul(packed, x, transpose=False, right=False) = op(T) x   or   x op(T)

Kernel: one program per (row tile, column tile) of the left product ``A x`` (``A = T`` or ``T^T``). Row
tile ``[m0, m0 + BM)`` of a lower ``A`` has non-zeros only in columns ``< m0 + BM``, of an upper ``A``
only in columns ``>= m0``: the k loop covers that range only, so about half of the dense GEMM's tiles
are visited: about n d (d + BM) flops instead of the dense product's 2 n d^2. The tile of ``A`` is
gathered from the packed vector (masked to the triangle) and fed to ``tl.dot``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kfopt.autotune import Config, ConfigSpace, shape_bucket

from .dispatch import use_triton
from .structured import (
    check_flag,
    check_same_device,
    check_tensor,
    check_triton_dtypes,
    output,
    result_dtype,
    upcast_dot,
)

TRIANGULAR_CONFIGS = ConfigSpace(
    "triangular_matmul",
    [
        Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
        for bm in (32, 64, 128)
        for bn in (32, 64, 128)
        for bk in (32, 64)
        for warps in (4, 8)
        for stages in (2, 3)
    ],
    default=Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2),
)


@triton.jit
def _triangular_matmul_kernel(
    p_ptr, x_ptr, out_ptr, d, n, s_p, s_xr, s_xc, s_or, s_oc,
    UPPER: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[rows, cols] = A[rows, :] x[:, cols] with A = T (lower) or T^T (UPPER), T packed."""
    m0 = tl.program_id(0) * BLOCK_M
    rm = m0 + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    if UPPER:
        k_lo = (m0 // BLOCK_K) * BLOCK_K
        k_hi = d
    else:
        k_lo = 0
        k_hi = tl.minimum(m0 + BLOCK_M, d)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        rk = k + tl.arange(0, BLOCK_K)
        rk64 = rk.to(tl.int64)
        if UPPER:  # A[r, c] = T[c, r], non-zero for r <= c
            offs = (rk64 * (rk64 + 1) // 2)[None, :] + rm64[:, None]
            inside = (rm[:, None] <= rk[None, :]) & (rk[None, :] < d)
        else:  # A[r, c] = T[r, c], non-zero for c <= r
            offs = (rm64 * (rm64 + 1) // 2)[:, None] + rk64[None, :]
            inside = (rk[None, :] <= rm[:, None]) & (rm[:, None] < d)
        a = tl.load(p_ptr + offs * s_p, mask=inside, other=0.0)
        xv = tl.load(x_ptr + rk64[:, None] * s_xr + rn64[None, :] * s_xc,
                     mask=(rk[:, None] < d) & (rn[None, :] < n), other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            xv = xv.to(tl.float32)
        acc = tl.dot(a, xv, acc, input_precision="ieee")
    tl.store(out_ptr + rm64[:, None] * s_or + rn64[None, :] * s_oc, acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < d) & (rn[None, :] < n))


def packed_side(numel: int) -> int:
    """d such that d (d + 1) / 2 == numel; ValueError when there is none."""
    d = (math.isqrt(8 * numel + 1) - 1) // 2
    if d * (d + 1) // 2 != numel:
        raise ValueError(f"packed: {numel} elements is not d (d + 1) / 2 for any d")
    return d


def _problem(packed, x, transpose, right) -> int:
    check_tensor("packed", packed, 1)
    check_tensor("x", x, 2)
    check_flag("transpose", transpose)
    check_flag("right", right)
    check_same_device(packed.device, x=x)
    d = packed_side(packed.numel())
    side = x.shape[1] if right else x.shape[0]
    if side != d:
        raise ValueError(f"x: expected {'columns' if right else 'rows'} = {d} (packed has d (d + 1) / 2 = "
                         f"{packed.numel()} elements), got shape {tuple(x.shape)}")
    return d


def triangular_matmul(packed: torch.Tensor, x: torch.Tensor, transpose: bool = False, right: bool = False,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """``op(T) x`` or ``x op(T)`` with ``T`` lower triangular, packed by rows; see the module docstring.
    Returns fp32 (float64 on the reference path for float64 inputs) or ``out``."""
    d = _problem(packed, x, transpose, right)
    out = output(out, tuple(x.shape), x.device, result_dtype(packed, x))
    if not use_triton(x.device):
        return triangular_matmul_reference(packed, x, transpose, right, out=out)
    check_triton_dtypes(packed=packed, x=x, out=out)
    if out.numel() == 0:
        return out
    upper = transpose != right  # x op(T) = (op(T)^T x^T)^T
    xl, ol = (x.T, out.T) if right else (x, out)
    n = xl.shape[1]

    def run(config: Config) -> None:
        grid = (triton.cdiv(d, config["BLOCK_M"]), triton.cdiv(n, config["BLOCK_N"]))
        _triangular_matmul_kernel[grid](
            packed, xl, ol, d, n, packed.stride(0), *xl.stride(), *ol.stride(),
            UPPER=upper, UPCAST_DOT=upcast_dot(packed.dtype, x.dtype), **config.launch_kwargs())

    config = TRIANGULAR_CONFIGS.select(device=x.device, bucket=shape_bucket(d, n),
                                       dtype=f"{packed.dtype},{x.dtype},{out.dtype},{upper}", run=run)
    run(config)
    return out


def unpack_lower(packed: torch.Tensor) -> torch.Tensor:
    """The dense lower-triangular ``T`` (d x d, packed's dtype) of a row-packed vector."""
    d = packed_side(packed.numel())
    rows, cols = torch.tril_indices(d, d, device=packed.device)
    dense = packed.new_zeros(d, d)
    dense[rows, cols] = packed
    return dense


def pack_lower(dense: torch.Tensor) -> torch.Tensor:
    """The row-packed lower triangle (diagonal included) of a square matrix (a new tensor)."""
    d = dense.shape[0]
    rows, cols = torch.tril_indices(d, d, device=dense.device)
    return dense[rows, cols]


def triangular_matmul_reference(packed: torch.Tensor, x: torch.Tensor, transpose: bool = False,
                                right: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch twin of :func:`triangular_matmul` (unpacks ``T`` to a dense d x d matrix, which is
    the size of the structure itself; same contract)."""
    _problem(packed, x, transpose, right)
    dtype = result_dtype(packed, x)
    t = unpack_lower(packed.to(dtype))
    if transpose:
        t = t.T
    y = x.to(dtype) @ t if right else t @ x.to(dtype)
    return y if out is None else out.copy_(y)
