"""Hyperparameter checks shared by kfopt's optimizers: each raises a ValueError naming the argument."""

from __future__ import annotations

import math
import numbers


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_nonnegative(name: str, value) -> None:
    """``value`` is a finite real number >= 0 (lr, weight_decay, momentum...)."""
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")


def check_positive(name: str, value) -> None:
    """``value`` is a finite real number > 0 (eps, damping...)."""
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")


def check_unit_interval(name: str, value) -> None:
    """``value`` lies in [0, 1) (a decay rate)."""
    if not _is_real(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1), got {value!r}")


def check_betas(name: str, betas, count: int = 2) -> None:
    """``betas`` is a tuple of ``count`` decay rates, each in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != count:
        raise ValueError(f"{name}: expected a tuple of {count} numbers in [0, 1), got {betas!r}")
    for i, beta in enumerate(betas):
        check_unit_interval(f"{name}[{i}]", beta)


def check_trust_clip(name: str, trust_clip) -> None:
    """``trust_clip`` is None or ``(min, max)`` with 0 <= min <= max (max may be inf)."""
    if trust_clip is None:
        return
    if (not isinstance(trust_clip, (tuple, list)) or len(trust_clip) != 2
            or not all(_is_real(x) and not math.isnan(x) for x in trust_clip)
            or not 0 <= trust_clip[0] <= trust_clip[1] or math.isinf(trust_clip[0])):
        raise ValueError(f"{name}: expected None or (min, max) with 0 <= min <= max, got {trust_clip!r}")


def check_optional_nonnegative(name: str, value) -> None:
    """``value`` is None or a finite number >= 0 (0 and None both disable, e.g. max_grad_norm)."""
    if value is not None:
        check_nonnegative(name, value)


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")


def check_loss_average(name: str, value) -> None:
    """``value`` is how the loss averages its terms: None (a sum), "batch" or "batch+sequence"."""
    if value not in (None, "batch", "batch+sequence"):
        raise ValueError(f"{name}: expected None, 'batch' or 'batch+sequence', got {value!r}")
