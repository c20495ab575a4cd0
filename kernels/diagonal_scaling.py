"""Diagonal factor products and the diagonal projection of ``(a D)^T (a D)`` (SINGD's diagonal structure).

``D = diag(k)`` (k: d). Conventions (``right``, dtypes, strides) are those of :mod:`kfopt.kernels.structured`::

    diagonal_matmul(k, x)              = D x      out[i, j] = k[i] x[i, j]       (x: d x n)
    diagonal_matmul(k, x, right=True)  = x D      out[i, j] = x[i, j] k[j]       (x: n x d)
    diagonal_from_inner(k, x, ones_column, scale)[c] = scale * k[c]^2 * sum_r a[r, c]^2,   a = [x | 1]

``diagonal_from_inner`` is ``diag(scale * D^T a^T a D)``, the diagonal projection of the inner product
of ``a D``, from one pass over the rows (O(d) memory; the ones column adds ``rows`` to the last sum).

Kernels: ``diagonal_matmul`` is element-wise over (BM x BN) tiles, one program per tile, all on grid
axis 0 (row tile ``pid % cdiv(m, BM)``, column tile ``pid // cdiv(m, BM)``: either side of x may be the
millions of activation rows, and CUDA allows only 65535 programs on axes 1 and 2); ``diagonal_from_inner``
runs one program per block of BC columns (axis 0), streaming the rows in chunks of BR and summing squares
in fp32. Both are bandwidth-bound: they read x once and write the result once.
"""

from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl

from kfopt.autotune import Config, ConfigSpace, shape_bucket

from .dispatch import use_triton
from .checks import check_flag, check_kernel_dtypes, check_same_device, check_tensor
from .structured import output, result_dtype

DIAGONAL_MATMUL_CONFIGS = ConfigSpace(
    "diagonal_matmul",
    [Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps) for bm in (16, 32, 64) for bn in (64, 128, 256)
     for warps in (4, 8)],
    default=Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4),
)

DIAGONAL_INNER_CONFIGS = ConfigSpace(
    "diagonal_from_inner",
    [Config({"BLOCK_R": br, "BLOCK_C": bc}, num_warps=warps) for br in (16, 32, 64) for bc in (64, 128, 256)
     for warps in (4, 8)],
    default=Config({"BLOCK_R": 32, "BLOCK_C": 64}, num_warps=4),
)


@triton.jit
def _diagonal_matmul_kernel(k_ptr, x_ptr, out_ptr, m, n, s_k, s_xr, s_xc, s_or, s_oc, RIGHT: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out = k[:, None] * x (left) or x * k[None, :] (RIGHT) on one (BM x BN) tile."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(m, BLOCK_M)
    rm = (pid % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid // tiles_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    inside = (rm[:, None] < m) & (rn[None, :] < n)
    xv = tl.load(x_ptr + rm64[:, None] * s_xr + rn64[None, :] * s_xc, mask=inside, other=0.0).to(tl.float32)
    if RIGHT:
        y = xv * tl.load(k_ptr + rn64 * s_k, mask=rn < n, other=0.0).to(tl.float32)[None, :]
    else:
        y = xv * tl.load(k_ptr + rm64 * s_k, mask=rm < m, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + rm64[:, None] * s_or + rn64[None, :] * s_oc, y.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _diagonal_inner_kernel(k_ptr, x_ptr, out_ptr, rows, d, s_k, s_xr, s_xc, scale, ONES_COLUMN: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[cols] = scale * k[cols]^2 * sum_r a[r, cols]^2 for one block of columns."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cols64 = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, rows, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        xv = tl.load(x_ptr + rr.to(tl.int64)[:, None] * s_xr + cols64[None, :] * s_xc,
                     mask=(rr[:, None] < rows) & (cols[None, :] < d), other=0.0).to(tl.float32)
        acc += xv * xv
    sums = tl.sum(acc, axis=0)
    side = d + ONES_COLUMN
    if ONES_COLUMN:
        sums = tl.where(cols == d, rows * 1.0, sums)
    kv = tl.load(k_ptr + cols64 * s_k, mask=cols < side, other=0.0).to(tl.float32)
    tl.store(out_ptr + cols, scale * kv * kv * sums, mask=cols < side)


def _matmul_problem(diag, x, right):
    check_tensor("diag", diag, 1)
    check_tensor("x", x, 2)
    check_flag("right", right)
    check_same_device(diag.device, x=x)
    side = x.shape[1] if right else x.shape[0]
    if side != diag.shape[0]:
        raise ValueError(f"x: expected {'columns' if right else 'rows'} = {diag.shape[0]} (the length of diag), "
                         f"got shape {tuple(x.shape)}")


def diagonal_matmul(diag: torch.Tensor, x: torch.Tensor, right: bool = False,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """``diag(diag) x`` or ``x diag(diag)``; fp32 (float64 on the reference path for float64 inputs)
    or ``out``. See the module docstring."""
    _matmul_problem(diag, x, right)
    out = output(out, tuple(x.shape), x.device, result_dtype(diag, x), diag=diag, x=x)
    if not use_triton(x.device):
        return diagonal_matmul_reference(diag, x, right, out=out)
    check_kernel_dtypes(diag=diag, x=x, out=out)
    if out.numel() == 0:
        return out
    m, n = x.shape

    def run(config: Config) -> None:
        grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
        _diagonal_matmul_kernel[grid](diag, x, out, m, n, diag.stride(0), *x.stride(), *out.stride(),
                                      RIGHT=right, **config.launch_kwargs())

    DIAGONAL_MATMUL_CONFIGS.launch(device=x.device, bucket=shape_bucket(m, n),
                                   dtype=f"{diag.dtype},{x.dtype},{out.dtype}", run=run)
    return out


def diagonal_matmul_reference(diag: torch.Tensor, x: torch.Tensor, right: bool = False,
                              out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch twin of :func:`diagonal_matmul` (same contract)."""
    _matmul_problem(diag, x, right)
    dtype = result_dtype(diag, x)
    k = diag.to(dtype)
    y = x.to(dtype) * (k[None, :] if right else k[:, None])
    return y if out is None else out.copy_(y)


def _inner_problem(diag, x, ones_column, scale):
    check_tensor("diag", diag, 1)
    check_tensor("x", x, 2)
    check_flag("ones_column", ones_column)
    check_same_device(diag.device, x=x)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a Python float, got {type(scale).__name__}")
    if diag.shape[0] != x.shape[1] + ones_column:
        raise ValueError(f"diag: expected length {x.shape[1] + ones_column} (x's columns"
                         f"{' + 1 for the ones column' if ones_column else ''}), got {diag.shape[0]}")


def diagonal_from_inner(diag: torch.Tensor, x: torch.Tensor, ones_column: bool = False,
                        scale: float = 1.0) -> torch.Tensor:
    """``scale * diag^2 * (column sums of [x | 1]^2)``: (d,) fp32 (float64 on the reference path for
    float64 inputs). See the module docstring."""
    _inner_problem(diag, x, ones_column, scale)
    if not use_triton(x.device):
        return diagonal_from_inner_reference(diag, x, ones_column, scale)
    check_kernel_dtypes(diag=diag, x=x)
    side = diag.shape[0]
    out = torch.empty(side, dtype=torch.float32, device=x.device)
    if side == 0:
        return out
    rows, d = x.shape

    def run(config: Config) -> None:
        _diagonal_inner_kernel[(triton.cdiv(side, config["BLOCK_C"]),)](
            diag, x, out, rows, d, diag.stride(0), *x.stride(), float(scale), ONES_COLUMN=ones_column,
            **config.launch_kwargs())

    DIAGONAL_INNER_CONFIGS.launch(device=x.device, bucket=shape_bucket(rows, side),
                                  dtype=f"{diag.dtype},{x.dtype}", run=run)
    return out


def diagonal_from_inner_reference(diag: torch.Tensor, x: torch.Tensor, ones_column: bool = False,
                                  scale: float = 1.0) -> torch.Tensor:
    """Plain PyTorch twin of :func:`diagonal_from_inner` (same contract)."""
    _inner_problem(diag, x, ones_column, scale)
    dtype = result_dtype(diag, x)
    sums = x.to(dtype).square().sum(0)
    if ones_column:
        sums = torch.cat([sums, sums.new_full((1,), x.shape[0])])
    return scale * diag.to(dtype).square() * sums
