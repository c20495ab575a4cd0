"""The one registry of kfopt's optimizers: ``REGISTRY`` maps a name to an :class:`OptimizerEntry`.

An entry says how to build the optimizer (on a model, or on parameters / param groups), the
hyperparameters the registry builds it with (its *defaults*: the class's own defaults updated by
``overrides``), and what it promises:

* ``kind``: ``"elementwise"`` (LAMB, LARS, SONew, HeavyBall: a rule per parameter tensor; built on
  ``kfopt.param_groups(model, weight_decay)``, no decay for biases and normalisation weights) or
  ``"kronecker"`` (K-FAC, MKOR, MKOR-H, SINGD: Kronecker-factored preconditioning of a model's
  ``nn.Linear``/``nn.Conv2d`` layers, captured by forward/backward hooks; built on the model).
* ``skips_non_finite``: a step with a NaN/inf gradient changes no parameter and counts in
  ``skipped_steps`` (without a GradScaler). False where the base optimizer decides (K-FAC's SGD).
  The grafted entries (``graft != "none"``) also skip a step whose own update is not finite, leaving
  factors and weights as they were, and count it in ``blown_up_steps`` (``kfopt.optimizer``).
* ``composed``: a second-order preconditioner in front of a base optimizer (``optimizer.base``,
  ``kfopt.composed``).
* ``intervals``: the hyperparameters that set how often cached second-order data is refreshed,
  with their defaults (a checkpoint may be taken at any phase of them).

Who reads it: the contract suite (``tests/contracts``: every contract runs for every entry), the
benchmarks (``perf/``) and ``kfopt compare`` (``kfopt.compare.registry`` layers its per-task
learning rates and the AdamW baseline on top). Adding an optimizer is one entry here.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .param_groups import param_groups

Kind = Literal["elementwise", "kronecker"]


@dataclass(frozen=True)
class OptimizerEntry:
    """How to build one kfopt optimizer and what it promises (module docstring)."""

    name: str
    module: str
    cls_name: str
    kind: Kind
    #: hyperparameters that differ from the class's defaults when the registry builds it
    overrides: dict = field(default_factory=dict)
    skips_non_finite: bool = True
    composed: bool = False
    #: interval hyperparameter -> its default (the class's default)
    intervals: dict[str, int] = field(default_factory=dict)
    summary: str = ""

    @property
    def takes_model(self) -> bool:
        """Whether the constructor takes the model (Kronecker-factored) rather than param groups."""
        return self.kind == "kronecker"

    @property
    def cls(self) -> type[torch.optim.Optimizer]:
        return getattr(importlib.import_module(self.module), self.cls_name)

    @property
    def period(self) -> int:
        """Steps in one period of the default update intervals (1 without intervals)."""
        return max(self.intervals.values(), default=1)

    def hyperparameters(self, **overrides) -> dict:
        """The keyword arguments ``build`` passes (``overrides`` updated by ``overrides``)."""
        return {**self.overrides, **overrides}

    def build(self, model: nn.Module, lr: float | None = None, **overrides) -> torch.optim.Optimizer:
        """The optimizer for ``model`` (a model-taking optimizer gets the model; an element-wise one
        ``kfopt.param_groups(model, weight_decay)``), with ``lr`` (None: the default) and the entry's
        hyperparameters updated by ``overrides``."""
        hyper = self.hyperparameters(**overrides)
        if lr is not None:
            hyper["lr"] = lr
        if self.takes_model:
            return self.cls(model, **hyper)
        weight_decay = hyper.pop("weight_decay", self.default("weight_decay"))
        return self.cls(param_groups(model, weight_decay), **hyper)

    def build_on_params(self, params: Iterable, **overrides) -> torch.optim.Optimizer:
        """An element-wise optimizer over ``params`` (tensors or param groups) as given."""
        if self.takes_model:
            raise TypeError(f"{self.name} is built on a model, not on parameters")
        return self.cls(params, **self.hyperparameters(**overrides))

    def default(self, name: str):
        """The value ``build`` uses for hyperparameter ``name`` (the override or the class default)."""
        if name in self.overrides:
            return self.overrides[name]
        return inspect.signature(self.cls).parameters[name].default


REGISTRY: dict[str, OptimizerEntry] = {entry.name: entry for entry in (
    OptimizerEntry("lamb", "kfopt.lamb", "LAMB", "elementwise",
                   summary="kfopt.LAMB, layer-wise trust ratio on Adam moments"),
    # LARS's own weight_decay=0 would leave every parameter without a trust ratio (plain SGD)
    OptimizerEntry("lars", "kfopt.lars", "LARS", "elementwise",
                   overrides={"weight_decay": 1e-4, "always_adapt": True},
                   summary="kfopt.LARS, layer-wise trust ratio on SGD with momentum"),
    OptimizerEntry("sonew", "kfopt.sonew", "SONew", "elementwise",
                   summary="kfopt.SONew, tridiagonal sparsified online Newton, Adam-grafted"),
    OptimizerEntry("sonew4", "kfopt.sonew", "SONew", "elementwise", overrides={"band": 4},
                   summary="kfopt.SONew with band 4"),
    OptimizerEntry("heavy_ball", "kfopt.heavy_ball", "HeavyBall", "elementwise", overrides={"momentum": 0.9},
                   summary="kfopt.heavy_ball.HeavyBall, SGD with heavy-ball momentum (SINGD's default base)"),
    OptimizerEntry("kfac", "kfopt.kfac", "KFAC", "kronecker", skips_non_finite=False, composed=True,
                   intervals={"factor_update_steps": 1, "inv_update_steps": 10},
                   summary="kfopt.KFAC (eigen, KAISA), SGD base with momentum"),
    OptimizerEntry("kfac-inverse", "kfopt.kfac", "KFAC", "kronecker", overrides={"compute_method": "inverse"},
                   skips_non_finite=False, composed=True,
                   intervals={"factor_update_steps": 1, "inv_update_steps": 10},
                   summary="kfopt.KFAC with damped Cholesky inverses"),
    OptimizerEntry("mkor", "kfopt.mkor", "MKOR", "kronecker", composed=True, intervals={"inv_freq": 10},
                   summary="kfopt.MKOR, rank-1 inverse factors, LAMB base"),
    OptimizerEntry("mkorh", "kfopt.mkor", "MKORH", "kronecker", composed=True, intervals={"inv_freq": 10},
                   summary="kfopt.MKORH, MKOR with the loss-rate switch to LAMB"),
    # grafted variants (kfopt.graft): the preconditioner's direction with AdamW's step length, at AdamW's
    # default lr and weight decay -- the settings a user coming from AdamW keeps
    OptimizerEntry("kfac-graft", "kfopt.kfac", "KFAC", "kronecker",
                   overrides={"graft": "adam", "lr": 1e-3, "weight_decay": 1e-2}, composed=True,
                   intervals={"factor_update_steps": 1, "inv_update_steps": 10},
                   summary="kfopt.KFAC, grafted: its direction, a first-order step length (AdamW's lr, weight decay)"),
    OptimizerEntry("mkor-graft", "kfopt.mkor", "MKOR", "kronecker", overrides={"graft": "adam"}, composed=True,
                   intervals={"inv_freq": 10},
                   summary="kfopt.MKOR, grafted: its direction, a first-order step length (AdamW's lr, weight decay)"),
    OptimizerEntry("mkorh-graft", "kfopt.mkor", "MKORH", "kronecker", overrides={"graft": "adam"}, composed=True,
                   intervals={"inv_freq": 10},
                   summary="kfopt.MKORH, grafted: its direction, a first-order step length (AdamW's lr, weight decay)"),
    OptimizerEntry("singd-graft", "kfopt.singd", "SINGD", "kronecker",
                   overrides={"graft": "adam", "weight_decay": 1e-2}, composed=True, intervals={"T": 10},
                   summary="kfopt.SINGD, grafted: its direction, a first-order step length (AdamW's lr, weight decay)"),
    OptimizerEntry("singd", "kfopt.singd", "SINGD", "kronecker", composed=True, intervals={"T": 10},
                   summary="kfopt.SINGD, dense structured factors"),
    OptimizerEntry("singd-toeplitz", "kfopt.singd", "SINGD", "kronecker",
                   overrides={"structures": ("triltoeplitz", "diagonal")}, composed=True, intervals={"T": 10},
                   summary="kfopt.SINGD, lower-triangular Toeplitz K and diagonal C"),
)}
