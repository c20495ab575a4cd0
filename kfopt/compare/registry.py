"""The optimizers ``kfopt compare`` knows: one ``OptimizerSpec`` entry each.

An optimizer is *available* when its module imports; ``kfopt compare`` with no ``--optimizers``
runs every available one, AdamW (the baseline) first. Adding an optimizer is one entry in
``REGISTRY``: its module and class, whether it takes the model (Kronecker-factored methods) or
parameter groups (element-wise methods), its default hyperparameters and its default learning rate
per task. Element-wise optimizers get ``kfopt.param_groups(model, weight_decay)`` (no decay for
biases and normalisation weights).

Defaults are each library's own defaults, except LARS (``weight_decay=1e-4``, ``always_adapt=True``:
its default ``weight_decay=0`` would leave every parameter without a trust ratio, i.e. plain SGD at
a LARS-sized lr), and the Kronecker-factored methods' ``task_defaults``: the chars task averages
its loss over tokens (``loss_average="batch+sequence"``), and K-FAC on the digits CNN needs damping
0.1 (1e-3 and 1e-2 made its validation loss unstable); SINGD runs with ``T=2, lr_cov=0.05,
damping=1e-2`` (the reference defaults barely move its factors in a short run). The values for
K-FAC, MKOR and SINGD come from sweeps on the chars task (SINGD's digits lr is the chars value,
not swept). Otherwise only the peak learning rate is task-specific (the runner applies the same warm-up
and cosine schedule to every optimizer). The values come from a sweep of each optimizer on the
``small`` size of each task with this command's default budget (seed 0, lrs spaced by 2-3x): the lr
with the lowest final validation loss, taking the smaller one when the next larger lr already
failed (AdamW on chars: 1.5e-3 and 2e-3 tie, 3e-3 stalls near loss 2.5). The sizes ``medium`` and
``large`` use the same values, except that LAMB on digits takes 2e-2 rather than the small-size best
3e-2, which spikes on the medium and large CNNs. Every value can be overridden on the command line
(``--lr lamb=3e-3``, ``--hparam lamb.weight_decay=0.1``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch
from torch import nn

from kfopt.param_groups import param_groups


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one optimizer for a model, and its documented defaults."""

    name: str
    module: str
    cls: str
    lr: dict[str, float]
    defaults: dict = field(default_factory=dict)
    task_defaults: dict[str, dict] = field(default_factory=dict)
    takes_model: bool = False
    summary: str = ""

    def unavailable_reason(self) -> str | None:
        """None when the optimizer's module imports; otherwise why it does not."""
        try:
            getattr(importlib.import_module(self.module), self.cls)
        except Exception as exc:  # noqa: BLE001 - any failure to import makes it unavailable
            return f"{type(exc).__name__}: {exc}"
        return None

    def build(self, model: nn.Module, lr: float, **overrides) -> torch.optim.Optimizer:
        """The optimizer for ``model`` with learning rate ``lr`` and ``defaults`` updated by ``overrides``."""
        cls = getattr(importlib.import_module(self.module), self.cls)
        hyper = self.hyperparameters(overrides)
        if self.takes_model:
            return cls(model, lr=lr, **hyper)
        weight_decay = hyper.pop("weight_decay", 0.0)
        return cls(param_groups(model, weight_decay), lr=lr, **hyper)

    def hyperparameters(self, overrides: dict) -> dict:
        """``defaults`` updated by ``overrides`` (what ``build`` passes besides ``lr``)."""
        return {**self.defaults, **overrides}


REGISTRY: dict[str, OptimizerSpec] = {spec.name: spec for spec in (
    OptimizerSpec("adamw", "torch.optim", "AdamW", lr={"chars": 1.5e-3, "digits": 1e-2},
                  defaults={"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01},
                  summary="torch.optim.AdamW, the baseline (always run)"),
    OptimizerSpec("lamb", "kfopt.lamb", "LAMB", lr={"chars": 3e-2, "digits": 2e-2},
                  defaults={"betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01, "max_grad_norm": 1.0},
                  summary="kfopt.LAMB, layer-wise trust ratio on Adam moments"),
    OptimizerSpec("lars", "kfopt.lars", "LARS", lr={"chars": 10.0, "digits": 10.0},
                  defaults={"momentum": 0.9, "weight_decay": 1e-4, "eta": 0.001, "always_adapt": True},
                  summary="kfopt.LARS, layer-wise trust ratio on SGD with momentum"),
    OptimizerSpec("sonew", "kfopt.sonew", "SONew", lr={"chars": 8e-3, "digits": 1e-2},
                  defaults={"band": 1, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0},
                  summary="kfopt.SONew, tridiagonal sparsified online Newton, Adam-grafted"),
    OptimizerSpec("sonew4", "kfopt.sonew", "SONew", lr={"chars": 8e-3, "digits": 1e-2},
                  defaults={"band": 4, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0},
                  summary="kfopt.SONew with band 4"),
    OptimizerSpec("kfac", "kfopt.kfac", "KFAC", lr={"chars": 3e-2, "digits": 3e-2}, takes_model=True,
                  task_defaults={"chars": {"loss_average": "batch+sequence"}, "digits": {"damping": 0.1}},
                  summary="kfopt.KFAC (eigen, KAISA), SGD base with momentum"),
    OptimizerSpec("mkor", "kfopt.mkor", "MKOR", lr={"chars": 3e-2, "digits": 2e-2}, takes_model=True,
                  task_defaults={"chars": {"loss_average": "batch+sequence"}},
                  summary="kfopt.MKOR, rank-1 inverse factors, LAMB base"),
    OptimizerSpec("mkorh", "kfopt.mkor", "MKORH", lr={"chars": 3e-2, "digits": 2e-2}, takes_model=True,
                  task_defaults={"chars": {"loss_average": "batch+sequence"}},
                  summary="kfopt.MKORH, MKOR with the loss-rate switch to LAMB"),
    OptimizerSpec("singd", "kfopt.singd", "SINGD", lr={"chars": 3e-3, "digits": 3e-3}, takes_model=True,
                  defaults={"T": 2, "lr_cov": 0.05, "damping": 1e-2},
                  task_defaults={"chars": {"loss_average": "batch+sequence"}},
                  summary="kfopt.SINGD, dense structured factors"),
    OptimizerSpec("singd-toeplitz", "kfopt.singd", "SINGD", lr={"chars": 3e-3, "digits": 3e-3}, takes_model=True,
                  defaults={"T": 2, "lr_cov": 0.05, "damping": 1e-2, "structures": ("triltoeplitz", "diagonal")},
                  task_defaults={"chars": {"loss_average": "batch+sequence"}},
                  summary="kfopt.SINGD, lower-triangular Toeplitz K and diagonal C"),
)}

#: The optimizer every comparison includes and measures step-time overhead against.
BASELINE = "adamw"


def available_optimizers() -> dict[str, OptimizerSpec]:
    """The registered optimizers whose modules import, in registry order (the baseline first)."""
    return {name: spec for name, spec in REGISTRY.items() if spec.unavailable_reason() is None}
