"""Shared pieces of the structured-factor kernels (SINGD's ``K`` and ``C``; the "bf16/fp16 structured
factor GEMMs"): argument checks, result dtypes, the dot-operand rule, and launch helpers.

The kernel families live in one module each, every public function with its PyTorch ``*_reference``:

* :mod:`.block_diagonal` -- ``block_diagonal_matmul`` (batched small GEMMs), ``block_covariance``
  (per-block Gram matrices of a batch of rows);
* :mod:`.triangular` -- ``triangular_matmul`` (packed triangular x dense, the zero half skipped), and
  the kernel and launcher it shares with ``toeplitz_matmul``;
* :mod:`.toeplitz` -- ``toeplitz_matmul`` (triangular Toeplitz x dense, tiles built from the
  coefficient vector; the triangular kernel) and ``lag_sums`` (streamed lag sums: the Toeplitz
  projection of ``S^T S`` without forming it);
* :mod:`.diagonal_scaling` -- ``diagonal_matmul`` and ``diagonal_from_inner``;
* :mod:`.hierarchical_products` -- ``hierarchical_matmul``.

Conventions shared by all of them:

* ``op(M)`` is ``M`` or ``M^T`` (``transpose``); ``right=False`` computes ``op(M) @ x``, ``right=True``
  computes ``x @ op(M)``. Kernels are written for the left product; a right product is the left
  product of the transposes, ``x op(M) = (op(M)^T x^T)^T``, launched on transposed views (strides
  only, nothing copied).
* Operands may be fp32, bf16 or fp16 on the Triton path, in any combination; math is fp32 (``tl.dot``
  accumulates in fp32; two equal 16-bit operands run the dot in that dtype, anything else converts both
  to fp32 and uses ``input_precision="ieee"``, no TF32). Results are fp32 unless ``out`` is given
  (any kernel dtype, written in place). The references compute in fp32, or float64 when an input is
  float64 (the tests' reference).
* Inputs may be any strided view (strides are passed to the kernels); ``out`` must not share memory with
  an input (ValueError).

Shared launch pieces: :func:`tile_gemm_space` (the candidate tiles of a kernel accumulating
``BLOCK_M x BLOCK_K`` by ``BLOCK_K x BLOCK_N`` tiles with ``tl.dot``) and :func:`launch_left_product`
(the right-product transpose above, the one-axis grid of ``cdiv(d, BLOCK_M) * cdiv(n, BLOCK_N)`` tiles of
``op(M) x`` for a d x d ``M``, and the tuned config).

Grids: CUDA takes up to 2^31 - 1 programs on grid axis 0 but only 65535 on axes 1 and 2 (the interpreter
has no limit). The n of these products is often the number of activation rows (batch x sequence, millions),
so every launcher here puts its tiles on axis 0 alone and the kernel splits ``tl.program_id(0)`` into
tile indices, the fastest-varying index being the one whose programs share an operand tile (e.g. the row
tiles of one column tile of ``x``: the same linear order a 2-D (row tile, column tile) grid had).
"""

from __future__ import annotations

import torch
import triton

from kfopt.autotune import Config, ConfigSpace, shape_bucket

from .aliasing import check_no_overlap
from .checks import check_same_device, check_shape, check_tensor
from .dispatch import dot_needs_upcast


def result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32, or float64 when an input is float64: the dtype the references compute in."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def output(out: torch.Tensor | None, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype,
           **inputs: torch.Tensor) -> torch.Tensor:
    """``out`` checked against ``shape``/``device`` and against sharing memory with any of ``inputs``
    (the kernels read the inputs tile by tile while writing ``out``), or a new tensor of ``dtype``."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    check_tensor("out", out)
    check_shape("out", out, shape)
    check_same_device(device, out=out)
    check_no_overlap([("out", out)], list(inputs.items()), writer="the kernel")
    return out


def upcast_dot(a: torch.dtype, b: torch.dtype) -> bool:
    """Whether ``tl.dot`` operands of these storage dtypes are converted to fp32 first: when they
    differ, or where the interpreter gets bf16 dots wrong."""
    return a != b or dot_needs_upcast(a) or dot_needs_upcast(b)


def tile_gemm_space(kernel: str, block_m: tuple[int, ...], block_n: tuple[int, ...], block_k: tuple[int, ...],
                    warps: tuple[int, ...], default: tuple[int, int, int]) -> ConfigSpace:
    """The ``ConfigSpace`` (autotune cache name ``kernel``) of a tile-GEMM kernel with constexprs
    ``BLOCK_M, BLOCK_N, BLOCK_K``: every combination of the given tile sides and warp counts, each with 2
    and 3 pipeline stages; the default is the tile sides ``default`` with 4 warps and 2 stages."""
    configs = [Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=stages)
               for bm in block_m for bn in block_n for bk in block_k for w in warps for stages in (2, 3)]
    bm, bn, bk = default
    return ConfigSpace(kernel, configs,
                       Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4, num_stages=2))


def launch_left_product(space: ConfigSpace, kernel, structure: tuple, dtype: torch.dtype, x: torch.Tensor,
                        out: torch.Tensor, d: int, transpose: bool, right: bool, bucket: tuple[int, ...] = (),
                        **constexprs) -> torch.Tensor:
    """``out = op(M) x`` or ``x op(M)`` for a d x d structure ``M`` stored in ``dtype``; returns ``out``.

    The kernel computes the left product ``out = A x`` with ``A = op(M)`` (``TRANS``: ``A = M^T``); a right
    product runs it on the transposed views, ``x op(M) = (op(M)^T x^T)^T``. It is launched as
    ``kernel[grid](x, out, n, x strides, out strides, *structure, TRANS=, UPCAST_DOT=, **constexprs,
    BLOCK_M=, BLOCK_N=, BLOCK_K=)`` over ``grid = (cdiv(d, BLOCK_M) * cdiv(n, BLOCK_N),)`` (axis 0 only: n
    may be millions of rows), with the config ``space`` selects for the shape bucket ``(d, n, *bucket)``
    and the dtypes and ``TRANS``. The kernel takes row tile ``pid % cdiv(d, BLOCK_M)`` and column tile
    ``pid // cdiv(d, BLOCK_M)``: consecutive programs share the column tile of ``x`` they read."""
    trans = transpose != right
    xl, ol = (x.T, out.T) if right else (x, out)
    n = xl.shape[1]

    def run(config: Config) -> None:
        grid = (triton.cdiv(d, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
        kernel[grid](xl, ol, n, *xl.stride(), *ol.stride(), *structure, TRANS=trans,
                     UPCAST_DOT=upcast_dot(dtype, x.dtype), **constexprs, **config.launch_kwargs())

    space.launch(device=x.device, bucket=shape_bucket(d, n, *bucket),
                 dtype=f"{dtype},{x.dtype},{out.dtype},{trans}", run=run)
    return out
