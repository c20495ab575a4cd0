"""Where a kernel call runs (the argument checks every launcher shares are in :mod:`.checks`).

Routing rule for a call whose tensors live on ``device``:

* CUDA tensors                          -> the compiled Triton kernel;
* CPU tensors with ``TRITON_INTERPRET=1`` -> the same Triton kernel, run by Triton's interpreter
  (how CI tests kernels without a GPU);
* any other tensors                     -> the kernel's plain PyTorch reference (``*_reference``).

``KFOPT_BACKEND=torch`` forces the reference everywhere; ``KFOPT_BACKEND=triton`` forces Triton and
fails loudly where Triton cannot run (CPU tensors without the interpreter).

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, i.e. when ``kfopt.kernels`` is first
imported, so it must be set before that import; ``INTERPRETER`` records the value seen then.

Interpreter defects handled here (both only while ``INTERPRETER_WORKAROUNDS`` is true, which it is
exactly under the interpreter):

* bf16 is stored as uint16 inside the interpreter, so bf16 arithmetic and bf16 ``tl.dot`` return
  garbage. Kernels load, convert to fp32 (``.to(tl.float32)``), compute in fp32 and cast on store --
  which is the library convention anyway -- and kernels that feed ``tl.dot`` with 16-bit operands
  receive ``UPCAST_DOT=dot_needs_upcast(dtype)`` as a constexpr.
* the interpreter's fp32 -> bf16 conversion truncates where the GPU rounds to nearest even. That is
  within every bf16 tolerance for a value stored once; a kernel that rewrites a bf16 state at every
  call (where truncation is a bias that accumulates) rounds explicitly before its store when
  ``store_needs_rounding(dtype)``.

``tests/test_compile_sm90.py`` records launches with the work-arounds off, so what it compiles for
the GPU is what a GPU run launches.
"""

from __future__ import annotations

import os

import torch
import triton.language as tl

from kfopt.autotune.space import INTERPRETER

#: Storage dtypes the Triton kernels accept (math is fp32 after loading).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def backend_override() -> str | None:
    """The value of ``KFOPT_BACKEND`` ("triton" or "torch"), or None when unset."""
    value = os.environ.get("KFOPT_BACKEND", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in ("triton", "torch"):
        raise ValueError(f"KFOPT_BACKEND must be 'triton', 'torch' or unset; got {value!r}")
    return value


def use_triton(device: torch.device) -> bool:
    """True when a kernel call on ``device`` runs Triton (compiled or interpreted)."""
    forced = backend_override()
    if forced == "torch":
        return False
    if device.type == "cuda" or (device.type == "cpu" and INTERPRETER):
        return True
    if forced == "triton":
        raise RuntimeError(
            f"KFOPT_BACKEND=triton cannot run on {device.type} tensors: Triton needs CUDA tensors, "
            "or CPU tensors with TRITON_INTERPRET=1 set before kfopt.kernels is imported"
        )
    return False


def tl_dtype(dtype: torch.dtype):
    """The Triton element type for a supported torch storage dtype."""
    return _TL_DTYPES[dtype]


#: Whether launchers apply the interpreter work-arounds (module docstring); read at every launch.
INTERPRETER_WORKAROUNDS: bool = INTERPRETER


def dot_needs_upcast(dtype: torch.dtype) -> bool:
    """bf16 ``tl.dot`` is wrong under the interpreter: upcast operands to fp32 there."""
    return INTERPRETER_WORKAROUNDS and dtype == torch.bfloat16


def store_needs_rounding(dtype: torch.dtype) -> bool:
    """The interpreter truncates fp32 -> bf16 stores: round to nearest even in the kernel there."""
    return INTERPRETER_WORKAROUNDS and dtype == torch.bfloat16


def is_dense(t: torch.Tensor) -> bool:
    """True when the elements of ``t`` fill one block of memory without gaps or overlaps, in any order
    (a tensor without elements is dense: it has no memory to fill)."""
    if t.numel() == 0:
        return True
    expected = 1
    for size, stride in sorted((d for d in zip(t.shape, t.stride()) if d[0] != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True
