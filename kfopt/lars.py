"""``kfopt.LARS``: layer-wise adaptive rate scaling (You, Gitman, Ginsburg 2017) on the LAMB machinery."""

from __future__ import annotations

import math

import torch

from kfopt.kernels import lars_step

from .optimizer import KfoptOptimizer
from .sharding import local
from .validation import (
    check_bool,
    check_device_lr,
    check_nonnegative,
    check_optional_nonnegative,
    check_trust_clip,
    check_unit_interval,
)


class LARS(KfoptOptimizer):
    r"""LARS with momentum (``docs/lamb-lars.md``)::

        g <- g * min(1, max_grad_norm / ||g_all||)      (global; None/0: off, the default)
        d  = g + weight_decay * w
        r  = eta * ||w|| / ||d||   (1 if either norm is 0; clamped to trust_clip=(min, max) when given)
        m <- momentum * m + lr * r * d
        w <- w - m                 (nesterov=True: w <- w - (momentum * m + lr * r * d))

    As for LAMB, the trust ratio applies to a group when its ``weight_decay != 0`` or ``always_adapt``;
    otherwise r = 1 (plain SGD with momentum, the usual treatment of biases and norm weights).
    State per parameter: ``momentum_buffer`` (fp32). Non-finite gradients, GradScaler, checkpoints and
    sharded parameters (FSDP2, HSDP): ``docs/contracts.md``.
    """

    global_hyperparameters = ("max_grad_norm",)
    _step_supports_amp_scaling = True
    device_lr = True
    _shardable = True

    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0.0, eta=0.001, nesterov=False,
                 trust_clip=None, always_adapt=False, max_grad_norm=None):
        check_optional_nonnegative("max_grad_norm", max_grad_norm)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, nesterov=nesterov,
                        trust_clip=trust_clip, always_adapt=always_adapt, max_grad_norm=max_grad_norm)
        self.last_grad_norm: torch.Tensor | None = None
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        check_device_lr("lr", group["lr"])
        check_unit_interval("momentum", group["momentum"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_nonnegative("eta", group["eta"])
        check_trust_clip("trust_clip", group["trust_clip"])
        check_bool("nesterov", group["nesterov"])
        check_bool("always_adapt", group["always_adapt"])

    def _state_spec(self, p, group):
        return {"momentum_buffer": (tuple(p.shape), torch.float32, True)}

    def _kernel_hyperparameters(self, group: dict, p: torch.Tensor) -> dict:
        lo, hi = group["trust_clip"] if group["trust_clip"] is not None else (0.0, math.inf)
        return dict(lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"], eta=group["eta"],
                    nesterov=group["nesterov"], adapt=group["weight_decay"] != 0 or group["always_adapt"],
                    trust_min=lo, trust_max=hi)

    @torch.no_grad()
    def step(self, closure=None):
        self._check_hyperparameters()
        loss = self._evaluate(closure)
        found = self._params_with_grads()
        if not found:
            return loss
        for _, p in found:
            if not self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32,
                                                                    memory_format=torch.preserve_format)
        with self._layout.tuning():
            clip = lars_step([local(p) for _, p in found], [local(p.grad) for _, p in found],
                             [local(self.state[p]["momentum_buffer"]) for _, p in found],
                             max_grad_norm=self.defaults["max_grad_norm"],
                             skipped=self._skip_counter(found[0][1].device), reduce=self._layout.reduce,
                             **self._amp_kwargs(), **self._per_tensor_hyperparameters(found))
        self.last_grad_norm = clip[0]
        return loss
