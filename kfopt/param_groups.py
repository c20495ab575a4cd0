"""``param_groups``: split a model's parameters into a decayed and a no-decay group."""

from __future__ import annotations

from torch import nn

#: Module types whose weights are scales, not projections: never decayed.
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, nn.RMSNorm)


def param_groups(model: nn.Module, weight_decay: float, **group_options) -> list[dict]:
    """``[{"params": decayed, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]``.

    No decay for biases (every parameter with fewer than 2 dimensions) and for the weights of
    normalisation layers; everything else (Linear/Conv/Embedding weights...) is decayed. With LAMB and
    LARS the no-decay group is also not trust-ratio adapted (r = 1) unless ``always_adapt`` is set.
    Shared parameters appear once. Parameters with ``requires_grad=False`` are left out. Empty groups
    are dropped. ``group_options`` are added to both groups.
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            (no_decay if isinstance(module, NORM_TYPES) or p.dim() < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, **group_options},
              {"params": no_decay, "weight_decay": 0.0, **group_options}]
    return [g for g in groups if g["params"]]
