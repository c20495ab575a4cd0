"""Tiny models, training steps and comparisons shared by the contract tests."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from kfopt.registry import REGISTRY, OptimizerEntry

#: every registered optimizer, by name (each contract runs for all of them)
NAMES = list(REGISTRY)


def one_per_module() -> list[str]:
    """The first entry of each optimizer module (the interpreter runs the kernels of each once; MKOR-H
    runs MKOR's, and its own logic is checked on the PyTorch path)."""
    seen, names = set(), []
    for name, entry in REGISTRY.items():
        if entry.module not in seen:
            seen.add(entry.module)
            names.append(name)
    return names


def tiny_model(seed: int = 0) -> nn.Module:
    """Two Linear layers (width <= 6), deterministic."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def one_layer_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """One Linear layer (4 -> 3, the shapes of ``batch``), deterministic: the cheapest model under the
    interpreter."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3)).to(dtype)


def conv_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A Conv2d (the inputs of ``batch`` as 1x2x2 images) and a Linear layer, deterministic."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Unflatten(1, (1, 2, 2)), nn.Conv2d(1, 4, 2, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(36, 3)).to(dtype)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)


def backward(model: nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step)
    dtype = next(model.parameters()).dtype
    loss = ((model(x.to(dtype)).float() - y) ** 2).mean()
    loss.backward()
    return loss


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    optimizer.zero_grad()
    backward(model, step)
    optimizer.step()


def build(entry: OptimizerEntry | str, model: nn.Module | None = None, **overrides):
    entry = REGISTRY[entry] if isinstance(entry, str) else entry
    model = tiny_model() if model is None else model
    return model, entry.build(model, **overrides)


def clone_tree(tree):
    """A deep copy of a state dict with every tensor cloned (nothing aliases the live state)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: clone_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(clone_tree(v) for v in tree)
    return copy.deepcopy(tree)


def assert_same_tree(a, b, path: str = "state_dict") -> None:
    """``a`` and ``b`` are equal bit for bit: same structure, tensors of the same shape, dtype and bits."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: tensor vs {type(b).__name__}"
        assert a.shape == b.shape and a.dtype == b.dtype, f"{path}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        assert torch.equal(a.cpu(), b.cpu()) or (
            a.is_floating_point() and torch.equal(a.cpu().view(-1).isnan(), b.cpu().view(-1).isnan())
            and torch.equal(a.cpu().nan_to_num(0.0), b.cpu().nan_to_num(0.0))), f"{path}: values differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs " \
            f"{sorted(map(str, b)) if isinstance(b, dict) else type(b).__name__}"
        for k in a:
            assert_same_tree(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}[{i}]")
    elif callable(a):
        assert callable(b), f"{path}: {a!r} vs {b!r}"
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} vs {b!r}"


def assert_same_params(a: nn.Module, b: nn.Module, what: str = "") -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.dtype == q.dtype and torch.equal(p, q), f"{what}parameter {name} differs: " \
            f"max |diff| {(p.double() - q.double()).abs().max().item():.3e}"


def hook_count(model: nn.Module) -> int:
    """Every module and parameter hook registered on ``model``."""
    count = 0
    for module in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_state_dict_hooks", "_load_state_dict_pre_hooks"):
            count += len(getattr(module, attr, {}) or {})
    for p in model.parameters():
        count += len(getattr(p, "_backward_hooks", None) or {})
        count += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    return count


def infinite_direction(graft_step):
    """``graft_step`` handed an infinite preconditioned gradient for the first preconditioned tensor, from
    finite gradients: what a preconditioner blowing up gives the graft."""
    def blown_up(params, grads, directions, *args, precondition, **kwargs):
        directions = list(directions)
        i = precondition.index(True)
        directions[i] = torch.full_like(directions[i], math.inf)
        return graft_step(params, grads, directions, *args, precondition=precondition, **kwargs)
    return blown_up
