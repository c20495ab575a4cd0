"""``kfopt.SONew``: sparsified online Newton (Devvrit et al., NeurIPS 2023) on one fused multi-tensor pipeline."""

from __future__ import annotations

import torch

from kfopt.kernels.sonew import GRAFTS, MAX_BAND, sonew_step

from .halos import HaloRequest, exchange_halos, flat_offset
from .optimizer import KfoptOptimizer
from .sharding import is_dtensor, local, state_placements
from .validation import check_betas, check_bool, check_device_lr, check_nonnegative, check_positive


def _check_band(name: str, value) -> None:
    """``value`` is an int in ``[1, MAX_BAND]``."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_BAND:
        raise ValueError(f"{name}: expected an integer in [1, {MAX_BAND}], got {value!r}")


def _check_graft(name: str, value) -> None:
    """``value`` names a graft ("adam", "rmsprop", "sgd", "none")."""
    if not isinstance(value, str) or value not in GRAFTS:
        raise ValueError(f"{name}: expected one of {sorted(GRAFTS)}, got {value!r}")


class SONew(KfoptOptimizer):
    r"""SONew with a tridiagonal (``band=1``) or banded sparse preconditioner, ``docs/sonew.md``.

    Every parameter tensor is flattened row-major (``w.reshape(-1)``: for an ``nn.Linear`` weight the
    neighbours of an entry are the weights of the adjacent inputs of the same output unit, as the JAX
    reference's ``transpose=True`` flattening of a Flax ``(in, out)`` kernel). At step ``t``, with
    ``b = min(band, n - 1)`` (a tensor shorter than the band gets its band truncated)::

        mu  <- b1 mu + (1 - b1) g ;  nu_d <- b2 nu_d + (1 - b2) g^2 ;  nu_j[i] <- b2 nu_j[i] + (1 - b2) g_i g_{i+j}
        S    = band(nu) / (1 - b2^t) + damp I,   damp = eps  (relative_eps: eps * max abs row sum of S, >= 1e-24)
        X    = L D L^T, the LogDet-optimal inverse with the band's sparsity (closed form for band 1, a b x b
               solve per row otherwise; edges whose conditional variance is not above 1e-3 of the variance
               it conditions are dropped, farthest first -- see ``kfopt.kernels.sonew``)
        x    = X mu^,   mu^ = mu / (1 - b1^t)
        d    = (||a|| / ||x||) x,  a the graft direction: "adam" mu^ / (sqrt(nu_d^) + graft_eps),
               "rmsprop" g / (sqrt(nu_d^) + graft_eps), "sgd" g;  d = x for graft="none";
               d = 0 where ||x|| = 0
        w   <- w - lr (d + weight_decay w)          (decoupled weight decay)

    Tensors with at most one dimension (biases, norm weights) take the plain Adam update
    ``d = mu^ / (sqrt(nu_d^) + graft_eps)``, whatever ``graft`` says. There is no blocking of long
    tensors: the sparse inverse runs over the whole flattened tensor in O(n band) memory and time.

    State per parameter (fp32 whatever the parameter dtype): ``exp_avg`` and ``diag`` (shape of p),
    ``offdiag`` (b, *p.shape) -- ``offdiag[j-1].reshape(-1)[i]`` is the lag-j statistic of entries i, i+j;
    ``(0, *p.shape)`` for tensors with <= 1 dimension -- and ``step`` (0-d). 3n floats for band 1 (Adam:
    2n). The band of a parameter is fixed once it has state: changing a group's ``band`` afterwards raises.

    Sharded parameters (FSDP2, HSDP; ``kfopt.sharding``): the state holds DTensors placed like the
    parameter (``offdiag`` sharded on dim 1); the rows the band needs from the neighbouring shards come
    in one all-gather per step (``kfopt.halos``), the norms and the non-finite verdict are all-reduced
    over the shard group, so the step is that of one process on the whole tensors.

    Non-finite gradients, GradScaler, checkpoints and bad hyperparameters: ``docs/contracts.md``.
    """

    _step_supports_amp_scaling = True
    device_lr = True
    _shardable = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, band=1, graft="adam", graft_eps=1e-8,
                 weight_decay=0.0, relative_eps=False):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps, band=band,
                        graft=graft, graft_eps=graft_eps, weight_decay=weight_decay, relative_eps=relative_eps)
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        check_device_lr("lr", group["lr"])
        check_betas("betas", group["betas"])
        check_positive("eps", group["eps"])
        _check_band("band", group["band"])
        _check_graft("graft", group["graft"])
        check_positive("graft_eps", group["graft_eps"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_bool("relative_eps", group["relative_eps"])

    @staticmethod
    def tensor_band(p: torch.Tensor, band: int) -> int:
        """The band a parameter gets: 0 (plain Adam) for <= 1 dimension, else ``min(band, numel - 1)``."""
        return 0 if p.dim() <= 1 else max(0, min(band, p.numel() - 1))

    def _state_spec(self, p, group):
        return {"step": ((), torch.float32, True), "exp_avg": (tuple(p.shape), torch.float32, True),
                "diag": (tuple(p.shape), torch.float32, True),
                "offdiag": ((self.tensor_band(p, group["band"]), *p.shape), torch.float32, True)}

    @torch.no_grad()
    def step(self, closure=None):
        self._check_hyperparameters()  # hyperparameters edited since they were added
        loss = self._evaluate(closure)
        found = self._params_with_grads()
        if not found:
            return loss
        for group, p in found:
            state = self.state[p]
            if state and state["offdiag"].shape[0] != self.tensor_band(p, group["band"]):
                raise ValueError(
                    f"band: a parameter of shape {tuple(p.shape)} has state for band "
                    f"{state['offdiag'].shape[0]}, its group now asks for {self.tensor_band(p, group['band'])}; "
                    "the band cannot change once a parameter has state"
                )
        for group, p in found:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
                state["diag"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
                state["offdiag"] = _zeros_with_lead(self.tensor_band(p, group["band"]), p)
        states = [self.state[p] for _, p in found]
        params = [local(p) for _, p in found]
        offdiags = [local(s["offdiag"]).view(s["offdiag"].shape[0], w.numel()) for s, w in zip(states, params)]
        grads, exp_avgs = [local(p.grad) for _, p in found], [local(s["exp_avg"]) for s in states]
        diags = [local(s["diag"]).view(-1) for s in states]
        halos, left, right = [None] * len(found), [0] * len(found), [0] * len(found)
        if self._layout.group is not None:  # the rows next to each shard, for every tensor with a band
            requests = {i: HaloRequest(o.shape[0], flat_offset(p), p.numel(), (grads[i], exp_avgs[i], diags[i], *o))
                        for i, ((_, p), o) in enumerate(zip(found, offdiags)) if o.shape[0]}
            for (i, req), halo in zip(requests.items(), exchange_halos(list(requests.values()), self._layout.group)):
                halos[i], left[i], right[i] = halo, req.left, req.right
        with self._layout.tuning():
            sonew_step(
                params, grads, exp_avgs, diags, offdiags, [s["step"] for s in states], halos=halos,
                skipped=self._skip_counter(found[0][1].device), reduce=self._layout.reduce,
                reduce_max=self._layout.reduce_max, **self._amp_kwargs(), halo_left=left, halo_right=right,
                **self._per_tensor_hyperparameters(found),
            )
        return loss

    def _kernel_hyperparameters(self, group: dict, p: torch.Tensor) -> dict:
        return dict(lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                    weight_decay=group["weight_decay"], graft=group["graft"], graft_eps=group["graft_eps"],
                    relative_eps=group["relative_eps"], precondition=p.dim() > 1)


def _zeros_with_lead(lead: int, p: torch.Tensor) -> torch.Tensor:
    """fp32 zeros of shape ``(lead, *p.shape)``: a DTensor sharded like ``p`` one dimension further in when
    ``p`` is one (``kfopt.sharding.state_placements``), else a plain tensor."""
    if not is_dtensor(p):
        return torch.zeros((lead, *p.shape), dtype=torch.float32, device=p.device)
    from torch.distributed.tensor import DTensor

    shard = torch.zeros((lead, *local(p).shape), dtype=torch.float32, device=p.device)
    shape = torch.Size((lead, *p.shape))
    return DTensor.from_local(shard, p.device_mesh, state_placements(p, 1), run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())
