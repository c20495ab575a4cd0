"""Symmetric covariance of a batch of rows, optionally fused into a running average (K-FAC factors).

For ``x`` of shape (rows, d), ``a = [x | 1]`` when ``ones_column`` (a column of ones appended
*logically*: no concatenated copy of ``x`` is made) and ``a = x`` otherwise, D = a.shape[1]::

    new = a^T a / rows                                   (D x D, fp32)
    out = new                                            (decay is None)
    out = decay * sym(out) + (1 - decay) * new           (decay in [0, 1], in place)

``sym(out)`` is the symmetric matrix whose upper triangle (diagonal included) is that of ``out``: the
fused running average reads only the upper triangle of ``out`` and writes both triangles, so the result
is exactly symmetric (``out == out.T`` bit for bit) whatever the lower triangle held. The upper
triangle must be finite even for decay = 0 (0 * inf is NaN). K-FAC's first update
``A = f I + (1 - f) A_batch`` is this call with ``out`` set to the identity beforehand.

Kernel: D is cut into T = cdiv(D, BLOCK_D) tiles of BLOCK_D; one program per tile pair (i, j) with
i <= j (T (T + 1) / 2 programs, numbered column by column, so consecutive programs share the panel
``a[:, j]``). A program accumulates ``a[:, i]^T a[:, j]`` over rows in fp32 (``tl.dot``), scales,
optionally blends with ``out``, and stores the tile at (i, j) and its transpose at (j, i); in a
diagonal tile only the elements on or above the diagonal are stored directly, the rest come from the
transposed store of the same values, so no element is computed twice.

Cost, for storage size s bytes of ``x`` (2 for bf16/fp16, 4 for fp32):

* flops: 2 rows BLOCK_D^2 per tile pair, T (T + 1) / 2 pairs: rows D (D + BLOCK_D) ~= rows D^2,
  half the 2 rows D^2 of the full GEMM ``a^T a``;
* compulsory bytes: rows d s (x read once) + 4 D^2 (out written) [+ ~2 D (D + BLOCK_D) when fused:
  the upper triangle of ``out`` read]. Each program streams two panels of rows x BLOCK_D, so x is
  re-read T + 1 times in total from L2 (rows D (T + 1) s bytes of L2 traffic).

Precision: fp32 accumulation in every case. bf16/fp16 products are exact in fp32, and fp32 inputs use
``input_precision="ieee"`` (no TF32) because factors feed an eigendecomposition; on a GPU this runs
fp32 inputs on FMA units, not tensor cores -- pass bf16/fp16 activations for tensor-core speed.

Layouts: ``x`` may be any strided 2-D view (its strides are passed to the kernel; no copy is made).
``out`` must be fp32, (D, D), and dense (any dimension order, e.g. a transpose); it must not share
memory with ``x`` (ValueError, ``aliasing.check_no_overlap``).
"""

from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl

from kfopt.autotune import Config, ConfigSpace, shape_bucket

from .aliasing import check_no_overlap
from .checks import check_kernel_dtype
from .dispatch import dot_needs_upcast, is_dense, use_triton

COVARIANCE_CONFIGS = ConfigSpace(
    "symmetric_covariance",
    [
        Config({"BLOCK_D": block_d, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages)
        for block_d in (32, 64, 128)
        for block_k in (32, 64)
        for warps in (4, 8)
        for stages in (2, 3, 4)
    ],
    default=Config({"BLOCK_D": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
)


@triton.jit
def upper_tile_pair(pid):
    """(i, j) with 0 <= i <= j and pid = j (j + 1) / 2 + i: the upper triangle, column by column.

    Exact for pid < 2^30 (j < 46340, where j (j + 1) overflows int32).
    """
    j = ((tl.sqrt(8.0 * pid + 1.0) - 1.0) * 0.5).to(tl.int32)
    # fp32 rounding of 8 pid + 1 (pid > 2^21) and an approximate sqrt leave j within one of the truth
    j = tl.where((j + 1) * (j + 2) // 2 <= pid, j + 1, j)
    j = tl.where(j * (j + 1) // 2 > pid, j - 1, j)
    return pid - j * (j + 1) // 2, j


@triton.jit
def _load_panel(x_ptr, rk, cols, rows, d, stride_r, stride_c, ONES_COLUMN: tl.constexpr,
                UPCAST_DOT: tl.constexpr):
    """Rows ``rk`` x columns ``cols`` of ``a = [x | 1]`` (or ``x``), zero outside; fp32 if UPCAST_DOT."""
    in_rows = rk[:, None] < rows
    offs = rk.to(tl.int64)[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c
    v = tl.load(x_ptr + offs, mask=in_rows & (cols[None, :] < d), other=0.0)
    if UPCAST_DOT:
        v = v.to(tl.float32)
    if ONES_COLUMN:
        v = tl.where(in_rows & (cols[None, :] == d), 1.0, v).to(v.dtype)
    return v


@triton.jit
def _symmetric_covariance_kernel(
    x_ptr, out_ptr, rows, d, stride_xr, stride_xc, stride_or, stride_oc, decay,
    ONES_COLUMN: tl.constexpr, EMA: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One upper tile pair (i, j), i <= j: out[i, j] and out[j, i] (see the module docstring)."""
    i, j = upper_tile_pair(tl.program_id(0))
    n = d + ONES_COLUMN
    ci = i * BLOCK_D + tl.arange(0, BLOCK_D)
    cj = j * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    for k in range(0, rows, BLOCK_K):
        rk = k + tl.arange(0, BLOCK_K)
        xi = _load_panel(x_ptr, rk, ci, rows, d, stride_xr, stride_xc, ONES_COLUMN, UPCAST_DOT)
        xj = _load_panel(x_ptr, rk, cj, rows, d, stride_xr, stride_xc, ONES_COLUMN, UPCAST_DOT)
        acc = tl.dot(tl.trans(xi), xj, acc, input_precision="ieee")
    new = acc / rows
    # element (r, c) of this tile is stored at (r, c) when r <= c, and at (c, r) when r < c
    upper = (ci[:, None] <= cj[None, :]) & (cj[None, :] < n)
    offs = ci.to(tl.int64)[:, None] * stride_or + cj.to(tl.int64)[None, :] * stride_oc
    if EMA:
        new = decay * tl.load(out_ptr + offs, mask=upper, other=0.0) + (1.0 - decay) * new
    tl.store(out_ptr + offs, new, mask=upper)
    lower = (ci[None, :] < cj[:, None]) & (cj[:, None] < n)
    offs_t = cj.to(tl.int64)[:, None] * stride_or + ci.to(tl.int64)[None, :] * stride_oc
    tl.store(out_ptr + offs_t, tl.trans(new), mask=lower)


def _check_decay(decay) -> None:
    if not isinstance(decay, numbers.Real) or isinstance(decay, bool):
        raise TypeError(f"decay: expected a Python float in [0, 1] or None, got {type(decay).__name__}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay: expected a number in [0, 1], got {decay!r}")


def _check_args(x, ones_column, out, decay) -> int:
    """Checks shared by both paths; returns D, the side of the result."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D (rows, features) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError("x: expected at least one row, got 0 (the covariance divides by rows)")
    if not isinstance(ones_column, bool):
        raise TypeError(f"ones_column: expected a bool, got {type(ones_column).__name__}")
    side = x.shape[1] + int(ones_column)
    if decay is not None:
        _check_decay(decay)
        if out is None:
            raise ValueError("out: the fused running average (decay given) needs out, the factor to update")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
        if out.dtype != torch.float32:
            raise TypeError(f"out: expected float32, got {out.dtype}")
        if out.shape != (side, side):
            raise ValueError(f"out: expected shape {(side, side)} for x of shape {tuple(x.shape)} "
                             f"(ones_column={ones_column}), got {tuple(out.shape)}")
        if out.device != x.device:
            raise ValueError(f"out is on {out.device}, expected x's device {x.device}")
        if not is_dense(out):
            raise ValueError(f"out: expected a dense tensor (any dimension order), got strides {out.stride()}")
        check_no_overlap([("out", out)], [("x", x)], writer="the kernel")
    return side


def symmetric_covariance(
    x: torch.Tensor,
    ones_column: bool = False,
    out: torch.Tensor | None = None,
    decay: float | None = None,
) -> torch.Tensor:
    """``[x | 1]^T [x | 1] / rows`` (or ``x^T x / rows``), fp32, exactly symmetric; see the module doc.

    ``x``: (rows, d), rows >= 1, any strides; fp32/bf16/fp16 on the Triton path (any float dtype on
    the reference path). ``ones_column``: append the bias column of ones (logically). ``out``: fp32
    (D, D) dense tensor to write (returned); ``decay``: fuse the running average
    ``out = decay * out + (1 - decay) * new`` in place (needs ``out``; only its upper triangle is read).
    """
    side = _check_args(x, ones_column, out, decay)
    if not use_triton(x.device):
        return symmetric_covariance_reference(x, ones_column, out, decay)
    check_kernel_dtype("x", x)
    if out is None:
        out = torch.empty((side, side), dtype=torch.float32, device=x.device)
    if side == 0:
        return out
    rows, d = x.shape
    ema = decay is not None

    def run(config: Config) -> None:
        tiles = triton.cdiv(side, config["BLOCK_D"])
        _symmetric_covariance_kernel[(tiles * (tiles + 1) // 2,)](
            x, out, rows, d, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
            float(decay) if ema else 0.0,
            ONES_COLUMN=ones_column, EMA=ema, UPCAST_DOT=dot_needs_upcast(x.dtype), **config.launch_kwargs(),
        )

    COVARIANCE_CONFIGS.launch(
        device=x.device, bucket=shape_bucket(rows, side), dtype=f"{x.dtype}{',ema' if ema else ''}",
        run=run, restore=[out] if ema else [],
    )
    return out


def symmetric_covariance_reference(
    x: torch.Tensor,
    ones_column: bool = False,
    out: torch.Tensor | None = None,
    decay: float | None = None,
) -> torch.Tensor:
    """Plain PyTorch twin of :func:`symmetric_covariance` (same contract; materialises ``[x | 1]``).

    Math in fp32, or float64 when ``x`` is float64 (the tests' reference); without ``out`` the result
    has that dtype.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    a = x.to(dtype)
    if ones_column:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
    new = a.T @ a / a.shape[0]
    new = _symmetrize_upper(new)
    if decay is not None:
        new = decay * _symmetrize_upper(out.to(dtype)) + (1 - decay) * new
    if out is None:
        return new
    return out.copy_(new)


def _symmetrize_upper(m: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix with the upper triangle (diagonal included) of ``m``."""
    return torch.triu(m) + torch.triu(m, 1).T
