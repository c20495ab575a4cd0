"""Hierarchical factor x dense products (SINGD's ``hierarchical{k1}_{k2}`` structure).

The d x d matrix, with ``s = k1 + m`` and d = k1 + m + k2 (A: k1 x k1, B = [B1 | B2]: k1 x (m + k2),
c: m, D: k2 x m, E: k2 x k2)::

        [ A  B1       B2 ]
    H = [ 0  diag(c)  0  ]
        [ 0  D        E  ]

Conventions (``op``, ``right``, dtypes, strides) are those of :mod:`kfopt.kernels.structured`::

    hierarchical_matmul(A, B, c, D, E, x, transpose=False, right=False) = op(H) x   or   x op(H)

For the left product: ``H x = [A x_t + B x_{m,b}; c * x_m; D x_m + E x_b]`` and
``H^T x = [A^T x_t; B1^T x_t + c * x_m + D^T x_b; B2^T x_t + E^T x_b]`` (x_t, x_m, x_b: the rows of x
in the three ranges).

Kernel: one program per (row tile, column tile) of ``op(H) x``, all on grid axis 0, row tiles fastest
(``structured.launch_left_product``). The k range is cut into the three ranges [0, k1), [k1, s), [s, d),
and a program visits only those its rows have non-zeros in: for ``H``, top rows need all three, middle
rows only the k tiles over their own diagonal, bottom rows [k1, d); for ``H^T``, every row needs
[0, k1), middle rows their diagonal tiles and [s, d), bottom rows [s, d). Each visited BM x BK tile of
``op(H)`` is gathered from the five tensors (masked loads, exactly one of which holds each element) and
fed to ``tl.dot``. Cost for k1, k2 << d: about 2 n d (k1 + k2 + 2 BK) flops instead of the dense
product's 2 n d^2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import use_triton
from .checks import check_flag, check_kernel_dtypes, check_same_device, check_tensor
from .structured import (
    launch_left_product,
    output,
    result_dtype,
    tile_gemm_space,
)

HIERARCHICAL_CONFIGS = tile_gemm_space("hierarchical_matmul", block_m=(16, 32, 64), block_n=(32, 64, 128),
                                       block_k=(16, 32), warps=(4,), default=(32, 64, 16))


@triton.jit
def _h_element_tile(a_ptr, b_ptr, c_ptr, d_ptr, e_ptr, r, k, k1, m, dim, s_a0, s_a1, s_b0, s_b1, s_c,
                    s_d0, s_d1, s_e0, s_e1):
    """H[r, k] for an (R, 1) row-index and a (1, K) column-index tensor, fp32 (0 outside H)."""
    s = k1 + m
    r64 = r.to(tl.int64)
    k64 = k.to(tl.int64)
    top = r < k1
    bottom = (r >= s) & (r < dim)
    v = tl.load(a_ptr + r64 * s_a0 + k64 * s_a1, mask=top & (k < k1), other=0.0).to(tl.float32)
    v += tl.load(b_ptr + r64 * s_b0 + (k64 - k1) * s_b1, mask=top & (k >= k1) & (k < dim), other=0.0).to(tl.float32)
    v += tl.load(c_ptr + (r64 - k1) * s_c, mask=(r >= k1) & (r < s) & (k == r), other=0.0).to(tl.float32)
    v += tl.load(d_ptr + (r64 - s) * s_d0 + (k64 - k1) * s_d1, mask=bottom & (k >= k1) & (k < s),
                 other=0.0).to(tl.float32)
    v += tl.load(e_ptr + (r64 - s) * s_e0 + (k64 - s) * s_e1, mask=bottom & (k >= s) & (k < dim),
                 other=0.0).to(tl.float32)
    return v


@triton.jit
def _h_range(acc, a_ptr, b_ptr, c_ptr, d_ptr, e_ptr, x_ptr, rm, rn, lo, hi, k1, m, dim, n,
             s_a0, s_a1, s_b0, s_b1, s_c, s_d0, s_d1, s_e0, s_e1, s_xr, s_xc,
             TRANS: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += op(H)[rm, lo:hi] x[lo:hi, rn]."""
    for k0 in range(lo, hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        if TRANS:
            tile = tl.trans(_h_element_tile(a_ptr, b_ptr, c_ptr, d_ptr, e_ptr, rk[:, None], rm[None, :], k1, m, dim,
                                            s_a0, s_a1, s_b0, s_b1, s_c, s_d0, s_d1, s_e0, s_e1))
        else:
            tile = _h_element_tile(a_ptr, b_ptr, c_ptr, d_ptr, e_ptr, rm[:, None], rk[None, :], k1, m, dim,
                                   s_a0, s_a1, s_b0, s_b1, s_c, s_d0, s_d1, s_e0, s_e1)
        tile = tl.where((rk[None, :] < hi), tile, 0.0)
        xv = tl.load(x_ptr + rk.to(tl.int64)[:, None] * s_xr + rn.to(tl.int64)[None, :] * s_xc,
                     mask=(rk[:, None] < hi) & (rn[None, :] < n), other=0.0)
        if UPCAST_DOT:
            xv = xv.to(tl.float32)
        else:
            tile = tile.to(xv.dtype)
        acc = tl.dot(tile, xv, acc, input_precision="ieee")
    return acc


@triton.jit
def _hierarchical_matmul_kernel(
    x_ptr, out_ptr, n, s_xr, s_xc, s_or, s_oc,
    a_ptr, b_ptr, c_ptr, d_ptr, e_ptr, k1, m, dim, s_a0, s_a1, s_b0, s_b1, s_c, s_d0, s_d1, s_e0, s_e1,
    TRANS: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[rows, cols] = op(H)[rows, :] x[:, cols], visiting only the k ranges with non-zeros."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(dim, BLOCK_M)
    m0 = (pid % tiles_m) * BLOCK_M
    rm = m0 + tl.arange(0, BLOCK_M)
    rn = (pid // tiles_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    s = k1 + m
    has_top = m0 < k1
    has_mid = (m0 < s) & (m0 + BLOCK_M > k1)
    has_bottom = (m0 + BLOCK_M > s) & (s < dim)
    if TRANS:  # rows of H^T: [0, k1) always, the own diagonal (middle rows), [s, d) (middle, bottom rows)
        hi1 = k1
        lo2 = tl.maximum(m0, k1)
        hi2 = tl.minimum(m0 + BLOCK_M, s)
        lo3 = tl.where(has_mid | has_bottom, s, dim)
    else:  # rows of H: all of k (top rows), [k1, d) (bottom rows), the own diagonal (middle rows)
        full = has_top | has_bottom
        hi1 = tl.where(has_top, k1, 0)
        lo2 = tl.where(full, k1, tl.maximum(m0, k1))
        hi2 = tl.where(full, s, tl.minimum(m0 + BLOCK_M, s))
        lo3 = tl.where(full, s, dim)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _h_range(acc, a_ptr, b_ptr, c_ptr, d_ptr, e_ptr, x_ptr, rm, rn, 0, hi1, k1, m, dim, n,
                   s_a0, s_a1, s_b0, s_b1, s_c, s_d0, s_d1, s_e0, s_e1, s_xr, s_xc, TRANS, UPCAST_DOT, BLOCK_K)
    acc = _h_range(acc, a_ptr, b_ptr, c_ptr, d_ptr, e_ptr, x_ptr, rm, rn, lo2, hi2, k1, m, dim, n,
                   s_a0, s_a1, s_b0, s_b1, s_c, s_d0, s_d1, s_e0, s_e1, s_xr, s_xc, TRANS, UPCAST_DOT, BLOCK_K)
    acc = _h_range(acc, a_ptr, b_ptr, c_ptr, d_ptr, e_ptr, x_ptr, rm, rn, lo3, dim, k1, m, dim, n,
                   s_a0, s_a1, s_b0, s_b1, s_c, s_d0, s_d1, s_e0, s_e1, s_xr, s_xc, TRANS, UPCAST_DOT, BLOCK_K)
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * s_or + rn.to(tl.int64)[None, :] * s_oc,
             acc.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < dim) & (rn[None, :] < n))


def _problem(a, b, c, d, e, x, transpose, right) -> tuple[int, int, int]:
    for name, t, ndim in (("a", a, 2), ("b", b, 2), ("c", c, 1), ("d", d, 2), ("e", e, 2), ("x", x, 2)):
        check_tensor(name, t, ndim)
    check_flag("transpose", transpose)
    check_flag("right", right)
    check_same_device(x.device, a=a, b=b, c=c, d=d, e=e)
    k1, m, k2 = a.shape[0], c.shape[0], e.shape[0]
    dim = k1 + m + k2
    expected = {"a": (k1, k1), "b": (k1, m + k2), "d": (k2, m), "e": (k2, k2)}
    for name, t in (("a", a), ("b", b), ("d", d), ("e", e)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name}: expected shape {expected[name]} for A {tuple(a.shape)}, c {tuple(c.shape)}, "
                             f"E {tuple(e.shape)}, got {tuple(t.shape)}")
    side = x.shape[1] if right else x.shape[0]
    if side != dim:
        raise ValueError(f"x: expected {'columns' if right else 'rows'} = {dim} (k1 + m + k2), got shape "
                         f"{tuple(x.shape)}")
    return k1, m, k2


def hierarchical_matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, e: torch.Tensor,
                        x: torch.Tensor, transpose: bool = False, right: bool = False,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """``op(H) x`` or ``x op(H)`` for the hierarchical ``H`` of (A, B, c, D, E); see the module docstring.
    Returns fp32 (float64 on the reference path for float64 inputs) or ``out``."""
    k1, m, k2 = _problem(a, b, c, d, e, x, transpose, right)
    out = output(out, tuple(x.shape), x.device, result_dtype(a, x), a=a, b=b, c=c, d=d, e=e, x=x)
    if not use_triton(x.device):
        return hierarchical_matmul_reference(a, b, c, d, e, x, transpose, right, out=out)
    check_kernel_dtypes(a=a, b=b, c=c, d=d, e=e, x=x, out=out)
    if len({t.dtype for t in (a, b, c, d, e)}) != 1:
        raise TypeError("a, b, c, d, e: expected one dtype for the five parts of the structure, got "
                        f"{[str(t.dtype) for t in (a, b, c, d, e)]}")
    if out.numel() == 0:
        return out
    dim = k1 + m + k2
    structure = (a, b, c, d, e, k1, m, dim, *a.stride(), *b.stride(), c.stride(0), *d.stride(), *e.stride())
    return launch_left_product(HIERARCHICAL_CONFIGS, _hierarchical_matmul_kernel, structure, a.dtype, x, out, dim,
                               transpose, right, bucket=(k1 + k2,))


def hierarchical_matmul_reference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor,
                                  e: torch.Tensor, x: torch.Tensor, transpose: bool = False, right: bool = False,
                                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch twin of :func:`hierarchical_matmul` (the block formulas of the module docstring;
    same contract)."""
    k1, m, _ = _problem(a, b, c, d, e, x, transpose, right)
    dtype = result_dtype(a, x)
    a, b, c, d, e = (t.to(dtype) for t in (a, b, c, d, e))
    xl = x.to(dtype)
    if right:
        xl = xl.T
    s = k1 + m
    xt, xm, xb = xl[:k1], xl[k1:s], xl[s:]
    if transpose != right:
        y = torch.cat([a.T @ xt, b[:, :m].T @ xt + c[:, None] * xm + d.T @ xb, b[:, m:].T @ xt + e.T @ xb])
    else:
        y = torch.cat([a @ xt + b @ xl[k1:], c[:, None] * xm, d @ xm + e @ xb])
    if right:
        y = y.T
    return y if out is None else out.copy_(y)
