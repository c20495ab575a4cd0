"""``LayerState``: the base of the per-layer records of the capturing optimizers (K-FAC, MKOR, SINGD),
and ``check_state_keys``/``check_saved_factors`` for loading their checkpoints."""

from __future__ import annotations

import torch
from torch import nn

from .capture import CapturedLayer


class LayerState:
    """A preconditioned layer as an optimizer keeps it: its capture entry (``kfopt.capture``), name,
    weight and bias; subclasses add their factors."""

    def __init__(self, captured: CapturedLayer):
        self.captured = captured
        self.name = captured.name

    @property
    def weight(self) -> nn.Parameter:
        return self.captured.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.captured.bias


def check_state_keys(saved: dict, keys: tuple[str, ...], owner: str) -> None:
    """ValueError naming the missing entries unless the checkpoint part ``saved`` holds ``keys``."""
    if not isinstance(saved, dict):
        raise ValueError(f"state_dict: the {owner}'s state must be a dict, got {type(saved).__name__}")
    missing = [key for key in keys if key not in saved]
    if missing:
        raise ValueError(f"state_dict: the {owner}'s state has no {', '.join(map(repr, missing))}")


def check_saved_factors(saved: dict, layers: list[LayerState], keys: tuple[str, ...], owner: str) -> None:
    """ValueError unless ``saved`` (``{layer name: {key: tensor}}``) holds the factors ``keys`` of exactly
    these layers, each of the shape of ``getattr(layer, key)``; ``owner`` names the loading object."""
    names = [layer.name for layer in layers]
    if not isinstance(saved, dict):
        raise ValueError(f"state_dict: the {owner}'s factors must be a dict, got {type(saved).__name__}")
    if set(saved) != set(names):
        raise ValueError(f"state_dict has factors for layers {sorted(saved)}, the {owner} has layers {sorted(names)}")
    for layer in layers:
        check_state_keys(saved[layer.name], keys, f"{owner}'s layer {layer.name!r}")
        for key in keys:
            if not isinstance(saved[layer.name][key], torch.Tensor):
                raise ValueError(f"state_dict: factor {key} of layer {layer.name!r} is not a tensor")
            shape, expected = saved[layer.name][key].shape, getattr(layer, key).shape
            if shape != expected:
                raise ValueError(f"state_dict: factor {key} of layer {layer.name!r} has shape {tuple(shape)}, "
                                 f"expected {tuple(expected)}")
