"""Block-diagonal factor products and per-block covariances (SINGD's block-diagonal structure).

``blocks`` (nb, b, b) stands for ``Bd = diag(B_0, ..., B_{nb-1})`` (nb b x nb b); conventions
(``op``, ``right``, dtypes, strides) are those of :mod:`kfopt.kernels.structured`.

``block_diagonal_matmul(blocks, x, transpose=False, right=False)``::

    x 2-D:  out = op(Bd) x          (x: nb b x n)      or  out = x op(Bd)        (x: n x nb b)
    x 3-D:  out_i = op(B_i) x_i     (x: nb x b x n)    or  out_i = x_i op(B_i)   (x: nb x n x b)

The 3-D form is a batch of per-block matrices (e.g. ``B_i^T B_i`` or the product of two block-diagonal
matrices). ``block_covariance(x, block, ones_column=False, scale=1.0)``: with ``a = [x | 1]`` (rows x D;
the column of ones only when ``ones_column``, appended logically, no copy) cut into ``nbt = cdiv(D, b)``
column blocks ``a_i`` (the last one zero-padded to b columns)::

    out_i = scale * a_i^T a_i          (nbt x b x b, fp32)

which is the block-diagonal part of ``scale * a^T a`` without forming the D x D matrix.

Kernels: ``block_diagonal_matmul`` is one launch over (block, row tile, column tile) programs, each
accumulating ``op(B_i)[rows, k] x_i[k, cols]`` over k tiles with ``tl.dot`` (``op`` and the 2-D/3-D
and left/right forms are all strides). ``block_covariance`` runs one program per (block, tile pair)
accumulating ``a_i[:, p]^T a_i[:, q]`` over row chunks. Both grids are one axis (axis 0, up to 2^31 - 1
programs on CUDA; axes 1 and 2 stop at 65535, less than the column tiles of millions of activation rows,
blocks x row tiles, or the tile pairs of a block of 4096): ``block_diagonal_matmul`` numbers its programs
row tile fastest, then block, then column tile (consecutive programs share the tile of ``x_i`` they read,
and one column tile's blocks are neighbours in a 2-D ``x``); ``block_covariance`` tile q fastest, then
p, then block (consecutive programs share the column tile ``a_i[:, p]``, and a block's tile pairs run
together, its columns read from cache). Cost: ``block_diagonal_matmul`` 2 nb b^2 n flops,
reads Bd and x once per column tile / row tile; ``block_covariance`` 2 rows D b flops (the dense
covariance needs 2 rows D^2), reads x once per tile pair of its block.
"""

from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl

from kfopt.autotune import Config, ConfigSpace, shape_bucket

from .dispatch import use_triton
from .checks import check_flag, check_kernel_dtypes, check_same_device, check_tensor
from .structured import (
    output,
    result_dtype,
    tile_gemm_space,
    upcast_dot,
)

BLOCK_MATMUL_CONFIGS = tile_gemm_space("block_diagonal_matmul", block_m=(16, 32, 64), block_n=(32, 64, 128),
                                       block_k=(16, 32), warps=(4,), default=(16, 64, 16))

BLOCK_COVARIANCE_CONFIGS = ConfigSpace(
    "block_covariance",
    [
        Config({"BLOCK_B": bb, "BLOCK_R": br}, num_warps=warps, num_stages=stages)
        for bb in (16, 32, 64)
        for br in (32, 64)
        for warps in (4, 8)
        for stages in (2, 3)
    ],
    default=Config({"BLOCK_B": 16, "BLOCK_R": 32}, num_warps=4, num_stages=2),
)


@triton.jit
def _block_matmul_kernel(
    b_ptr, x_ptr, out_ptr, bdim, n, nb, tiles_m,
    s_bb, s_br, s_bc, s_xb, s_xr, s_xc, s_ob, s_or, s_oc,
    UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out_i[rows, cols] = A_i[rows, :] x_i[:, cols]; A_i = op(B_i) through its strides. Program
    pid = (column tile * nb + i) * tiles_m + row tile."""
    pid = tl.program_id(0)
    tiles_mb = nb * tiles_m
    pid_mb = pid % tiles_mb
    blk = (pid_mb // tiles_m).to(tl.int64)
    rm = (pid_mb % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid // tiles_mb) * BLOCK_N + tl.arange(0, BLOCK_N)
    a_base = b_ptr + blk * s_bb
    x_base = x_ptr + blk * s_xb
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, bdim, BLOCK_K):
        rk = k + tl.arange(0, BLOCK_K)
        rk64 = rk.to(tl.int64)
        a = tl.load(a_base + rm64[:, None] * s_br + rk64[None, :] * s_bc,
                    mask=(rm[:, None] < bdim) & (rk[None, :] < bdim), other=0.0)
        xv = tl.load(x_base + rk64[:, None] * s_xr + rn64[None, :] * s_xc,
                     mask=(rk[:, None] < bdim) & (rn[None, :] < n), other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            xv = xv.to(tl.float32)
        acc = tl.dot(a, xv, acc, input_precision="ieee")
    tl.store(out_ptr + blk * s_ob + rm64[:, None] * s_or + rn64[None, :] * s_oc,
             acc.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < bdim) & (rn[None, :] < n))


@triton.jit
def _block_covariance_kernel(
    x_ptr, out_ptr, rows, d, bdim, tiles_b, s_xr, s_xc, s_ob, s_or, s_oc, scale,
    ONES_COLUMN: tl.constexpr, UPCAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Tile (p, q) of block i: scale * a[:, i b + p]^T a[:, i b + q], a = [x | 1]. Program
    pid = (i * tiles_b + p) * tiles_b + q."""
    pid = tl.program_id(0)
    pairs = tiles_b * tiles_b
    blk = pid // pairs
    tile = pid % pairs
    lp = (tile // tiles_b) * BLOCK_B + tl.arange(0, BLOCK_B)
    lq = (tile % tiles_b) * BLOCK_B + tl.arange(0, BLOCK_B)
    cp = blk * bdim + lp
    cq = blk * bdim + lq
    in_p = (lp < bdim) & (cp < d)
    in_q = (lq < bdim) & (cq < d)
    acc = tl.zeros((BLOCK_B, BLOCK_B), dtype=tl.float32)
    for r0 in range(0, rows, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        in_r = rr[:, None] < rows
        base = x_ptr + rr.to(tl.int64)[:, None] * s_xr
        xp = tl.load(base + cp.to(tl.int64)[None, :] * s_xc, mask=in_r & in_p[None, :], other=0.0)
        xq = tl.load(base + cq.to(tl.int64)[None, :] * s_xc, mask=in_r & in_q[None, :], other=0.0)
        if UPCAST:
            xp = xp.to(tl.float32)
            xq = xq.to(tl.float32)
        if ONES_COLUMN:
            xp = tl.where(in_r & (lp[None, :] < bdim) & (cp[None, :] == d), 1.0, xp).to(xp.dtype)
            xq = tl.where(in_r & (lq[None, :] < bdim) & (cq[None, :] == d), 1.0, xq).to(xq.dtype)
        acc = tl.dot(tl.trans(xp), xq, acc, input_precision="ieee")
    offs = blk.to(tl.int64) * s_ob + lp.to(tl.int64)[:, None] * s_or + lq.to(tl.int64)[None, :] * s_oc
    tl.store(out_ptr + offs, acc * scale, mask=(lp[:, None] < bdim) & (lq[None, :] < bdim))


def _matmul_problem(blocks, x, transpose, right):
    """Checks shared by both paths; returns the output shape (that of x)."""
    check_tensor("blocks", blocks, 3)
    check_tensor("x", x, (2, 3))
    check_flag("transpose", transpose)
    check_flag("right", right)
    nb, b, b2 = blocks.shape
    if b != b2:
        raise ValueError(f"blocks: expected (nb, b, b) square blocks, got shape {tuple(blocks.shape)}")
    check_same_device(blocks.device, x=x)
    if x.dim() == 2:
        side = x.shape[1] if right else x.shape[0]
        if side != nb * b:
            raise ValueError(f"x: expected {'columns' if right else 'rows'} = nb * b = {nb * b} for blocks of "
                             f"shape {tuple(blocks.shape)}, got shape {tuple(x.shape)}")
    else:
        inner = x.shape[2] if right else x.shape[1]
        if x.shape[0] != nb or inner != b:
            want = (nb, "n", b) if right else (nb, b, "n")
            raise ValueError(f"x: expected a batch of shape {want} for blocks of shape {tuple(blocks.shape)}, "
                             f"got {tuple(x.shape)}")
    return tuple(x.shape)


def block_diagonal_matmul(blocks: torch.Tensor, x: torch.Tensor, transpose: bool = False, right: bool = False,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """``op(Bd) x`` or ``x op(Bd)`` (2-D x), or per block ``op(B_i) x_i`` / ``x_i op(B_i)`` (3-D x); see
    the module docstring. Returns fp32 (float64 on the reference path for float64 inputs) or ``out``."""
    shape = _matmul_problem(blocks, x, transpose, right)
    out = output(out, shape, x.device, result_dtype(blocks, x), blocks=blocks, x=x)
    if not use_triton(x.device):
        return block_diagonal_matmul_reference(blocks, x, transpose, right, out=out)
    check_kernel_dtypes(blocks=blocks, x=x, out=out)
    nb, b, _ = blocks.shape
    if out.numel() == 0:
        return out
    # left form: out_i = A_i x_i with A_i = op(B_i); a right product is the left product of transposes
    a_t = transpose != right
    sbb, sbr, sbc = blocks.stride()
    if a_t:
        sbr, sbc = sbc, sbr
    split = 1 if right else 0
    xv, ov = (x, out) if x.dim() == 3 else (x.unflatten(split, (nb, b)), out.unflatten(split, (nb, b)))
    if x.dim() == 2 and right:  # (n, nb, b) -> blocks first, block rows, then the n columns
        xs = (xv.stride(1), xv.stride(2), xv.stride(0))
        os_ = (ov.stride(1), ov.stride(2), ov.stride(0))
        n = x.shape[0]
    elif x.dim() == 2:
        xs, os_, n = xv.stride(), ov.stride(), x.shape[1]
    elif right:  # (nb, n, b): x_i op(B_i) = (op(B_i)^T x_i^T)^T
        xs = (xv.stride(0), xv.stride(2), xv.stride(1))
        os_ = (ov.stride(0), ov.stride(2), ov.stride(1))
        n = x.shape[1]
    else:
        xs, os_, n = xv.stride(), ov.stride(), x.shape[2]

    def run(config: Config) -> None:
        tiles_m = triton.cdiv(b, config["BLOCK_M"])
        _block_matmul_kernel[(nb * tiles_m * triton.cdiv(n, config["BLOCK_N"]),)](
            blocks, x, out, b, n, nb, tiles_m, sbb, sbr, sbc, *xs, *os_,
            UPCAST_DOT=upcast_dot(blocks.dtype, x.dtype), **config.launch_kwargs())

    BLOCK_MATMUL_CONFIGS.launch(device=x.device, bucket=shape_bucket(nb, b, n),
                                dtype=f"{blocks.dtype},{x.dtype},{out.dtype}", run=run)
    return out


def block_diagonal_matmul_reference(blocks: torch.Tensor, x: torch.Tensor, transpose: bool = False,
                                    right: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch twin of :func:`block_diagonal_matmul` (batched ``torch.matmul``; same contract)."""
    shape = _matmul_problem(blocks, x, transpose, right)
    dtype = result_dtype(blocks, x)
    nb, b, _ = blocks.shape
    a = blocks.to(dtype)
    if transpose:
        a = a.transpose(1, 2)
    xv = x.to(dtype)
    if x.dim() == 2:
        xv = xv.unflatten(1, (nb, b)).transpose(0, 1) if right else xv.unflatten(0, (nb, b))
    y = torch.matmul(xv, a) if right else torch.matmul(a, xv)
    if x.dim() == 2:
        y = y.transpose(0, 1).flatten(1) if right else y.flatten(0, 1)
    if out is None:
        return y.reshape(shape)
    return out.copy_(y.reshape(shape))


def _covariance_problem(x, block, ones_column, scale):
    check_tensor("x", x, 2)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block: expected an int >= 1, got {block!r}")
    check_flag("ones_column", ones_column)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a Python float, got {type(scale).__name__}")
    side = x.shape[1] + int(ones_column)
    return (triton.cdiv(side, block), block, block)


def block_covariance(x: torch.Tensor, block: int, ones_column: bool = False, scale: float = 1.0) -> torch.Tensor:
    """``scale * a_i^T a_i`` for the column blocks ``a_i`` of ``a = [x | 1]``: (cdiv(D, block), block,
    block) fp32 (float64 on the reference path for float64 x); see the module docstring."""
    shape = _covariance_problem(x, block, ones_column, scale)
    if not use_triton(x.device):
        return block_covariance_reference(x, block, ones_column, scale)
    check_kernel_dtypes(x=x)
    out = torch.empty(shape, dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    rows, d = x.shape

    def run(config: Config) -> None:
        tiles_b = triton.cdiv(block, config["BLOCK_B"])
        _block_covariance_kernel[(shape[0] * tiles_b * tiles_b,)](
            x, out, rows, d, block, tiles_b, x.stride(0), x.stride(1), *out.stride(), float(scale),
            ONES_COLUMN=ones_column, UPCAST=upcast_dot(x.dtype, x.dtype), **config.launch_kwargs())

    BLOCK_COVARIANCE_CONFIGS.launch(device=x.device, bucket=shape_bucket(rows, block, shape[0]),
                                    dtype=str(x.dtype), run=run)
    return out


def block_covariance_reference(x: torch.Tensor, block: int, ones_column: bool = False,
                               scale: float = 1.0) -> torch.Tensor:
    """Plain PyTorch twin of :func:`block_covariance` (materialises ``[x | 1]`` zero-padded to whole
    blocks; same contract)."""
    shape = _covariance_problem(x, block, ones_column, scale)
    dtype = result_dtype(x)
    a = x.to(dtype)
    if ones_column:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
    a = torch.nn.functional.pad(a, (0, shape[0] * block - a.shape[1]))
    a = a.unflatten(1, (shape[0], block)).transpose(0, 1)  # (nbt, rows, b)
    return torch.matmul(a.transpose(1, 2), a) * scale
