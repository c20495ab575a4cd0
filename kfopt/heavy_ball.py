r"""``kfopt.heavy_ball.HeavyBall``: SGD with heavy-ball momentum, SINGD's default base optimizer
(``kfopt.singd``; ``base="heavy_ball"`` of ``kfopt.composed``).

Per parameter ``w`` with direction ``N`` (its gradient, or the direction a preconditioner hands over in
``directions``), with its param group's ``lr``, ``momentum`` and ``weight_decay``::

    d = N + weight_decay * w
    buf <- momentum * buf + d            (buf exists only while momentum != 0)
    w <- w - lr * (buf or d)

``momentum_buffer`` is fp32 (float64 for float64 parameters), created as zeros at the first step with
``momentum != 0``; ``w`` is updated in fp32 (float64) and rounded to its dtype. ``lr`` may be a
one-element floating tensor (``device_lr``; its value is read on the device): the update is then
``w - (lr * d)`` instead of ``w + (-lr) * d``, equal within rounding. Unlike ``torch.optim.SGD`` the
first step's buffer is ``d`` itself (``buf = 0`` before), and ``weight_decay`` is added to ``N`` before
the momentum.

Skipped steps, decided on the device without a host synchronisation: alone, a step where any gradient is
not finite, a tensor lr is NaN, infinite or negative, or a ``torch.amp.GradScaler`` found inf/NaN
(``scaler.step(opt)`` hands over ``found_inf`` and ``grad_scale``: ``_step_supports_amp_scaling``; the
gradients are unscaled in fp32 as they are read, fp16 ones included) changes nothing (weights and buffers keep their
bits; a buffer first needed in it is created as zeros, the value it stands for while absent) and counts
in ``skipped_steps``. In front of it a preconditioner's optimizer (``kfopt.composed``) passes its own
0-d device bool ``verdict`` (it checked the gradients, the lr and its own update, and counted the steps
it vetoes): the step is taken where it holds, and nothing is counted here. Under FSDP2/HSDP every tensor is
stepped on this rank's shard (the update is element-wise); a verdict decided here is agreed over the shard
group (``kfopt.sharding``: one all-reduce of one value), so a NaN in one rank's shard skips the step on
every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .optimizer import KfoptOptimizer
from .sharding import local
from .validation import check_device_lr, check_nonnegative


class HeavyBall(KfoptOptimizer):
    """SGD with heavy-ball momentum (module docstring). Args: ``params``, ``lr``, ``momentum``,
    ``weight_decay``."""

    device_lr = True
    _step_supports_amp_scaling = True
    _shardable = True
    takes_verdict = True  # step(verdict=...): kfopt.composed

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, momentum: float = 0.0,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def _check_group(self, group: dict) -> None:
        check_device_lr("lr", group["lr"])  # a tensor's value is checked on the device
        for name in ("momentum", "weight_decay"):
            check_nonnegative(name, group[name])

    def _state_spec(self, p: torch.Tensor, group: dict) -> dict:
        return {"momentum_buffer": (tuple(p.shape), (torch.promote_types(p.dtype, torch.float32),), False)}

    @torch.no_grad()
    def step(self, closure: Callable | None = None, *, verdict: torch.Tensor | None = None,
             directions: dict[int, torch.Tensor] | None = None):
        """One step of every parameter with a gradient (module docstring). ``verdict``: the caller's 0-d
        device bool (the step is taken where it holds; None: decided here from the gradients and tensor
        lrs). ``directions``: ``N`` by ``id(param)`` in place of the gradient (e.g. a preconditioner's
        fp32 result for a bf16 parameter; FSDP2: this rank's rows)."""
        self._check_hyperparameters()
        loss = self._evaluate(closure)
        found = self._params_with_grads()
        if not found:
            return loss
        unscale = None
        if verdict is None:
            amp = self._amp_kwargs()
            verdict = self._layout.all_true(self._finite_inputs([local(p.grad) for _, p in found]))
            if amp["found_inf"] is not None:
                verdict = verdict & (amp["found_inf"].reshape(()).to(verdict.device) == 0)
            if amp["grad_scale"] is not None:
                unscale = amp["grad_scale"].detach().reshape(()).double().reciprocal().float()
            self._skip_counter(verdict.device).add_((~verdict).to(torch.int32))
        directions = directions or {}
        for group, p in found:
            self._update(p, group, directions.get(id(p), local(p.grad)), verdict, unscale)
        return loss

    def init_state(self) -> None:
        """Zero momentum buffers for every parameter of a group with ``momentum != 0`` that has none yet (a
        zero buffer steps as a missing one): the state a checkpoint loaded in place fills."""
        for group in self.param_groups:
            if group["momentum"] != 0:
                for p in group["params"]:
                    self._momentum_buffer(p)

    def _momentum_buffer(self, p: torch.Tensor) -> torch.Tensor:
        """``p``'s momentum buffer, created as zeros (fp32, float64 for float64 ``p``; a DTensor like a sharded
        ``p``) where it has none."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
        return state["momentum_buffer"]

    def _update(self, p: torch.Tensor, group: dict, direction: torch.Tensor, verdict: torch.Tensor,
                unscale: torch.Tensor | None = None) -> None:
        """``d = direction (* unscale, a GradScaler's 1 / scale) + weight_decay w``; ``buf = momentum buf + d``;
        ``w -= lr buf``; the buffer and ``w`` change only where ``verdict``. On this rank's shard (FSDP2:
        ``direction`` holds its rows, the buffer is a DTensor like ``p``)."""
        dtype = torch.promote_types(p.dtype, torch.float32)
        w = local(p)
        d = direction.to(dtype)
        if unscale is not None:
            d = d * unscale.to(dtype)
        if group["weight_decay"] != 0:
            d = d + group["weight_decay"] * w.to(dtype)
        if group["momentum"] != 0:
            buf = local(self._momentum_buffer(p))
            d = buf * group["momentum"] + d
            buf.copy_(torch.where(verdict, d, buf))
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):  # where picks 0 where skipped: a NaN lr cannot leak into p
            w.sub_(torch.where(verdict, d * lr.to(d.device).reshape(()), 0.0))
        else:
            w.add_(torch.where(verdict, d, 0.0), alpha=-lr)  # adding 0 leaves p as it was, bit for bit
