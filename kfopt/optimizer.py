"""The base of every kfopt optimizer: a ``torch.optim.Optimizer`` with kfopt's contract.

* Hyperparameters are validated per param group (also groups added later): ``_check_group``, and again
  at every ``step()`` before anything changes (``_check_hyperparameters``: a scheduler or a user may have
  edited ``param_groups``; Python numbers, checked without a device synchronisation).
* Parameters must be real floating tensors on one device; gradients must be dense; where the Triton
  kernels run, dtypes must be fp32/bf16/fp16 (float64 runs on the PyTorch path only). Errors are
  raised before any state changes.
* Non-finite gradients: the step is skipped for every parameter on the device (no host sync); the
  count of skipped steps is ``optimizer.skipped_steps`` (a device tensor) and is checkpointed.
* Blow-ups (optimizers with ``_counts_blowups``: K-FAC, MKOR, SINGD): a step whose inputs are finite
  but whose own update is not (factors, preconditioned gradient) is skipped the same way and also
  counted in ``blown_up_steps`` (checkpointed; a checkpoint without it loads as 0); reading
  ``skipped_steps`` warns once per optimizer (``RuntimeWarning`` naming the optimizer and the count: the
  only host synchronisation of the count, never in ``step()``).
* Under ``GradScaler.step`` every kfopt optimizer has ``_step_supports_amp_scaling``: the scaler hands
  it ``grad_scale`` and ``found_inf`` instead of unscaling the gradients itself (which torch refuses
  for fp16 gradients). The fused element-wise optimizers (LAMB, LARS, SONew) pass them to their kernels
  (:meth:`_amp_kwargs`: gradients unscaled in fp32 as they are loaded, the step skipped on the device,
  no host synchronisation); the Kronecker-factored ones go through one entry,
  ``_grad_scaler_skips_step``, which unscales the gradients and skips the steps the scaler found
  inf/NaN in.
* ``state_dict()`` holds plain tensors and numbers only (``torch.load(weights_only=True)`` works);
  ``load_state_dict`` keeps each state tensor's saved dtype (torch's default would cast fp32 moments
  of a bf16 parameter to bf16 and break a bit-identical resume) and moves it to the param's device.
  It first checks the whole checkpoint (``check_state_dict``: the optimizer kind recorded under
  ``"kfopt_optimizer"``, keys, param-group count and params, hyperparameters, every state tensor's shape
  and dtype per ``_state_spec``, counters): one that does not fit raises ValueError, changing nothing.
* Parameters on the meta device are rejected at construction (ValueError naming the meta device).
"""

from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from typing import Callable, Iterable

import torch

from kfopt.kernels.checks import check_kernel_dtype
from kfopt.kernels.dispatch import use_triton

from .sharding import ShardLayout, like_param, shard_layout
from .validation import KIND_KEY, TensorSpec, check_counter, check_keys, check_kind, check_param_state


class KfoptOptimizer(torch.optim.Optimizer):
    """Shared machinery; subclasses implement ``_check_group`` and ``step``."""

    #: hyperparameters that must be equal in every group (e.g. global clipping)
    global_hyperparameters: tuple[str, ...] = ()
    #: the GradScaler whose scale the layer capture divides output gradients by (``grad_scaler=``)
    _grad_scaler: torch.amp.GradScaler | None = None
    #: whether the optimizer rescales statistics captured from scaled output gradients itself, by the
    #: ``grad_scale`` GradScaler.step hands over (SINGD); otherwise a GradScaler needs ``grad_scaler=``
    _rescales_statistics: bool = False

    #: ``lr`` may be a one-element tensor, checked on the device (``validation.check_device_lr``)
    device_lr: bool = False
    #: DTensor parameters (FSDP2/HSDP): True steps on local shards with whole-tensor quantities reduced
    #: over the shard group (``kfopt.sharding``), None: not checked here (the optimizer rejects them itself)
    _shardable: bool | None = None
    #: counts (and checkpoints) the steps skipped because its own update blew up (module docstring)
    _counts_blowups: bool = False
    #: what the once-only blow-up warning advises
    _blowup_advice: str = ""

    def __init__(self, params: Iterable, defaults: dict):
        self._skipped: torch.Tensor | None = None
        self._blowups: torch.Tensor | None = None
        self._blowups_warned = False
        self._layout = ShardLayout(None)
        super().__init__(params, defaults)

    # -- validation ---------------------------------------------------------------------------

    def _check_group(self, group: dict) -> None:
        """Raise ValueError naming a bad hyperparameter of ``group``."""
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        for name in self.global_hyperparameters:
            if isinstance(param_group, dict) and name in param_group and param_group[name] != self.defaults[name]:
                raise ValueError(
                    f"{name} is global to the optimizer (it spans all groups); set it in the "
                    f"constructor, not per param group (got {param_group[name]!r} in a group)"
                )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for i, p in enumerate(group["params"]):
                if not p.is_floating_point():
                    raise TypeError(f"params[{i}]: expected a real floating-point tensor, got dtype {p.dtype}")
                if p.is_meta:
                    raise ValueError(f"params[{i}] is on the meta device (no data): materialize the model first "
                                     "(e.g. model.to_empty(device=...) and initialize it) before building the optimizer")
            self._check_group(group)
            self._check_sharding()
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _named_params(self):
        return [(f"param_groups[{g}]['params'][{i}]", p)
                for g, group in enumerate(self.param_groups) for i, p in enumerate(group["params"])]

    def _check_sharding(self) -> None:
        """DTensor parameters (``_shardable``): ValueError naming one this optimizer cannot step; records the
        shard group whole-tensor reductions sum over (``kfopt.sharding``)."""
        if self._shardable:
            self._layout = shard_layout(self._named_params())

    def _check_hyperparameters(self) -> None:
        """At every ``step()``, before anything changes: every group's hyperparameters are valid
        (``_check_group``; a scheduler or a user may have changed them) and global ones equal the
        constructor's. Python numbers are checked on the host: no device synchronisation."""
        for i, group in enumerate(self.param_groups):
            self._check_global_hyperparameters(group, f"param_groups[{i}]")
            try:
                self._check_group(group)
            except KeyError as exc:
                raise ValueError(f"param_groups[{i}] has no hyperparameter {exc}") from None
            except ValueError as exc:
                raise ValueError(f"param_groups[{i}]: {exc}") from None

    # -- step helpers -------------------------------------------------------------------------

    def _evaluate(self, closure: Callable | None):
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _params_with_grads(self) -> list[tuple[dict, torch.Tensor]]:
        """(group, param) for every param that has a gradient; checks grads and devices first."""
        found, device = [], None
        for g_index, group in enumerate(self.param_groups):
            for p_index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                name = f"param_groups[{g_index}]['params'][{p_index}]"
                if p.grad.is_sparse:
                    raise TypeError(f"{name}: sparse gradients are not supported by {type(self).__name__}")
                if p.grad.shape != p.shape:
                    raise ValueError(f"{name}: gradient shape {tuple(p.grad.shape)} != parameter shape {tuple(p.shape)}")
                device = device or p.device
                if p.device != device or p.grad.device != device:
                    raise ValueError(
                        f"{name} (and its gradient) must be on {device} like the other parameters; "
                        f"got param on {p.device}, grad on {p.grad.device}: one optimizer step runs on one device"
                    )
                if use_triton(device):
                    check_kernel_dtype(name, p)
                    check_kernel_dtype(f"{name}.grad", p.grad)
                found.append((group, p))
        return found

    def _check_global_hyperparameters(self, group: dict, where: str) -> None:
        """ValueError unless ``group`` leaves every global hyperparameter at the constructor's value."""
        for name in self.global_hyperparameters:
            if group.get(name, self.defaults[name]) != self.defaults[name]:
                raise ValueError(f"{where}: {name} is global to the optimizer and was {self.defaults[name]!r}; "
                                 f"a param group cannot change it (got {group[name]!r})")

    def _kernel_hyperparameters(self, group: dict, p: torch.Tensor) -> dict:
        """The hyperparameters of ``p`` (in ``group``) as the fused kernel takes them, by its names."""
        raise NotImplementedError

    def _per_tensor_hyperparameters(self, found: list[tuple[dict, torch.Tensor]]) -> dict[str, list]:
        """:meth:`_kernel_hyperparameters` of every (group, param) of ``found``, one list per name."""
        columns: dict[str, list] = {}
        for group, p in found:
            for name, value in self._kernel_hyperparameters(group, p).items():
                columns.setdefault(name, []).append(value)
        return columns

    def _amp_kwargs(self) -> dict:
        """``grad_scale`` and ``found_inf`` as ``GradScaler.step`` set them on this optimizer (None when
        absent; ``grad_scale`` is None when ``scaler.unscale_`` already ran), for the fused kernels."""
        return {"grad_scale": getattr(self, "grad_scale", None), "found_inf": getattr(self, "found_inf", None)}

    def _holds_scaled_statistics(self) -> bool:
        """Whether statistics captured from (scaled) output gradients await this step."""
        return True

    def _grad_scaler_skips_step(self, statistic: str) -> bool:
        """Under ``GradScaler.step`` (optimizers with ``_step_supports_amp_scaling``): unscale the
        gradients in place (unless ``scaler.unscale_`` did) and return True when the scaler found inf/NaN,
        counting the step as skipped (reading ``found_inf`` syncs with the host, as ``GradScaler.step``
        does for every torch optimizer). The output gradients entering ``statistic`` must be unscaled by
        the capture (``self._grad_scaler``) or, with ``_rescales_statistics``, their scale ``grad_scale``
        must be known (``scaler.unscale_`` not called first): RuntimeError otherwise."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:
            return False
        grad_scale = getattr(self, "grad_scale", None)
        if self._grad_scaler is None and self._holds_scaled_statistics() and (
                grad_scale is None or not self._rescales_statistics):
            unknown = (" and scaler.unscale_ ran before scaler.step, so their scale is unknown"
                       if self._rescales_statistics else "")
            raise RuntimeError(f"{type(self).__name__} is stepped by a GradScaler but was built without "
                               f"grad_scaler=: output gradients entering {statistic} are captured scaled{unknown}; "
                               "pass grad_scaler=scaler")
        found = self._params_with_grads()
        if grad_scale is not None:
            torch._foreach_mul_([p.grad for _, p in found], grad_scale.double().reciprocal().float())
        if found_inf.item():
            self._skip_counter(found_inf.device).add_(1)
            return True
        return False

    def _skip_counter(self, device: torch.device) -> torch.Tensor:
        if self._skipped is None:
            self._skipped = torch.zeros((), dtype=torch.int32, device=device)
        elif self._skipped.device != device:
            self._skipped = self._skipped.to(device)
        return self._skipped

    @property
    def skipped_steps(self) -> torch.Tensor:
        """How many steps were skipped for a non-finite gradient (a 0-d int32 tensor). Reading it warns once
        when steps were skipped because the optimizer's own update blew up (module docstring)."""
        self._warn_blowups_once()
        return self._skip_count()

    def _skip_count(self) -> torch.Tensor:
        """``skipped_steps`` without the warning (checkpoints)."""
        return self._skipped if self._skipped is not None else torch.zeros((), dtype=torch.int32)

    def _finite_inputs(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Whether every tensor of ``tensors`` (gradients, statistics) is finite -- its sum of absolute values
        in fp32 (float64 for float64 tensors) is: a NaN or inf entry, or a sum beyond 3.4e38 (fp32), make it
        not; an L1 norm, not an L2, so that gradients a GradScaler scaled by up to ~2^100 still pass -- and
        every tensor ``lr`` of the param groups finite and >= 0: a 0-d bool on the device, without a host
        synchronisation, from multi-tensor norms (``torch._foreach_norm``) rather than a check per tensor."""
        wide = [t for t in tensors if t.dtype == torch.float64]
        narrow = [t for t in tensors if t.dtype != torch.float64]
        norms = [n for group, dtype in ((narrow, torch.float32), (wide, torch.float64)) if group
                 for n in torch._foreach_norm(group, 1, dtype=dtype)]
        checks = [torch.isfinite(torch.stack(norms)).all()]
        checks += [(torch.isfinite(group["lr"]) & (group["lr"] >= 0)).reshape(()).to(checks[0].device)
                   for group in self.param_groups if isinstance(group["lr"], torch.Tensor)]
        return torch.stack(checks).all()

    def _count_blowup(self, finite: torch.Tensor, healthy: torch.Tensor) -> None:
        """Count a blow-up where the step's inputs were ``finite`` but its update was not ``healthy`` (0-d
        device bools; the caller skips and counts the step itself)."""
        blew_up = (finite & ~healthy).to(torch.int32)
        if self._blowups is None:
            self._blowups = torch.zeros((), dtype=torch.int32, device=finite.device)
        self._blowups.add_(blew_up.to(self._blowups.device))

    @property
    def blown_up_steps(self) -> torch.Tensor:
        """How many steps were skipped because the optimizer's own update blew up (a 0-d int32 tensor;
        also counted in ``skipped_steps``)."""
        return self._blowups if self._blowups is not None else torch.zeros((), dtype=torch.int32)

    def _warn_blowups_once(self) -> None:
        """The once-per-optimizer RuntimeWarning about blown-up steps (reads the count: a host sync)."""
        if self._blowups_warned or self._blowups is None:
            return
        count = int(self._blowups)
        if count:
            self._blowups_warned = True
            warnings.warn(f"{type(self).__name__} skipped {count} step(s) whose own update was not finite from "
                          "finite gradients (factors and weights kept their last finite values); "
                          f"{self._blowup_advice}", RuntimeWarning, stacklevel=3)

    def _blowup_state(self) -> dict:
        """``{"blown_up_steps": count}`` for a ``state_dict()`` of an optimizer that counts blow-ups."""
        return {"blown_up_steps": self.blown_up_steps.detach().clone()} if self._counts_blowups else {}

    def _check_blowup_state(self, state_dict: dict) -> None:
        if self._counts_blowups and "blown_up_steps" in state_dict:  # absent in older checkpoints: 0
            check_counter("state_dict['blown_up_steps']", state_dict["blown_up_steps"])

    def _load_blowup_state(self, state_dict: dict) -> None:
        if self._counts_blowups:
            saved = state_dict.get("blown_up_steps")
            self._blowups = None if saved is None else saved.detach().clone()

    # -- checkpoints --------------------------------------------------------------------------

    #: the optimizer kinds (class names) whose checkpoints this one loads, besides its own
    _loads_checkpoints_of: tuple[str, ...] = ()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["skipped_steps"] = self._skip_count().detach().clone()
        state.update(self._blowup_state())
        state[KIND_KEY] = type(self).__name__
        return state

    def _state_spec(self, p: torch.Tensor, group: dict) -> dict[str, TensorSpec] | None:
        """What the saved state of parameter ``p`` may hold: ``{key: (shape, dtypes, required)}``
        (None: not checked)."""
        return None

    def _check_groups_and_state(self, state_dict: dict, spec) -> None:
        """The param groups (count, params, hyperparameters) and the per-parameter state of
        ``state_dict`` against this optimizer's; ``spec(p, group)`` as ``_state_spec``."""
        check_keys(state_dict, ("state", "param_groups"), "state_dict")
        groups, states = state_dict["param_groups"], state_dict["state"]
        if not isinstance(groups, (list, tuple)) or not isinstance(states, dict):
            raise ValueError("state_dict: expected 'param_groups' a list and 'state' a dict")
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} param groups, the optimizer has {len(self.param_groups)}")
        owner = {}
        for i, (saved, group) in enumerate(zip(groups, self.param_groups)):
            check_keys(saved, [k for k in group if k != "initial_lr"], f"state_dict: param group {i}")
            if not isinstance(saved["params"], (list, tuple)) or len(saved["params"]) != len(group["params"]):
                count = len(saved["params"]) if isinstance(saved["params"], (list, tuple)) else saved["params"]
                raise ValueError(f"param group {i}: state_dict has {count} params, the optimizer has "
                                 f"{len(group['params'])}")
            merged = {**copy.deepcopy({k: v for k, v in saved.items() if k != "params"}), "params": group["params"]}
            self._check_global_hyperparameters(merged, f"state_dict: param group {i}")
            try:
                self._check_saved_group(merged)
            except ValueError as exc:
                raise ValueError(f"state_dict: param group {i}: {exc}") from None
            for pid, p in zip(saved["params"], group["params"]):
                if pid in owner:
                    raise ValueError(f"state_dict: param id {pid!r} appears twice in the param groups")
                owner[pid] = (p, group)
        for pid, saved in states.items():
            if pid not in owner:
                raise ValueError(f"state_dict: state for param id {pid!r}, which no param group holds")
            p, group = owner[pid]
            check_param_state(f"state_dict: the state of param {pid!r}", saved, spec(p, group))

    def _check_saved_group(self, group: dict) -> None:
        """ValueError unless a saved param group (with the live params) holds valid hyperparameters."""
        self._check_group(group)

    def check_state_dict(self, state_dict: dict) -> None:
        """ValueError saying what does not fit unless ``state_dict`` is a checkpoint this optimizer
        loads: its kind, keys, param groups, every state tensor's shape and dtype, counters. Changes
        nothing (``load_state_dict`` calls it first)."""
        if _from_distributed_checkpoint(state_dict):
            self._check_groups_and_state(state_dict, self._state_spec)
            return
        check_keys(state_dict, ("state", "param_groups", "skipped_steps", KIND_KEY), "state_dict")
        mine = type(self).__name__
        check_kind(state_dict, (mine, *self._loads_checkpoints_of), mine)
        self._check_groups_and_state(state_dict, self._state_spec)
        check_counter("state_dict['skipped_steps']", state_dict["skipped_steps"])
        self._check_blowup_state(state_dict)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a ``state_dict()``; state tensors keep their saved dtype (see module docstring).
        Everything is checked first (``check_state_dict``): a checkpoint that does not fit raises
        ValueError and changes nothing."""
        self.check_state_dict(state_dict)  # counts, params, hyperparameters, state: nothing below can fail
        groups = state_dict["param_groups"]
        new_groups = [{**{k: copy.deepcopy(v) for k, v in saved.items() if k != "params"}, "params": group["params"]}
                      for saved, group in zip(groups, self.param_groups)]
        id_to_param = {
            pid: p for saved, group in zip(groups, self.param_groups) for pid, p in zip(saved["params"], group["params"])
        }
        state = {}
        for pid, values in state_dict["state"].items():
            param = id_to_param[pid]
            state[param] = {
                k: (like_param(v.detach(), param).clone().to(param.device) if isinstance(v, torch.Tensor)
                    else copy.deepcopy(v))
                for k, v in values.items()
            }
        self.param_groups = new_groups
        self.state = defaultdict(dict, state)
        if not _from_distributed_checkpoint(state_dict):
            skipped = state_dict.get("skipped_steps")
            self._skipped = None if skipped is None else skipped.detach().clone()
            self._load_blowup_state(state_dict)


def _from_distributed_checkpoint(state_dict) -> bool:
    """Whether ``state_dict`` comes from ``torch.distributed.checkpoint.state_dict``
    (``get_optimizer_state_dict`` / ``set_optimizer_state_dict``): per-parameter state keyed by fully
    qualified parameter names, param groups, and none of ``state_dict()``'s own entries (the optimizer
    kind, ``skipped_steps``: the skip counter keeps its value when such a dict is loaded)."""
    return (isinstance(state_dict, dict) and KIND_KEY not in state_dict and "skipped_steps" not in state_dict
            and isinstance(state_dict.get("state"), dict) and bool(state_dict["state"])
            and all(isinstance(k, str) for k in state_dict["state"]))
