"""The argument checks every kernel launcher shares, one error type per kind of mistake.

* ``TypeError``: the argument is the wrong kind of object -- not a tensor, a tensor of a dtype the
  kernel does not take, a flag that is not a bool, a number that is not a real number.
* ``ValueError``: the right kind of object with a wrong value -- a shape, a count of tensors, a
  device, a memory layout (contiguity, density, strides), an out-of-range number, or memory shared
  between tensors the kernel writes (:func:`kfopt.kernels.aliasing.check_no_overlap`).

Every message starts with the argument's name (``name[i]`` for an entry of a list). The checks read
only metadata (dtypes, shapes, strides, devices): no device synchronisation.
"""

from __future__ import annotations

import numbers
from typing import Iterable, Sequence

import torch

from .dispatch import KERNEL_DTYPES, is_dense


def check_tensor(name: str, t, ndim: int | tuple[int, ...] | None = None) -> None:
    """TypeError unless ``t`` is a floating-point tensor; ValueError unless it has ``ndim`` dimensions
    (one of them, for a tuple; any number for None)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        dims = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in dims:
            raise ValueError(f"{name}: expected a tensor with {' or '.join(map(str, dims))} dimensions, "
                             f"got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")


def check_dtype(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...], what: str = "") -> None:
    """TypeError unless ``t.dtype`` is one of ``dtypes`` (``what`` says for what, e.g. "state")."""
    if t.dtype not in dtypes:
        names = [str(d).removeprefix("torch.") for d in dtypes]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        raise TypeError(f"{name}: expected dtype {listed}{' ' + what if what else ''}; got {t.dtype}")


def check_kernel_dtype(name: str, t: torch.Tensor) -> None:
    """TypeError unless ``t`` has a storage dtype the Triton kernels accept."""
    check_dtype(name, t, KERNEL_DTYPES, "for the Triton kernels")


def check_kernel_dtypes(**tensors: torch.Tensor | None) -> None:
    """:func:`check_kernel_dtype` for every given tensor (None: skipped)."""
    for name, t in tensors.items():
        if t is not None:
            check_kernel_dtype(name, t)


def check_same_device(device: torch.device, **tensors) -> None:
    """ValueError unless every given tensor is on ``device``. Values are tensors, sequences of tensors
    (entries named ``name[i]``) or None (skipped, as are None entries)."""
    for name, value in tensors.items():
        single = value is None or isinstance(value, torch.Tensor)
        for i, t in enumerate((value,) if single else value):
            if t is not None and t.device != device:
                label = name if single else f"{name}[{i}]"
                raise ValueError(f"{label} is on {t.device}, expected {device} like the other tensors")


def check_count(name: str, tensors: Sequence, n: int) -> None:
    """ValueError unless ``tensors`` holds ``n`` entries."""
    if len(tensors) != n:
        raise ValueError(f"{name}: expected {n} tensors, got {len(tensors)}")


def check_shape(name: str, t: torch.Tensor, shape: Iterable[int]) -> None:
    """ValueError unless ``t`` has ``shape``."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def check_dense(name: str, t: torch.Tensor) -> None:
    """ValueError unless ``t``'s elements fill one block of memory (:func:`is_dense`)."""
    if not is_dense(t):
        raise ValueError(f"{name} must be dense (its elements filling one block of memory, in any order); "
                         f"got shape {tuple(t.shape)}, strides {t.stride()}")


def check_contiguous(name: str, t: torch.Tensor, why: str = "") -> None:
    """ValueError unless ``t`` is contiguous (row-major)."""
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous{' (' + why + ')' if why else ''}; got strides {t.stride()}")


def check_strides_like(name: str, t: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    """ValueError unless ``t`` has the strides of ``like`` (so one offset addresses both)."""
    if t.stride() != like.stride():
        raise ValueError(f"{name} must have the strides of {like_name}: got {t.stride()}, expected {like.stride()}")


def check_flag(name: str, value) -> None:
    """TypeError unless ``value`` is True or False."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")


def check_number(name: str, value) -> None:
    """TypeError unless ``value`` is a real Python number (bools count: 0 and 1)."""
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
