"""The optimizers ``kfopt compare`` knows: one ``OptimizerSpec`` entry each.

An optimizer is *available* when its module imports; ``kfopt compare`` with no ``--optimizers``
runs every available one of the default run (``in_default_run``), AdamW (the baseline) first, and
``--optimizers all`` every available one. The default run leaves out the variants whose method it
already shows (``_VARIANTS``): ``mkorh`` and ``mkorh-graft`` (MKOR-H hands over to its base only when
MKOR's loss stalls; in the measured default run they gave MKOR's and mkor-graft's numbers),
``sonew4`` (SONew with band 4) and ``singd-toeplitz`` (SINGD with Toeplitz factors); with them the
default chars run took 475 s of training on an idle 2-core CPU, without them 312 s (5.3 minutes in all,
measured with the grafted variants' settings below). The optimizers, how they are built (on the model
for Kronecker-factored methods, on parameter groups for element-wise ones) and the hyperparameters
they are built with come from kfopt's one registry, ``kfopt.registry.REGISTRY``; this module adds
what is specific to the comparison (``_COMPARE``): the default learning rate per task and
hyperparameters per task. Adding an optimizer to the comparison is one entry in ``_COMPARE``. Element-wise optimizers get ``kfopt.param_groups(model, weight_decay)`` (no decay for
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

The grafted variants (``kfac-graft``, ``mkor-graft``, ``mkorh-graft``, ``singd-graft``; ``kfopt.graft``) run
with AdamW's lr, betas, eps and weight decay (``ADAMW_LR``, ``ADAMW_DEFAULTS``: one declaration for both; their
``lr_of``: ``--lr adamw=...`` carries over to them, and a sweep reports them at AdamW's best grid point),
Adam's step length (``graft="adam"``, whose preconditioner takes Adam's first moment), no momentum on the
direction (the first moment already averages it) and preconditioner settings chosen for grafting (their
entries below).
What each was measured at, against which targets, why each setting, and by how much and why MKOR
misses: ``docs/grafting.md`` (Measured), the one place for those numbers.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch
from torch import nn

from kfopt.param_groups import param_groups
from kfopt.registry import REGISTRY as OPTIMIZERS
from kfopt.registry import OptimizerEntry


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
    in_default_run: bool = True
    #: the optimizer whose learning rate this one takes (the grafted entries: the baseline's): its ``--lr``
    #: carries over unless this one's own is given, and a sweep reports this one at that optimizer's best
    #: grid point rather than at its own best
    lr_of: str | None = None

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


#: AdamW's peak lr per task (the baseline's, and the grafted variants': they run with AdamW's settings)
ADAMW_LR = {"chars": 1.5e-3, "digits": 1e-2}
#: The optimizer every comparison includes and measures step-time overhead against.
BASELINE = "adamw"
#: AdamW's hyperparameters besides the lr (the baseline's; the grafted variants take its weight decay)
ADAMW_DEFAULTS = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
_GRAFTED = {"graft_betas": ADAMW_DEFAULTS["betas"], "graft_eps": ADAMW_DEFAULTS["eps"],
            "weight_decay": ADAMW_DEFAULTS["weight_decay"]}

#: compare's own data per optimizer of ``kfopt.registry.REGISTRY`` it runs: the peak lr per task, and
#: hyperparameters on top of the registry's (``defaults``; per task: ``task_defaults``)
_COMPARE: dict[str, dict] = {
    "lamb": dict(lr={"chars": 3e-2, "digits": 2e-2},
                 defaults={"betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01, "max_grad_norm": 1.0}),
    "lars": dict(lr={"chars": 10.0, "digits": 10.0}, defaults={"momentum": 0.9, "eta": 0.001}),
    "sonew": dict(lr={"chars": 8e-3, "digits": 1e-2}, defaults={"betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0}),
    "sonew4": dict(lr={"chars": 8e-3, "digits": 1e-2},
                   defaults={"betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0}),
    "kfac": dict(lr={"chars": 3e-2, "digits": 3e-2},
                 task_defaults={"chars": {"loss_average": "batch+sequence"}, "digits": {"damping": 0.1}}),
    "mkor": dict(lr={"chars": 3e-2, "digits": 2e-2}, task_defaults={"chars": {"loss_average": "batch+sequence"}}),
    "mkorh": dict(lr={"chars": 3e-2, "digits": 2e-2}, task_defaults={"chars": {"loss_average": "batch+sequence"}}),
    # singd's own normalize_lr_cov=False: the sweeps that chose these values ran with it
    "singd": dict(lr={"chars": 3e-3, "digits": 3e-3},
                  defaults={"T": 2, "lr_cov": 0.05, "damping": 1e-2, "normalize_lr_cov": False},
                  task_defaults={"chars": {"loss_average": "batch+sequence"}}),
    # the grafted variants: AdamW's lr and weight decay, each preconditioner's settings of its tuned entry;
    # no momentum on the preconditioned direction: Adam's first moment averages it already (measured while
    # the raw gradient was preconditioned, chars: K-FAC 2.446 without, 2.494 with 0.9; SINGD 2.513 without,
    # 2.689 with 0.9); the registry's graft="adam"; the measurements behind each setting: docs/grafting.md
    # K-FAC: factors averaged over fewer steps (factor_decay=0.8)
    "kfac-graft": dict(lr_of=BASELINE, defaults={**_GRAFTED, "momentum": 0.0, "factor_decay": 0.8},
                       task_defaults={"chars": {"loss_average": "batch+sequence"}, "digits": {"damping": 0.1}}),
    # MKOR: a rank-1 factor update every step (inv_freq=1)
    "mkor-graft": dict(lr_of=BASELINE, defaults={"inv_freq": 1, **_GRAFTED},
                       task_defaults={"chars": {"loss_average": "batch+sequence"}}),
    "mkorh-graft": dict(lr_of=BASELINE, defaults={"inv_freq": 1, **_GRAFTED},
                        task_defaults={"chars": {"loss_average": "batch+sequence"}}),
    # SINGD: factor updates every step with a larger normalized factor step and less damping than the
    # ungrafted entry's (with T=2, lr_cov=0.05, damping=1e-2 its preconditioner stays near the identity)
    "singd-graft": dict(lr_of=BASELINE, defaults={"T": 1, "lr_cov": 0.3, "damping": 1e-3, "momentum": 0.0, **_GRAFTED},
                        task_defaults={"chars": {"loss_average": "batch+sequence"}}),
    "singd-toeplitz": dict(lr={"chars": 3e-3, "digits": 3e-3},
                           defaults={"T": 2, "lr_cov": 0.05, "damping": 1e-2, "normalize_lr_cov": False},
                           task_defaults={"chars": {"loss_average": "batch+sequence"}}),
}


#: variants of a method the default run already shows, run by ``--optimizers all`` or by name (module docstring)
_VARIANTS = frozenset({"mkorh", "mkorh-graft", "sonew4", "singd-toeplitz"})


def _spec(entry: OptimizerEntry) -> OptimizerSpec:
    data = _COMPARE[entry.name]
    defaults = {**{k: v for k, v in entry.overrides.items() if k != "lr"}, **data.get("defaults", {})}  # lr: per task
    lr = data["lr"] if "lr" in data else {BASELINE: ADAMW_LR}[data["lr_of"]]  # the default of the lr taken
    return OptimizerSpec(entry.name, entry.module, entry.cls_name, lr=lr, defaults=defaults,
                         task_defaults=data.get("task_defaults", {}), takes_model=entry.takes_model,
                         summary=entry.summary, in_default_run=entry.name not in _VARIANTS,
                         lr_of=data.get("lr_of"))


REGISTRY: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("adamw", "torch.optim", "AdamW", lr=ADAMW_LR, defaults=ADAMW_DEFAULTS,
                           summary="torch.optim.AdamW, the baseline (always run)"),
    **{name: _spec(entry) for name, entry in OPTIMIZERS.items() if name in _COMPARE},
}


def available_optimizers() -> dict[str, OptimizerSpec]:
    """The registered optimizers whose modules import, in registry order (the baseline first)."""
    return {name: spec for name, spec in REGISTRY.items() if spec.unavailable_reason() is None}
