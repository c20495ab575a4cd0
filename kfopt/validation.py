"""Hyperparameter and checkpoint checks shared by kfopt's optimizers: each raises a ValueError naming
the argument (or the checkpoint entry) that does not fit."""

from __future__ import annotations

import math
import numbers

import torch


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_nonnegative(name: str, value) -> None:
    """``value`` is a finite real number >= 0 (lr, weight_decay, momentum...)."""
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")


def check_device_lr(name: str, value) -> None:
    """``value`` is a finite number >= 0, or a one-element floating tensor: its value is checked on the
    device by the fused kernels (LAMB, LARS, SONew, grafting), without a host synchronisation, and an invalid one
    (NaN, negative, infinite) skips the step and counts it in ``skipped_steps``."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point() or value.requires_grad:
            raise ValueError(f"{name}: expected a finite number >= 0 or a one-element floating tensor (no grad), "
                             f"got a tensor of shape {tuple(value.shape)} and dtype {value.dtype}")
        return
    check_nonnegative(name, value)


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


# -- checkpoints: load_state_dict checks everything before it changes anything --------------------

#: the key of a kfopt ``state_dict()`` that records the optimizer kind (its class name)
KIND_KEY = "kfopt_optimizer"

#: (shape, allowed dtypes, required): what one entry of a parameter's saved state must be
TensorSpec = tuple[tuple[int, ...], tuple, bool]


def check_keys(saved, keys, where: str) -> None:
    """ValueError unless ``saved`` is a dict holding ``keys``."""
    if not isinstance(saved, dict):
        raise ValueError(f"{where}: expected a dict, got {type(saved).__name__}")
    missing = [key for key in keys if key not in saved]
    if missing:
        raise ValueError(f"{where} has no {', '.join(map(repr, missing))}")


def check_int(name: str, value, minimum: int = 0) -> None:
    """``value`` is an int >= ``minimum`` (a saved counter)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def check_tensor(name: str, value, shape, dtypes) -> None:
    """``value`` is a tensor of ``shape`` with a dtype in ``dtypes`` (one dtype or a tuple)."""
    dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(value.shape)}, expected {tuple(shape)}")
    if value.dtype not in dtypes:
        raise ValueError(f"{name}: dtype {value.dtype}, expected {' or '.join(map(str, dtypes))}")


def check_counter(name: str, value) -> None:
    """A saved skip counter: a 0-d int32 tensor."""
    check_tensor(name, value, (), torch.int32)


def check_kind(state_dict: dict, accepted: tuple[str, ...], mine: str) -> None:
    """ValueError unless ``state_dict`` records one of the optimizer kinds ``accepted``."""
    kind = state_dict.get(KIND_KEY)
    if kind not in accepted:
        raise ValueError(f"state_dict is a checkpoint of {kind!r}, not of {mine} (expected "
                         f"{KIND_KEY} in {list(accepted)})")


def check_param_state(where: str, saved, spec: dict[str, TensorSpec] | None) -> None:
    """ValueError unless the saved state of one parameter fits ``spec`` (None: not checked)."""
    if not isinstance(saved, dict):
        raise ValueError(f"{where}: expected a dict, got {type(saved).__name__}")
    if spec is None:
        return
    unknown = sorted(set(saved) - set(spec), key=str)
    if unknown:
        raise ValueError(f"{where} has entries {unknown} this optimizer does not keep (expected {sorted(spec)})")
    missing = [key for key, (_, _, required) in spec.items() if required and key not in saved]
    if missing and saved:
        raise ValueError(f"{where} has no {', '.join(map(repr, missing))}")
    for key, value in saved.items():
        shape, dtypes, _ = spec[key]
        check_tensor(f"{where}[{key!r}]", value, shape, dtypes)

