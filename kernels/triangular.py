"""Lower-triangular x dense products, the zero half skipped (SINGD's triangular and Toeplitz structures).

Two storages of a lower-triangular d x d matrix ``M`` (an upper-triangular matrix is ``M^T``: the same
storage read transposed):

* packed (this module): ``T[i, j] = packed[i (i + 1) / 2 + j]`` for ``j <= i`` -- the rows one after the
  other, row i holding ``T[i, 0..i]``, d (d + 1) / 2 elements;
* Toeplitz (:mod:`.toeplitz`): ``L[i, j] = c[i - j]`` for ``j <= i`` -- the first column ``c``, d elements.

Conventions (``op``, ``right``, dtypes, strides) are those of :mod:`kfopt.kernels.structured`::

    triangular_matmul(packed, x, transpose=False, right=False) = op(T) x   or   x op(T)

and ``toeplitz_matmul(c, x, ...)`` is the same product with ``L``; both run :func:`lower_triangular_matmul`.

Kernel (both storages): one program per (row tile, column tile) of the left product ``A x`` (``A = M``
or ``M^T``), all on grid axis 0, row tiles fastest (``structured.launch_left_product``). Row tile
``[m0, m0 + BM)`` of a lower ``A`` has non-zeros only in columns ``< m0 + BM``, of an upper ``A`` only
in columns ``>= m0``: the k loop covers that range only, so about half of the dense GEMM's tiles are
visited: about n d (d + BM) flops instead of the dense product's 2 n d^2. Each BM x BK tile of ``A`` is
gathered in registers from the storage (``TOEPLITZ``: from ``c[i - j]``, otherwise from the packed
rows), masked to the triangle, and fed to ``tl.dot``: the d x d matrix never exists. The two storages
keep their own ``ConfigSpace`` (``TRIANGULAR_CONFIGS``, ``toeplitz.TOEPLITZ_CONFIGS``: the same
candidates, tuned and cached apart).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from kfopt.autotune import ConfigSpace

from .dispatch import use_triton
from .checks import check_flag, check_kernel_dtypes, check_same_device, check_tensor
from .structured import (
    launch_left_product,
    output,
    result_dtype,
    tile_gemm_space,
)

TRIANGULAR_CONFIGS = tile_gemm_space("triangular_matmul", block_m=(32, 64, 128), block_n=(32, 64, 128),
                                     block_k=(32, 64), warps=(4, 8), default=(32, 64, 32))


@triton.jit
def _lower_triangular_kernel(
    x_ptr, out_ptr, n, s_xr, s_xc, s_or, s_oc, m_ptr, d, s_m,
    TRANS: tl.constexpr, UPCAST_DOT: tl.constexpr, TOEPLITZ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[rows, cols] = A[rows, :] x[:, cols] with A = M (lower) or M^T (TRANS); M[i, j] (j <= i) is
    m[i - j] (TOEPLITZ) or m[i (i + 1) / 2 + j] (packed)."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(d, BLOCK_M)
    m0 = (pid % tiles_m) * BLOCK_M
    rm = m0 + tl.arange(0, BLOCK_M)
    rn = (pid // tiles_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    if TRANS:
        k_lo = (m0 // BLOCK_K) * BLOCK_K
        k_hi = d
    else:
        k_lo = 0
        k_hi = tl.minimum(m0 + BLOCK_M, d)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        rk = k + tl.arange(0, BLOCK_K)
        rk64 = rk.to(tl.int64)
        if TRANS:  # A[r, c] = M[c, r], non-zero for r <= c
            i = rk64[None, :]
            j = rm64[:, None]
            inside = (rm[:, None] <= rk[None, :]) & (rk[None, :] < d)
        else:  # A[r, c] = M[r, c], non-zero for c <= r
            i = rm64[:, None]
            j = rk64[None, :]
            inside = (rk[None, :] <= rm[:, None]) & (rm[:, None] < d)
        if TOEPLITZ:
            offs = i - j
        else:
            offs = i * (i + 1) // 2 + j
        a = tl.load(m_ptr + offs * s_m, mask=inside, other=0.0)
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


def lower_triangular_problem(storage: torch.Tensor, x: torch.Tensor, transpose: bool, right: bool,
                             toeplitz: bool) -> int:
    """The checks of both paths of ``triangular_matmul`` (``packed``) and ``toeplitz_matmul``
    (``coeffs``, when ``toeplitz``), errors naming the argument; returns d."""
    name = "coeffs" if toeplitz else "packed"
    check_tensor(name, storage, 1)
    check_tensor("x", x, 2)
    check_flag("transpose", transpose)
    check_flag("right", right)
    check_same_device(storage.device, x=x)
    d = storage.numel() if toeplitz else packed_side(storage.numel())
    side = x.shape[1] if right else x.shape[0]
    if side != d:
        origin = "the length of coeffs" if toeplitz else f"packed has d (d + 1) / 2 = {storage.numel()} elements"
        raise ValueError(f"x: expected {'columns' if right else 'rows'} = {d} ({origin}), got shape {tuple(x.shape)}")
    return d


def lower_triangular_matmul(storage: torch.Tensor, x: torch.Tensor, transpose: bool, right: bool,
                            out: torch.Tensor | None, *, toeplitz: bool, space: ConfigSpace,
                            reference: Callable[..., torch.Tensor]) -> torch.Tensor:
    """The launcher of ``triangular_matmul`` and ``toeplitz_matmul``: ``op(M) x`` or ``x op(M)`` for the
    lower-triangular ``M`` in ``storage`` (Toeplitz coefficients when ``toeplitz``, else packed rows),
    tuned in ``space``; ``reference`` (the function's ``*_reference``) where Triton does not run."""
    d = lower_triangular_problem(storage, x, transpose, right, toeplitz)
    out = output(out, tuple(x.shape), x.device, result_dtype(storage, x), x=x,
                 **{"coeffs" if toeplitz else "packed": storage})
    if not use_triton(x.device):
        return reference(storage, x, transpose, right, out=out)
    check_kernel_dtypes(**{"coeffs" if toeplitz else "packed": storage}, x=x, out=out)
    if out.numel() == 0:
        return out
    return launch_left_product(space, _lower_triangular_kernel, (storage, d, storage.stride(0)), storage.dtype,
                               x, out, d, transpose, right, TOEPLITZ=toeplitz)


def triangular_matmul(packed: torch.Tensor, x: torch.Tensor, transpose: bool = False, right: bool = False,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """``op(T) x`` or ``x op(T)`` with ``T`` lower triangular, packed by rows; see the module docstring.
    Returns fp32 (float64 on the reference path for float64 inputs) or ``out``."""
    return lower_triangular_matmul(packed, x, transpose, right, out, toeplitz=False, space=TRIANGULAR_CONFIGS,
                                   reference=triangular_matmul_reference)


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
    lower_triangular_problem(packed, x, transpose, right, toeplitz=False)
    dtype = result_dtype(packed, x)
    t = unpack_lower(packed.to(dtype))
    if transpose:
        t = t.T
    y = x.to(dtype) @ t if right else t @ x.to(dtype)
    return y if out is None else out.copy_(y)
