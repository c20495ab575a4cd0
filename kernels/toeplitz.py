"""Triangular Toeplitz products and streamed lag sums (SINGD's Toeplitz structures), in O(d) memory.

A lower-triangular Toeplitz d x d matrix is its first column ``c`` (d): ``L[i, j] = c[i - j]`` for
``i >= j``, 0 above the diagonal; an upper-triangular Toeplitz matrix is ``L^T``. Conventions (``op``,
``right``, dtypes, strides) are those of :mod:`kfopt.kernels.structured`.

``toeplitz_matmul(c, x, transpose=False, right=False) = op(L) x  or  x op(L)``, i.e. for the left
product ``y[i] = sum_{j <= i} c[i - j] x[j]`` (``L``) or ``y[i] = sum_{j >= i} c[j - i] x[j]`` (``L^T``).
Kernel and launcher: those of :mod:`.triangular` (``lower_triangular_matmul``; only the non-zero half
of the k range), with each BM x BK tile of ``op(L)`` gathered from ``c`` in registers: the d x d matrix
never exists. ``TOEPLITZ_CONFIGS`` has the candidates of ``triangular.TRIANGULAR_CONFIGS`` under its
own autotune cache name.

``lag_sums(u, v=None)``, for u, v of shape (rows, d) (v = u when None)::

    out[k] = sum_r sum_t u[r, t] v[r, t + k]            k = 0 .. d - 1   (fp32, (d,))

For ``u = v = S`` these are the sums of the diagonals of ``S^T S``: ``out[k] = sum_t (S^T S)[t, t + k]``,
which is all the Toeplitz projection of ``S^T S`` needs (see :mod:`kfopt.structures`) -- computed
without the d x d matrix. Kernel: a program per (block of BL lags, slice of the rows); it streams
row chunks and t tiles, loading ``u`` as a (BR, BT) tile and ``v`` shifted by each lag as a
(BL, BR, BT) tile (overlapping windows, served from cache), and accumulates the products in fp32.
Each row slice (at most MAX_SPLIT of them) writes its own partial lag vector, and the partials are
summed in a fixed order afterwards: deterministic, MAX_SPLIT x d floats of extra memory. Grid:
(cdiv(d, BL), slices): the rows never size a grid axis, and axis 1 stays <= MAX_SPLIT (CUDA allows
65535 there). Cost: rows d (d + 1) / 2 multiply-adds (the pairs
of ``S^T S``'s upper triangle), no tensor cores.

The references compute the same sums in tiles of ``REFERENCE_TILE`` (a (tile x tile) product per tile
pair, then a scatter of its diagonals), so their extra memory is O(tile^2 + d) too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kfopt.autotune import Config, ConfigSpace, shape_bucket

from .dispatch import use_triton
from .checks import check_kernel_dtypes, check_same_device, check_tensor
from .structured import result_dtype
from .triangular import TRIANGULAR_CONFIGS, lower_triangular_matmul, lower_triangular_problem

#: tile side of the references' blocked loops (their extra memory is O(REFERENCE_TILE^2 + d))
REFERENCE_TILE = 128

TOEPLITZ_CONFIGS = ConfigSpace("toeplitz_matmul", TRIANGULAR_CONFIGS.configs, TRIANGULAR_CONFIGS.default)

LAG_SUM_CONFIGS = ConfigSpace(
    "lag_sums",
    [
        Config({"BLOCK_L": bl, "BLOCK_R": br, "BLOCK_T": bt, "MAX_SPLIT": split}, num_warps=warps, num_stages=2)
        for bl in (8, 16, 32)
        for br in (8, 16)
        for bt in (32, 64)
        for split in (8, 32)
        for warps in (4, 8)
    ],
    default=Config({"BLOCK_L": 16, "BLOCK_R": 8, "BLOCK_T": 32, "MAX_SPLIT": 8}, num_warps=4, num_stages=2),
)


@triton.jit
def _lag_sums_kernel(
    u_ptr, v_ptr, part_ptr, rows, d, split, s_ur, s_uc, s_vr, s_vc,
    BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """part[s, lags] = sum over this program's row chunks and all t of u[r, t] v[r, t + lag]."""
    l0 = tl.program_id(0) * BLOCK_L
    s = tl.program_id(1)
    lags = l0 + tl.arange(0, BLOCK_L)
    acc = tl.zeros((BLOCK_L, BLOCK_R), dtype=tl.float32)
    for r0 in range(s * BLOCK_R, rows, split * BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        rr64 = rr.to(tl.int64)
        for t0 in range(0, d - l0, BLOCK_T):
            tt = t0 + tl.arange(0, BLOCK_T)
            u = tl.load(u_ptr + rr64[:, None] * s_ur + tt.to(tl.int64)[None, :] * s_uc,
                        mask=(rr[:, None] < rows) & (tt[None, :] < d), other=0.0).to(tl.float32)
            idx = tt[None, None, :] + lags[:, None, None]
            v = tl.load(v_ptr + rr64[None, :, None] * s_vr + idx.to(tl.int64) * s_vc,
                        mask=(rr[None, :, None] < rows) & (idx < d), other=0.0).to(tl.float32)
            acc += tl.sum(v * u[None, :, :], axis=2)
    tl.store(part_ptr + s.to(tl.int64) * d + lags, tl.sum(acc, axis=1), mask=lags < d)


def toeplitz_matmul(coeffs: torch.Tensor, x: torch.Tensor, transpose: bool = False, right: bool = False,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """``op(L) x`` or ``x op(L)`` for the lower-triangular Toeplitz ``L`` with first column ``coeffs``;
    see the module docstring. Returns fp32 (float64 on the reference path for float64 inputs) or ``out``."""
    return lower_triangular_matmul(coeffs, x, transpose, right, out, toeplitz=True, space=TOEPLITZ_CONFIGS,
                                   reference=toeplitz_matmul_reference)


def toeplitz_matmul_reference(coeffs: torch.Tensor, x: torch.Tensor, transpose: bool = False,
                              right: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch twin of :func:`toeplitz_matmul`: tile-by-tile products with tiles of ``op(L)``
    built from ``coeffs`` (O(REFERENCE_TILE^2) extra memory; same contract)."""
    d = lower_triangular_problem(coeffs, x, transpose, right, toeplitz=True)
    dtype = result_dtype(coeffs, x)
    c = coeffs.to(dtype)
    xl = x.to(dtype)
    if right:
        xl = xl.T
    upper = transpose != right
    y = torch.zeros(xl.shape, dtype=dtype, device=x.device)
    tile = torch.arange(REFERENCE_TILE, device=x.device)
    for i0 in range(0, d, REFERENCE_TILE):
        i1 = min(i0 + REFERENCE_TILE, d)
        for k0 in (range(i0, d, REFERENCE_TILE) if upper else range(0, i1, REFERENCE_TILE)):
            k1 = min(k0 + REFERENCE_TILE, d)
            lag = (tile[None, :k1 - k0] + k0) - (tile[:i1 - i0, None] + i0)
            if not upper:
                lag = -lag
            a = torch.where(lag >= 0, c[lag.clamp(min=0)], 0)
            y[i0:i1] += a @ xl[k0:k1]
    if right:
        y = y.T
    return y if out is None else out.copy_(y)


def _lag_problem(u, v):
    check_tensor("u", u, 2)
    if v is not None:
        check_tensor("v", v, 2)
        check_same_device(u.device, v=v)
        if v.shape != u.shape:
            raise ValueError(f"v: expected the shape of u {tuple(u.shape)}, got {tuple(v.shape)}")
    return u if v is None else v


def lag_sums(u: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
    """``out[k] = sum_r sum_t u[r, t] v[r, t + k]`` for k < d (v = u when None): (d,) fp32 (float64 on
    the reference path for float64 inputs); see the module docstring."""
    v = _lag_problem(u, v)
    if not use_triton(u.device):
        return lag_sums_reference(u, v)
    check_kernel_dtypes(u=u, v=v)
    rows, d = u.shape
    if d == 0 or rows == 0:
        return torch.zeros(d, dtype=torch.float32, device=u.device)

    def run(config: Config) -> torch.Tensor:
        split = min(triton.cdiv(rows, config["BLOCK_R"]), config["MAX_SPLIT"])
        part = torch.empty((split, d), dtype=torch.float32, device=u.device)
        _lag_sums_kernel[(triton.cdiv(d, config["BLOCK_L"]), split)](
            u, v, part, rows, d, split, *u.stride(), *v.stride(),
            BLOCK_L=config["BLOCK_L"], BLOCK_R=config["BLOCK_R"], BLOCK_T=config["BLOCK_T"],
            num_warps=config.num_warps, num_stages=config.num_stages)
        return part

    return LAG_SUM_CONFIGS.launch(device=u.device, bucket=shape_bucket(rows, d), dtype=f"{u.dtype},{v.dtype}",
                                  run=run).sum(0)


def lag_sums_reference(u: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch twin of :func:`lag_sums`: for tile pairs (I, J >= I) of the t index, the product
    ``u[:, I]^T v[:, J]`` and a scatter of its diagonals into ``out`` (O(REFERENCE_TILE^2 + d) extra
    memory; same contract)."""
    v = _lag_problem(u, v)
    dtype = result_dtype(u, v)
    d = u.shape[1]
    out = torch.zeros(d, dtype=dtype, device=u.device)
    tile = torch.arange(REFERENCE_TILE, device=u.device)
    for i0 in range(0, d, REFERENCE_TILE):
        i1 = min(i0 + REFERENCE_TILE, d)
        ui = u[:, i0:i1].to(dtype)
        for j0 in range(i0, d, REFERENCE_TILE):
            j1 = min(j0 + REFERENCE_TILE, d)
            prod = ui.T @ v[:, j0:j1].to(dtype)  # prod[p, q] pairs t = i0 + p with t + k = j0 + q
            lag = (tile[None, :j1 - j0] + j0) - (tile[:i1 - i0, None] + i0)
            keep = lag >= 0
            out.scatter_add_(0, lag[keep], prod[keep])
    return out
