"""``ComposedOptimizer``: a second-order preconditioner (``kfopt.preconditioner.Preconditioner``: K-FAC's,
MKOR's, SINGD's) in front of a base optimizer (``KFAC``, ``MKOR``, ``SINGD``).

The param groups come from the model (``kfopt.param_groups``; ``add_param_group`` after construction
raises; SINGD's come from its ``params`` and it takes groups later) and the base optimizer is built from
*the same group dicts*: ``self.base.param_groups is self.param_groups`` and ``self.state is
self.base.state``, so an LR scheduler (or a user) changing a group's hyperparameters drives the base
step. ``base``: ``"sgd"`` (``torch.optim.SGD``), ``"adamw"``
(``torch.optim.AdamW``), ``"lamb"`` (``kfopt.LAMB``), ``"heavy_ball"`` (``kfopt.heavy_ball.HeavyBall``,
SINGD's default), or a callable ``base(param_groups) -> torch.optim.Optimizer`` that must build its
optimizer from the dicts it is given. A step is::

    loss = closure()                                  (when given)
    GradScaler overflow (_grad_scaler_skips_step):    _discard_step(), nothing else changes
    otherwise, graft="none":                          verdict = _second_order_step(); base.step()
                                                      (_base_step: with the verdict, below)
    otherwise, graft="adam" ("rmsprop", "sgd"):       raw gradients kept (the preconditioned layers'
                                                      gradients replaced by Adam's new first moment
                                                      for "adam"), _second_order_step(), then the
                                                      grafted update of ``kfopt.graft`` (the base
                                                      optimizer does not step); a step the graft skips
                                                      (a non-finite gradient or update, a bad tensor
                                                      lr) also leaves the factors and second-order
                                                      data as they were

Grafting (``kfopt.graft``): the weight and bias of every preconditioned layer take their preconditioned
gradient's direction with the graft's step length, every other parameter the graft's update itself;
``lr`` (also a one-element tensor, read on the device: ``device_lr``), ``weight_decay`` (decoupled) and
the subclass's momentum on the direction (``_graft_momentum``) come from the param group. The raw
gradients of the preconditioned layers are copied before the preconditioner overwrites them (4 bytes per
fp32 parameter of transient memory). The per-parameter state is then the graft's (the base optimizer
keeps none). The graft kernel decides on the device whether the step is taken (``kfopt.graft``); the
subclass snapshots what its second-order step changes (``_snapshot``; e.g. K-FAC's factors: transient
memory the size of the factors, on factor-update steps) and puts it back where the step was skipped
(``_keep_or_restore``). A skipped step whose gradients (and tensor lrs) were finite is a blow-up of the
optimizer's own update: counted in ``blown_up_steps`` too, with a once-only warning
(``kfopt.optimizer``).

The verdict: ``_second_order_step()`` returns None (K-FAC, MKOR: the base steps as it would alone) or a
0-d device bool, whether the second-order step found everything finite (SINGD: gradients, statistics,
tensor lrs, its new factors and natural gradients; the subclass counted the steps it rejects and
committed its new factors only where it holds). A base with ``takes_verdict`` (``HeavyBall``) takes it on
the device (``step(verdict=...)``: nothing changes where it is False); any other base steps only where it
holds, read on the host (one synchronisation per step). With grafting the verdict is the graft
kernel's ``found_inf``, and the graft counts only the steps it skips beyond it.

Grafting on FSDP2/HSDP-sharded parameters (``kfopt.sharding``; every parameter sharded alike, checked
at construction: ``ValueError`` naming the odd one): the graft's state is laid out like the parameters
(DTensors), the first moments and the grafted update are computed on the local shards, and the graft's
whole-tensor norms are summed over the shard group (``reduce``, ``kfopt.graft``), so its verdict ``ok`` is
the same on every rank and the subclasses keep or restore their owners' second-order state alike; the
finite-input verdict (blow-up or bad gradient) is agreed over the ranks by the preconditioner's
distributor (``all_finite``: one all-reduce of one value). HSDP's replicas hold the same shards and compute
the same.

``base.step()`` runs under ``kfopt.autotune.agree_on_configs()``: under ``torch.distributed`` every rank
steps the same replicated weights, so the ranks use the same kernel configs (bit-identical replicas).

``state_dict()`` is the base optimizer's plus ``state_key`` (the preconditioner's state),
``"kfopt_optimizer"`` (this class's name), ``"base_optimizer"`` (the base's class name),
``"<state_key>_skipped_steps"`` and ``"blown_up_steps"``; ``distributed_state_dict()`` is the same for
``torch.distributed.checkpoint`` (its ``get_optimizer_state_dict`` keeps param groups and per-parameter
state only: the preconditioner's part goes beside it; DCP's step with zero gradients and lr 0 that
creates a missing per-parameter state steps the base optimizer alone; with grafting the graft's state
is created as zeros first, so that step, which would run the graft, is not taken);
``load_state_dict`` checks all of it (the base's per-parameter state for kfopt bases and torch's SGD
and AdamW) before it changes anything (the GradScaler skips). ``skipped_steps`` is one count of every
skipped step: those plus the base optimizer's own (``base="lamb"`` skips non-finite steps). ``defaults`` names
the base optimizer's ``betas`` or ``momentum``, so momentum-cycling LR schedulers (``OneCycleLR``'s
default ``cycle_momentum=True``, ``CyclicLR``) drive the base's.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Literal

import torch

from kfopt.autotune import agree_on_configs

from .graft import create_graft_state, first_moments, graft_state_spec, grafted_step
from .heavy_ball import HeavyBall
from .lamb import LAMB
from .optimizer import KfoptOptimizer
from .param_groups import param_groups
from .preconditioner import Preconditioner
from .sharding import like_param, local
from .validation import KIND_KEY, check_counter, check_device_lr, check_keys, check_kind, check_nonnegative

BaseOptimizer = Literal["sgd", "adamw", "lamb", "heavy_ball"] | Callable[[list[dict]], torch.optim.Optimizer]

#: the base optimizers by name
BASE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW,
                                                           "lamb": LAMB, "heavy_ball": HeavyBall}


def check_base(base) -> None:
    """ValueError naming ``base`` unless it is a name of ``BASE_OPTIMIZERS`` or a callable."""
    if not (base in BASE_OPTIMIZERS if isinstance(base, str) else callable(base)):
        raise ValueError(f"base: expected one of {', '.join(map(repr, BASE_OPTIMIZERS))} or a callable building an "
                         f"optimizer from param groups, got {base!r}")


class ComposedOptimizer(KfoptOptimizer):
    """The shared machinery of K-FAC and MKOR (module docstring): ``self.preconditioner`` in front of
    ``self.base``. Subclasses set ``state_key`` and ``scaled_statistic``, validate their arguments and
    call :meth:`_compose`."""

    _counts_blowups = True  # grafted steps only: the base optimizer's are its own business

    #: the key of the preconditioner's state in ``state_dict()``
    state_key: str
    #: the statistic built from output gradients (named when a GradScaler finds them scaled)
    scaled_statistic: str
    preconditioner: Preconditioner

    def _compose(self, preconditioner: Preconditioner, defaults: dict, base: BaseOptimizer, **base_kwargs) -> None:
        """``self.preconditioner``, the param groups ``kfopt.param_groups(model, defaults["weight_decay"])``
        with ``defaults``, and the base optimizer (:meth:`_build_base`); if that raises, the
        preconditioner's hooks are removed from the model."""
        self.preconditioner = preconditioner
        self._model = preconditioner.capture.model  # the model the param groups come from
        self._base_choice = base  # the base's name or callable (``_shardable``)
        try:
            super().__init__(param_groups(preconditioner.capture.model, defaults["weight_decay"]), defaults)
            self._build_base(base, **base_kwargs)
        except BaseException:
            preconditioner.capture.remove()
            raise

    def _named_params(self):
        """Each parameter by its name in ``self._model`` (``"0.weight"``; one added by ``add_param_group`` by
        its place in the groups), for the errors that name one."""
        names = {p: name for name, p in self._model.named_parameters()}
        return [(names.get(p, place), p) for place, p in super()._named_params()]

    def _build_base(self, base: BaseOptimizer, **kwargs) -> None:
        """``self.base`` from ``self.param_groups`` (the same dicts): ``BASE_OPTIMIZERS[base](groups,
        **kwargs)`` or ``base(groups)``."""
        check_base(base)
        if isinstance(base, str):
            optimizer = BASE_OPTIMIZERS[base](self.param_groups, **kwargs)
        else:
            optimizer = base(self.param_groups)
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise ValueError(f"base: the callable returned {type(optimizer).__name__}, not a torch.optim.Optimizer")
            if len(optimizer.param_groups) != len(self.param_groups) or any(
                    mine is not theirs for mine, theirs in zip(self.param_groups, optimizer.param_groups)):
                raise ValueError("base: the callable must build its optimizer from the param groups it is given "
                                 f"(e.g. lambda groups: torch.optim.Adam(groups)), so that {type(self).__name__}'s "
                                 "param_groups (and LR schedulers) drive it")
        self.base = optimizer
        optimizer.param_groups = self.param_groups
        self.state = optimizer.state
        # schedulers that cycle momentum (OneCycleLR, CyclicLR) look for "betas" or "momentum" in
        # ``defaults``: name the one the base optimizer uses (the shared groups carry it)
        for key in ("betas", "momentum"):
            if key in optimizer.defaults:
                self.defaults.setdefault(key, optimizer.defaults[key])

    @property
    def _shardable(self) -> bool:
        """Whether DTensor parameters are checked here, at construction (``kfopt.sharding``: ``self._layout``),
        naming them by their model names: when grafting, which steps the local shards with whole-tensor norms
        reduced over the shard group, and when the base is one of kfopt's optimizers that reduce over it too
        (LAMB, HeavyBall: this check comes before theirs). Otherwise the base optimizer steps them."""
        base = self._base_choice
        return self.defaults["graft"] != "none" or (
            isinstance(base, str) and getattr(BASE_OPTIMIZERS[base], "_shardable", None) is True)

    @property
    def device_lr(self) -> bool:
        """A tensor ``lr`` is taken when grafting (the grafting kernel reads it on the device; a NaN,
        negative or infinite one skips the step and counts it); the base optimizers take numbers."""
        return self.defaults["graft"] != "none"

    def _check_lr(self, group: dict) -> None:
        """ValueError naming ``lr`` unless it is a number >= 0, or (``device_lr``) a one-element tensor."""
        (check_device_lr if self.device_lr else check_nonnegative)("lr", group["lr"])

    @property
    def skipped_steps(self) -> torch.Tensor:
        """Every skipped step, one 0-d int32 count: the GradScaler skips (here) plus the base optimizer's
        own (``base="lamb"`` skips a step with a non-finite gradient on the device)."""
        own = super().skipped_steps
        base = getattr(self.base, "skipped_steps", None) if hasattr(self, "base") else None
        return own if not isinstance(base, torch.Tensor) else own.to(base.device) + base

    def add_param_group(self, param_group: dict) -> None:
        if hasattr(self, "base"):
            raise NotImplementedError(f"{type(self).__name__}'s param groups come from its model; add parameters "
                                      "to the model before building the optimizer")
        super().add_param_group(param_group)

    # -- the step -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """``_second_order_step()`` (factors, preconditioned gradients), then ``base.step()``; under a
        GradScaler that found inf/NaN nothing but the skip count changes. Hyperparameters (also the base
        optimizer's) are checked first: an invalid one raises ValueError before anything changes."""
        self._check_hyperparameters()
        loss = self._evaluate(closure)
        if self._grad_scaler_skips_step(self.scaled_statistic):
            self._discard_step()
            return loss
        if self._distributed_checkpoint:  # DCP's step with zero gradients and lr 0 that creates the state:
            with agree_on_configs():  # the base optimizer's alone
                self.base.step()
            return loss
        if self.defaults["graft"] == "none":
            verdict = self._second_order_step()
            with agree_on_configs():  # every rank steps the same replicated weights
                self._base_step(verdict)
        else:
            self._grafted_step()
        return loss

    def _base_step(self, verdict: torch.Tensor | None) -> None:
        """``base.step()`` after a second-order step whose ``verdict`` (module docstring) is None or a 0-d
        device bool: a base with ``takes_verdict`` steps where it holds (on the device), any other base
        steps only if it holds, read on the host (a synchronisation)."""
        if verdict is None:
            self.base.step()
        elif getattr(self.base, "takes_verdict", False):
            self.base.step(verdict=verdict)
        elif verdict.item():
            self.base.step()

    def _grafted_step(self) -> None:
        """The raw gradients of the preconditioned parameters kept, ``_second_order_step()``, then one
        grafted update of every parameter with a gradient (module docstring); a skipped step leaves the
        second-order state as it was (``_snapshot``, ``_keep_or_restore``). A verdict of the second-order
        step (counted there) skips the graft too; the graft counts the steps it skips beyond it."""
        found = self._params_with_grads()
        if not found:
            self._second_order_step()
            return
        preconditioned = {id(p) for p in self._preconditioned_params()}
        raw = [p.grad.clone() if id(p) in preconditioned else p.grad for _, p in found]
        reduce = self._layout.reduce  # sharded parameters: the shard group's sum (kfopt.graft)
        moments = [(group, p, local(p.grad)) for group, p in found if id(p) in preconditioned]
        if self.defaults["graft"] == "adam" and moments:  # the preconditioner gets Adam's first moment
            torch._foreach_copy_([g for _, _, g in moments], first_moments(self.state, moments))  # (kfopt.graft)
        snapshot = self._snapshot()
        verdict = self._second_order_step()
        entries = [(group, p, g, self._direction(p) if id(p) in preconditioned else None,
                    self._graft_momentum(group)) for (group, p), g in zip(found, raw)]
        skipped = self._skip_counter(found[0][1].device)
        # every rank steps the same replicated weights; sharded: kfopt.sharding's tuning of the shards
        with agree_on_configs(), self._layout.tuning():
            ok = grafted_step(self.state, entries, None if verdict is not None else skipped,
                              found_inf=None if verdict is None else ~verdict, reduce=reduce) != 0
        if verdict is not None:  # the second-order step counted the steps it vetoed (and its blow-ups)
            skipped.add_((verdict & ~ok).to(torch.int32))
        finite = verdict if verdict is not None else self._finite_gradients(raw)
        self._count_blowup(finite, ok)
        self._keep_or_restore(ok, snapshot)

    def _finite_gradients(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Whether every raw gradient (and tensor lr) is finite, agreed over the ranks by the
        preconditioner's distributor (sharded: each rank judges its shards; as SINGD's own verdict): where
        it holds and the grafted step was skipped, the optimizer's own update blew up."""
        return self.preconditioner.distributor.all_finite(self._finite_inputs([local(g) for g in grads]))

    def _snapshot(self):
        """What ``_second_order_step`` is about to change (factors, second-order data), for
        ``_keep_or_restore``."""
        raise NotImplementedError

    def _keep_or_restore(self, ok: torch.Tensor, snapshot) -> None:
        """Keep this step's second-order state where the grafted step was taken (``ok``, a 0-d device bool),
        else put the ``_snapshot()`` back."""
        raise NotImplementedError

    def _direction(self, p: torch.Tensor) -> torch.Tensor:
        """The preconditioned gradient of ``p`` after ``_second_order_step()``: its ``.grad``."""
        return p.grad

    def _preconditioned_params(self) -> list[torch.Tensor]:
        """The weights and biases whose gradients ``_second_order_step`` replaces."""
        return self.preconditioner.preconditioned_params()

    def _graft_momentum(self, group: dict) -> float:
        """The momentum of the grafted direction (``kfopt.graft``); 0: none."""
        return 0.0

    def _check_hyperparameters(self) -> None:
        super()._check_hyperparameters()
        if isinstance(self.base, KfoptOptimizer):
            self.base._check_hyperparameters()

    def _check_saved_group(self, group: dict) -> None:
        self._check_group(group)
        if isinstance(self.base, KfoptOptimizer):
            self.base._check_group(group)

    def _state_spec(self, p: torch.Tensor, group: dict) -> dict | None:
        """The base optimizer's per-parameter state (kfopt bases, torch's SGD and AdamW; callables: None), or
        the graft's when grafting."""
        if self.defaults["graft"] != "none":
            return graft_state_spec(p)
        base, shape = self.base, tuple(p.shape)
        if isinstance(base, KfoptOptimizer):
            return base._state_spec(p, group)
        if type(base) is torch.optim.SGD:
            return {"momentum_buffer": (shape, (p.dtype,), False)}
        if type(base) is torch.optim.AdamW:
            return {"step": ((), (torch.float32, torch.float64), True), "exp_avg": (shape, (p.dtype,), True),
                    "exp_avg_sq": (shape, (p.dtype,), True), "max_exp_avg_sq": (shape, (p.dtype,), False)}
        return None

    def _second_order_step(self) -> torch.Tensor | None:
        """Update the factors when due and replace the layers' gradients by preconditioned ones; the verdict
        (module docstring)."""
        return self.preconditioner.step()

    def _discard_step(self) -> None:
        """Drop what was captured for a step the GradScaler skipped."""
        self.preconditioner.discard_step()

    # -- checkpoints ----------------------------------------------------------------------------

    def _own_state(self) -> dict:
        """The state saved under ``state_key``: the preconditioner's (plain tensors and numbers)."""
        return self.preconditioner.state_dict()

    def _check_own_state(self, saved: dict) -> None:
        """Raise ValueError if ``saved`` (an ``_own_state()``) cannot be loaded, before anything changes."""
        self.preconditioner.check_state_dict(saved)

    def _load_own_state(self, saved: dict) -> None:
        """Load an ``_own_state()``."""
        self.preconditioner.load_state_dict(saved)

    def state_dict(self) -> dict:
        """The base optimizer's state dict plus ``state_key`` and ``"<state_key>_skipped_steps"``."""
        state = self.base.state_dict()
        if self._distributed_checkpoint:  # get_optimizer_state_dict keeps param groups and per-parameter state
            return state
        state.pop(KIND_KEY, None)
        state[KIND_KEY] = type(self).__name__
        state["base_optimizer"] = type(self.base).__name__
        state[self.state_key] = self._own_state()
        state[f"{self.state_key}_skipped_steps"] = self._skip_count().detach().clone()  # the base's: in its part
        state.update(self._blowup_state())
        return state

    def check_state_dict(self, state_dict: dict) -> None:
        """ValueError saying what does not fit unless ``state_dict`` is a checkpoint of this optimizer
        (kind, base optimizer, keys, param groups, the base's state tensors, counters, the subclass's
        state); changes nothing. A dict of ``state`` and ``param_groups`` alone (``set_optimizer_state_dict``
        of ``torch.distributed.checkpoint``) is the base's part of a :meth:`distributed_state_dict`, loaded
        by :meth:`load_distributed_state_dict` only: elsewhere ValueError (the preconditioner's state would
        be missing)."""
        if _base_part(state_dict):
            if not self._distributed_checkpoint:
                raise ValueError(
                    f"state_dict: it holds only param_groups and per-parameter state (torch.distributed.checkpoint's "
                    f"get_optimizer_state_dict leaves out {type(self).__name__}'s {self.state_key!r} state): save and "
                    "load with distributed_state_dict() and load_distributed_state_dict()")
            self._check_groups_and_state(state_dict, self._state_spec)
            return
        skipped_key = f"{self.state_key}_skipped_steps"
        check_keys(state_dict, ("state", "param_groups", KIND_KEY, "base_optimizer", self.state_key, skipped_key),
                   "state_dict")
        mine = type(self).__name__
        check_kind(state_dict, (mine, *self._loads_checkpoints_of), mine)
        if state_dict["base_optimizer"] != type(self.base).__name__:
            raise ValueError(f"state_dict: its base optimizer is {state_dict['base_optimizer']!r}, this "
                             f"{mine}'s is {type(self.base).__name__!r}")
        self._check_own_state(state_dict[self.state_key])  # first: another model's layers say the most
        self._check_groups_and_state(state_dict, self._state_spec)
        if isinstance(self.base, KfoptOptimizer):
            check_keys(state_dict, ("skipped_steps",), "state_dict")
            check_counter("state_dict['skipped_steps']", state_dict["skipped_steps"])
        check_counter(f"state_dict[{skipped_key!r}]", state_dict[skipped_key])
        self._check_blowup_state(state_dict)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a ``state_dict()``: the base optimizer's part (with these param groups), the skip count and
        the subclass's state. Everything is checked first: a checkpoint that does not fit raises
        ValueError and changes nothing."""
        skipped_key = f"{self.state_key}_skipped_steps"
        self.check_state_dict(state_dict)
        if _base_part(state_dict):
            self._load_base_part(state_dict)
            return
        state = {k: v for k, v in state_dict.items() if k not in (self.state_key, skipped_key, "base_optimizer",
                                                                   "blown_up_steps", KIND_KEY)}
        if isinstance(self.base, KfoptOptimizer):
            state[KIND_KEY] = type(self.base).__name__
        self._load_base_part(state)
        self._skipped = state_dict[skipped_key].detach().clone()
        self._load_blowup_state(state_dict)
        self._load_own_state(state_dict[self.state_key])

    def _load_base_part(self, state: dict) -> None:
        """Load the base optimizer's part of a checked checkpoint (``state``, ``param_groups``, and what the
        base's own ``load_state_dict`` takes besides) and the graft's per-parameter state."""
        # the graft's state is loaded here: torch's bases would cast it to the param dtype, kfopt's reject it
        base_state = {pid: {k: v for k, v in values.items() if not k.startswith("graft_")}
                      for pid, values in state["state"].items()}
        self.base.load_state_dict({**state, "state": copy.deepcopy(base_state)})  # torch's would alias
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        params = {pid: p for saved, group in zip(state["param_groups"], self.param_groups)
                  for pid, p in zip(saved["params"], group["params"])}
        for pid, values in state["state"].items():
            for key, value in values.items():
                if key.startswith("graft_"):
                    self.state[params[pid]][key] = like_param(value.detach(), params[pid]).clone().to(
                        params[pid].device)

    # -- torch.distributed.checkpoint -------------------------------------------------------------

    #: set while torch.distributed.checkpoint's state_dict functions run on this optimizer (module docstring)
    _distributed_checkpoint = False

    @contextlib.contextmanager
    def _in_distributed_checkpoint(self):
        self._distributed_checkpoint = True
        try:
            yield
        finally:
            self._distributed_checkpoint = False

    def distributed_state_dict(self) -> dict:
        """This optimizer's checkpoint for ``torch.distributed.checkpoint`` (``dcp.save``, and ``dcp.load``
        into it, in place, at any world size): ``"optimizer"``, ``get_optimizer_state_dict(model, self)``
        (param groups and the base optimizer's per-parameter state keyed by parameter name, DTensors
        resharded on load; with grafting the graft's), ``state_key``, the preconditioner's
        ``distributed_state_dict()``, and the skip counts. A collective: every rank calls it. Load with
        :meth:`load_distributed_state_dict`.

        With grafting every trainable parameter's missing graft state is first created as zeros, which step
        as a missing state (``kfopt.graft.create_graft_state``; momentum buffers where the step would keep
        one): the template of a fresh optimizer then asks for what a trained one saved, and DCP's
        state-creating step (zero gradients, lr 0), which would run the graft and decay its moments, is not
        taken."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        if not hasattr(self.preconditioner, "distributed_state_dict"):
            raise NotImplementedError(f"{type(self).__name__} has no torch.distributed.checkpoint state yet: save "
                                      "state_dict()")
        if self.defaults["graft"] != "none":
            preconditioned = {id(p) for p in self._preconditioned_params()}
            for group in self.param_groups:
                buffer = self._graft_momentum(group) != 0
                for p in group["params"]:
                    if p.requires_grad:
                        create_graft_state(self.state[p], p, buffer and id(p) in preconditioned)
        with self._in_distributed_checkpoint():  # first: the state it creates is what the load fills
            base = get_optimizer_state_dict(self.preconditioner.capture.model, self)
        return {"optimizer": base, self.state_key: self.preconditioner.distributed_state_dict(),
                f"{self.state_key}_skipped_steps": self._skip_count().detach().clone(),
                "blown_up_steps": self.blown_up_steps.detach().clone()}

    def load_distributed_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`distributed_state_dict` that ``dcp.load`` filled (``set_optimizer_state_dict`` for
        the base's part and the graft's state, the preconditioner's ``load_distributed_state_dict``, the
        skip counts), each part checked before anything changes. A collective: every rank calls it."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        skipped_key = f"{self.state_key}_skipped_steps"
        check_keys(state_dict, ("optimizer", self.state_key, skipped_key, "blown_up_steps"), "state_dict")
        self.preconditioner.check_distributed_state_dict(state_dict[self.state_key])
        check_counter(f"state_dict[{skipped_key!r}]", state_dict[skipped_key])
        check_counter("state_dict['blown_up_steps']", state_dict["blown_up_steps"])
        with self._in_distributed_checkpoint():
            set_optimizer_state_dict(self.preconditioner.capture.model, self, state_dict["optimizer"])
        self.preconditioner.load_distributed_state_dict(state_dict[self.state_key])
        self._skipped = state_dict[skipped_key].detach().clone()
        self._load_blowup_state(state_dict)


def _base_part(state_dict) -> bool:
    """Whether ``state_dict`` holds ``state`` and ``param_groups`` alone (``torch.distributed.checkpoint``'s
    ``set_optimizer_state_dict``: the base optimizer's part of a checkpoint)."""
    return isinstance(state_dict, dict) and set(state_dict) == {"state", "param_groups"}
