"""``kfopt.LAMB``: layer-wise adaptive moments (You et al., ICLR 2020) on one fused multi-tensor kernel."""

from __future__ import annotations

import math

import torch

from kfopt.kernels import lamb_step

from .optimizer import KfoptOptimizer
from .sharding import local
from .validation import (
    check_betas,
    check_bool,
    check_device_lr,
    check_nonnegative,
    check_optional_nonnegative,
    check_positive,
    check_trust_clip,
)


class LAMB(KfoptOptimizer):
    r"""LAMB with apex FusedLAMB / timm Lamb semantics (``docs/lamb-lars.md``).

    For every parameter ``w`` with gradient ``g`` at step ``t``::

        g <- g * min(1, max_grad_norm / ||g_all||)      (global over all groups; 0/None: off)
        m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2   (grad_averaging=False: m <- b1 m + g)
        u  = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay * w
        r  = ||w|| / ||u||   (1 if either norm is 0; clamped to trust_clip=(min, max) when given)
        w <- w - lr * r * u

    The trust ratio is applied to a group when its ``weight_decay != 0`` or ``always_adapt`` is True
    (apex/timm convention: use ``kfopt.param_groups`` to put biases and norm weights in a
    no-decay group, which then takes plain Adam-style steps with r = 1).

    State per parameter: ``exp_avg``, ``exp_avg_sq`` (fp32, whatever the parameter dtype) and ``step``
    (0-d fp32 tensor). bf16/fp16 parameters are updated in fp32 and rounded on store.

    ``last_grad_norm`` holds ``||g_all||`` of the last step (before clipping) as a device tensor.
    Non-finite gradients, GradScaler, checkpoints and sharded parameters (FSDP2, HSDP):
    ``docs/contracts.md``.
    """

    global_hyperparameters = ("max_grad_norm",)
    _step_supports_amp_scaling = True
    device_lr = True
    _shardable = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 bias_correction=True, max_grad_norm=1.0, trust_clip=None, always_adapt=False,
                 grad_averaging=True):
        check_optional_nonnegative("max_grad_norm", max_grad_norm)
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, bias_correction=bias_correction,
                        max_grad_norm=max_grad_norm, trust_clip=trust_clip, always_adapt=always_adapt,
                        grad_averaging=grad_averaging)
        self.last_grad_norm: torch.Tensor | None = None
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        check_device_lr("lr", group["lr"])
        check_betas("betas", group["betas"])
        check_positive("eps", group["eps"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_trust_clip("trust_clip", group["trust_clip"])
        for name in ("bias_correction", "always_adapt", "grad_averaging"):
            check_bool(name, group[name])

    def _state_spec(self, p, group):
        return {"step": ((), torch.float32, True), "exp_avg": (tuple(p.shape), torch.float32, True),
                "exp_avg_sq": (tuple(p.shape), torch.float32, True)}

    def _kernel_hyperparameters(self, group: dict, p: torch.Tensor) -> dict:
        lo, hi = group["trust_clip"] if group["trust_clip"] is not None else (0.0, math.inf)
        return dict(lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                    weight_decay=group["weight_decay"], bias_correction=group["bias_correction"],
                    grad_averaging=group["grad_averaging"],
                    adapt=group["weight_decay"] != 0 or group["always_adapt"], trust_min=lo, trust_max=hi)

    @torch.no_grad()
    def step(self, closure=None):
        self._check_hyperparameters()
        loss = self._evaluate(closure)
        found = self._params_with_grads()
        if not found:
            return loss
        for _, p in found:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        states = [self.state[p] for _, p in found]
        with self._layout.tuning():
            clip = lamb_step(
                [local(p) for _, p in found], [local(p.grad) for _, p in found], [local(s["exp_avg"]) for s in states],
                [local(s["exp_avg_sq"]) for s in states], [s["step"] for s in states],
                max_grad_norm=self.defaults["max_grad_norm"], skipped=self._skip_counter(found[0][1].device),
                reduce=self._layout.reduce, **self._amp_kwargs(), **self._per_tensor_hyperparameters(found),
            )
        self.last_grad_norm = clip[0]
        return loss
