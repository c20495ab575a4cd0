r"""K-FAC with KAISA's adaptive distribution: :class:`KFACPreconditioner` and the optimizer :class:`KFAC`.

The math is in ``docs/kfac.md``; the distribution is in :mod:`kfopt.kaisa`.

Two objects
    :class:`KFACPreconditioner` owns everything K-FAC: the layer capture, the factors, the eigen (or
    inverse) data, its distributor (``kfopt.distribution``: KAISA's plan and groups).
    ``precond.step()`` replaces the ``.grad`` of every preconditioned layer (``nn.Linear``/``nn.Conv2d``
    with groups=1, minus ``skip_layers`` and layers whose weight is frozen) by its preconditioned
    gradient, so it can sit in front of any optimizer (``kfopt.preconditioner.Preconditioner``)::

        loss.backward(); precond.step(); optimizer.step()

    :class:`KFAC` is a ``torch.optim.Optimizer`` (a ``kfopt.composed.ComposedOptimizer``) that composes
    a preconditioner with a base optimizer: ``KFAC.step()`` = ``precond.step()`` then ``base.step()``.
    Its param groups are ``kfopt.param_groups(model, weight_decay)`` (weights decayed; biases and
    normalisation weights not) and carry ``lr``, ``momentum``, ``weight_decay`` and ``damping``; the base
    optimizer is built from *the same group dicts*, so an LR scheduler (or a user) changing ``lr`` in
    ``KFAC.param_groups`` changes the base step and the KL clip together. A layer's lr and damping are
    those of the group of its weight. ``base``: ``"sgd"`` (torch.optim.SGD; momentum and weight_decay
    apply), ``"adamw"`` (torch.optim.AdamW with its default betas; ``momentum`` is not used), ``"lamb"``
    (kfopt.LAMB), or a callable ``base(param_groups) -> torch.optim.Optimizer`` that must build its
    optimizer from the dicts it is given. Parameters that no preconditioned layer owns (embeddings,
    norms, skipped layers, grouped/depthwise Conv2d layers, ``nn.MultiheadAttention`` with its
    ``out_proj``: see ``kfopt.capture``, Selection) get the base optimizer's first-order update on their
    raw gradients. ``skipped_steps`` counts every skipped step: the GradScaler skips and, with
    ``base="lamb"``, the base optimizer's skips for non-finite gradients.

Factors, per layer (every ``factor_update_steps`` steps)
    Rows as the capture hands them over (``kfopt.capture``): ``a`` (inputs; Conv2d: unfolded patches),
    with a column of ones when the layer has a bias, and ``g`` (output gradients of the backpropagated
    loss), summed over every call since the last step (micro-batches)::

        A_batch = (1 / R) sum_rows a a^T                      R: input rows
        G_batch = N sum_rows g g^T  =  (1 / N) sum_rows (N g)(N g)^T
        A <- f A + (1 - f) A_batch,  G likewise                 f = factor_decay, A = G = I initially

    ``N`` is the number of loss terms the loss averages over (``loss_average``: "batch" -> the summed
    batch sizes of the calls, "batch+sequence" -> their rows, None (a summed loss) -> 1), so ``N g``
    are per-term gradients and ``A (x) G`` approximates the Fisher ``(1/N) sum_terms vec(dW_t) vec(dW_t)^T``
    of the averaged loss, whatever N is. Under gradient accumulation with micro-batch losses divided by
    their number, N adds up over the micro-batches and the factors equal those of the one big batch.
    For Conv2d (and Linear over sequences with "batch") a row is an (example, position) pair: ``A``
    is the mean over rows and ``G`` the per-example sum over positions averaged over examples, so
    ``A (x) G`` equals KFC's ``Omega (x) Gamma`` (Grosse & Martens, 2016; the factor S = positions
    moves from Omega to Gamma). The reference code divides conv rows by S instead, and does not scale
    g to per-term gradients: kfopt's damping is not on its scale.

    Distributed: each rank sums its local rows; the numerators ``sum a a^T``, ``N_r^2 sum g g^T`` and
    the counts ``R_r``, ``N_r`` are averaged over all ranks (one bucketed all-reduce; packed upper
    triangles with ``symmetric_comm=True``), and the quotients are the factors of the concatenated
    global batch: under DDP each rank's ``g`` is the gradient of its *local* mean loss, so ``N_r g``
    is the per-term gradient whatever the world size. This is the world-size invariance of
    ``docs/contracts.md``, exact even for unequal local batches. A factor whose count is 0 (layer not called)
    keeps its value, and so do all factors when any statistic of the step is not finite (an overflow
    under a GradScaler); decided on the device, without host synchronisation.

Second-order data (every ``inv_update_steps`` steps, after that step's factor update)
    ``compute_method="eigen"``: ``A = QA diag(dA) QA^T`` (``torch.linalg.eigh`` in the factor's dtype,
    fp32; eigenvalues clamped at 0), G likewise, and::

        P = QG [ (QG^T V QA) / (dG dA^T + damping) ] QA^T,     V = [dW | db] (d_out x (d_in + 1))

    on every step with the current damping (``kfopt.kernels.eigen_precondition``: all layers in a few
    launches). ``compute_method="inverse"``: ``P = (G + damping I)^-1 V (A + damping I)^-1`` with the
    inverses (Cholesky) computed at the inverse update with the damping of that step.
    A decomposition that raises or returns non-finite values is retried in float64; if that fails too
    the layer keeps its last good data (identity before the first) and ``decomposition_failures``
    counts it. Checking for failure synchronises with the host, on inverse-update steps only.

KL clipping (``kl_clip``; None disables it), on the device::

        nu = min(1, sqrt(kl_clip / |sum_layers lr_l^2 <P_l, V_l>|)),   P_l <- nu P_l

    ``P_l`` then replaces the layer's ``.grad`` (weight and bias parts).

Hooks
    The capture is armed for the forward/backward passes of steps whose index (``steps`` before the
    step) is a multiple of ``factor_update_steps``: armed at construction and re-armed or disarmed at
    the end of each ``step()``. Everything captured since the previous step (several micro-batches)
    enters that step's factors; ``step()`` then clears the capture. Forwards in eval mode or without
    grad are never captured; a training-mode forward with grad whose output gets no gradient before
    ``step()`` adds its inputs to ``A``.

KAISA (``grad_worker_fraction``; see :mod:`kfopt.kaisa` for the grid and the greedy LPT assignment)
    The default ``grad_worker_fraction=None`` is the distribution's natural fraction: 1 (COMM-OPT) for
    replicated parameters, ``1 / shard size`` under FSDP2 (``kfopt.sharded_distribution``). Every
    exchange between ranks below goes through the preconditioner's ``distributor``
    (``kfopt.distribution.Replicated`` with KAISA's plan). Factors are averaged on all ranks (every
    rank holds all factors). At an inverse update each layer's inverse worker decomposes its two
    factors and broadcasts the data inside its grad-worker group; the layer's grad workers
    precondition its gradient; if ``grad_worker_fraction < 1`` they broadcast
    ``P`` to their receiver groups. Only grad workers store a layer's second-order data. KL clipping
    then runs identically on every rank on all layers. KFAC does not average gradients: wrap the model
    in ``DistributedDataParallel`` so that every rank starts ``step()`` with the same gradients; every
    rank then ends it with the same parameters. Kernel configs (``kfopt.autotune``): the grad workers of
    a layer agree on them (``agree_on_configs`` over the grad-worker group), so they compute the same
    ``P``; with one grad worker per layer each rank tunes for itself; ``KFAC``'s base step agrees over
    all ranks.

Checkpoints
    ``KFACPreconditioner.state_dict()``: ``steps``, ``decomposition_failures`` (this rank's count),
    ``world_size``, ``compute_method``, ``factors`` (``{layer name: {"A", "G"}}``), and each layer's
    second-order data, the data the steps until the next inverse update use, in one of two forms:
    ``second_order`` (``{layer name: [QA, dA, QG, dG]}`` or ``[A_inv, G_inv]``) for the layers whose data
    the saving rank holds, and ``decomposed`` (``{layer name: {"A", "G", "damping"}}``: the factors the
    last inverse update decomposed and the damping it used) for the others (``grad_worker_fraction < 1``
    on several ranks: a rank that is not a layer's grad worker copies the layer's factors to the host at
    each inverse update, asynchronously into pinned host memory the size of those factors; ``state_dict()``
    waits for the copies; device memory is as without checkpoints). Plain tensors and numbers. Factors
    are global averages, identical on all ranks, so a checkpoint from any rank loads at any world size
    and grad-worker fraction. A checkpoint taken at any
    step continues bit-identically: a grad worker loads the saved data, or decomposes the saved
    ``decomposed`` factors as the inverse worker did (the same function on the same kind of device;
    not exact after a decomposition that failed since, counted in ``decomposition_failures``, whose
    layer kept older data). Checkpoints of earlier kfopt versions (no ``decomposed``) are rejected.
    ``load_state_dict`` checks everything (keys, counters, ``world_size``, ``compute_method``, every
    factor's and second-order tensor's shape and dtype, the dampings) before it changes anything.
    ``torch.distributed.checkpoint`` (FSDP2, any world size): ``KFAC.distributed_state_dict()`` and
    ``load_distributed_state_dict`` (``kfopt.composed``) carry
    ``KFACPreconditioner.distributed_state_dict()``: the same entries less ``decomposition_failures``, each
    layer's second-order data saved by the ranks that hold it and loaded by those that hold it after
    the load (docs/sharding.md).
    ``KFAC.state_dict()`` is the base optimizer's state dict (``param_groups`` hold all
    hyperparameters; ``state`` is the base optimizer's state, ``KFAC.state`` is that same object) plus
    ``"kfac"`` (the preconditioner's) and ``"kfac_skipped_steps"``. Constructor-only settings
    (factor_decay, kl_clip, intervals, fraction, method) are not saved.

AMP
    Under ``torch.autocast`` the capture hands over rows in their autocast dtype; the covariance kernel
    accumulates in fp32 and factors are fp32. With ``torch.amp.GradScaler``, pass ``grad_scaler=scaler``
    so that output gradients are unscaled before entering G. ``scaler.step(kfac)`` calls ``KFAC.step``
    (``_step_supports_amp_scaling``) with ``found_inf``: KFAC unscales the gradients if the scaler has
    not, reads ``found_inf`` on the host (the synchronisation ``GradScaler.step`` does for every torch
    optimizer) and, on an overflow, skips the whole step (factors, counters and parameters unchanged;
    ``skipped_steps`` counts it). With a standalone preconditioner, call ``scaler.unscale_(optimizer)``
    before ``precond.step()``; on an overflow its non-finite statistics leave the factors unchanged.
    Without grafting, KFAC itself does not skip steps with non-finite gradients outside a GradScaler (the
    base optimizer decides: kfopt.LAMB skips them). With grafting (``graft="adam"``...) a step whose
    gradients, tensor lr or grafted update are not finite is skipped on the device (``kfopt.graft``):
    weights, graft moments, factors and second-order data unchanged (``kfopt.composed``), the
    preconditioner's ``steps`` advanced, ``skipped_steps`` counted, and where the gradients were finite
    ``blown_up_steps`` too (a RuntimeWarning once).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import torch
from torch import nn

from kfopt.kernels import eigen_precondition, symmetric_covariance
from kfopt.kernels.multi_tensor import to_device

from .capture import CallInfo, CapturedLayer, LayerCapture, LossAverage
from .composed import BaseOptimizer, ComposedOptimizer, check_base
from .distribution import Replicated
from .graft import GRAFT_BETAS, GRAFT_EPS, check_graft_group, graft_defaults
from .kaisa import Strategy
from .layer_state import LayerState, check_saved_factors, check_state_keys
from .sharded_distribution import Sharded, is_sharded
from .validation import (
    check_bool,
    check_int,
    check_loss_average,
    check_nonnegative,
    check_positive,
    check_tensor,
    check_unit_interval,
)

ComputeMethod = Literal["eigen", "inverse"]


def _check_interval(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")


def _decompose(fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
               matrix: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """``fn(matrix)`` in the matrix's dtype, retried in float64 if it raises a LinAlgError or returns
    non-finite values; results in the matrix's dtype and row-major (eigh returns column-major
    eigenvectors: the ranks that receive them hold row-major copies, and all ranks must run the same
    GEMMs to get bit-identical results), or None if both attempts failed."""
    for dtype in dict.fromkeys((matrix.dtype, torch.float64)):
        try:
            result = fn(matrix.to(dtype))
        except torch.linalg.LinAlgError:
            continue
        if torch.stack([torch.isfinite(t).all() for t in result]).all().item():
            return tuple(t.to(matrix.dtype).contiguous() for t in result)
    return None


def _eigh(factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvectors, eigenvalues clamped at 0) of a symmetric factor."""
    values, vectors = torch.linalg.eigh(factor)
    return vectors, values.clamp_min(0)


def _damped_inverse(damping: float) -> Callable[[torch.Tensor], tuple[torch.Tensor]]:
    """``factor -> ((factor + damping I)^-1,)`` by Cholesky."""
    def inverse(factor: torch.Tensor) -> tuple[torch.Tensor]:
        eye = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
        return (torch.cholesky_inverse(torch.linalg.cholesky(factor + damping * eye)),)
    return inverse


class _Layer(LayerState):
    """A preconditioned layer: its capture entry, factors and (on its grad workers) second-order data
    ``second``: ``[QA, dA, QG, dG]`` (eigen) or ``[A_inv, G_inv]`` (inverse), or None on other ranks.
    Other ranks keep instead, on the host, what reproduces the data for a checkpoint (``elsewhere``):
    ``("decomposed", {"A", "G", "damping"})``, the factors the last inverse update decomposed and the
    damping it used, or ``("second_order", data)``, the data a loaded checkpoint carried."""

    def __init__(self, captured: CapturedLayer):
        super().__init__(captured)
        weight = captured.module.weight
        dtype = torch.promote_types(weight.dtype, torch.float32)
        self.A = torch.eye(captured.in_features + captured.has_bias, dtype=dtype, device=weight.device)
        self.G = torch.eye(captured.out_features, dtype=dtype, device=weight.device)
        self.second: list[torch.Tensor] | None = None
        self.elsewhere: tuple[str, list[torch.Tensor] | dict] | None = None

    def identity_second_order(self, method: ComputeMethod) -> list[torch.Tensor]:
        """Placeholder data until a decomposition succeeds: that of identity factors (eigen), or
        identity inverses."""
        if method == "eigen":
            return [torch.eye(len(self.A), dtype=self.A.dtype, device=self.A.device),
                    torch.ones(len(self.A), dtype=self.A.dtype, device=self.A.device),
                    torch.eye(len(self.G), dtype=self.G.dtype, device=self.G.device),
                    torch.ones(len(self.G), dtype=self.G.dtype, device=self.G.device)]
        return [torch.eye(len(self.A), dtype=self.A.dtype, device=self.A.device),
                torch.eye(len(self.G), dtype=self.G.dtype, device=self.G.device)]


def _per_layer(name: str, value: float | Mapping[str, float], layers: list[_Layer]) -> list[float]:
    if isinstance(value, Mapping):
        missing = [layer.name for layer in layers if layer.name not in value]
        if missing:
            raise ValueError(f"{name}: no value for layer(s) {missing}")
        return [value[layer.name] for layer in layers]
    return [value] * len(layers)


class KFACPreconditioner:
    """K-FAC preconditioning of a model's Linear/Conv2d gradients, distributed with KAISA (module docstring).

    Args:
        model: the model (or a ``DistributedDataParallel`` wrapping it).
        lr: the learning rate the KL clip assumes (``step(lr=...)`` overrides it per step).
        damping: added to the eigenvalue products (eigen) or to the factors' diagonal (inverse).
        factor_decay: f of the running averages, in [0, 1).
        kl_clip: the KL-clip bound (> 0), or None for no clipping.
        factor_update_steps, inv_update_steps: the factor and second-order update intervals (steps).
        grad_worker_fraction: KAISA's fraction of ranks that precondition each layer, in (0, 1]; None: the
            natural one of the distribution (1 under DDP, COMM-OPT; ``1 / shard size`` under FSDP2: one owner
            per layer in each shard group, the only fraction FSDP2 takes).
        compute_method: "eigen" or "inverse".
        skip_layers: module names or types not to precondition (as ``LayerCapture``).
        symmetric_comm: all-reduce only the upper triangles of the factors.
        assignment_strategy: "compute" or "memory" balancing of the inverse workers.
        loss_average: how the backpropagated loss averages (``kfopt.capture.loss_term_count``).
        grad_scaler: a ``torch.amp.GradScaler`` whose scale output gradients are divided by.
    """

    def __init__(self, model: nn.Module, lr: float = 0.1, damping: float = 1e-3, factor_decay: float = 0.95,
                 kl_clip: float | None = 1e-3, factor_update_steps: int = 1, inv_update_steps: int = 10,
                 grad_worker_fraction: float | None = None, compute_method: ComputeMethod = "eigen",
                 skip_layers: Iterable[str | type] = (), symmetric_comm: bool = False, *,
                 assignment_strategy: Strategy = "compute", loss_average: LossAverage = "batch",
                 grad_scaler: torch.amp.GradScaler | None = None):
        check_nonnegative("lr", lr)
        check_positive("damping", damping)
        check_unit_interval("factor_decay", factor_decay)
        if kl_clip is not None:
            check_positive("kl_clip", kl_clip)
        _check_interval("factor_update_steps", factor_update_steps)
        _check_interval("inv_update_steps", inv_update_steps)
        if compute_method not in ("eigen", "inverse"):
            raise ValueError(f"compute_method: expected 'eigen' or 'inverse', got {compute_method!r}")
        check_bool("symmetric_comm", symmetric_comm)
        check_loss_average("loss_average", loss_average)
        self.lr, self.damping, self.factor_decay, self.kl_clip = lr, damping, factor_decay, kl_clip
        self.factor_update_steps, self.inv_update_steps = factor_update_steps, inv_update_steps
        self.compute_method, self.symmetric_comm, self.loss_average = compute_method, symmetric_comm, loss_average

        self.capture = LayerCapture.trainable(model, skip_layers, input_fn=self._input_stat,
                                              grad_output_fn=self._grad_output_stat, loss_average=loss_average)
        try:  # a constructor that raises leaves the model without hooks
            self.capture.set_grad_scale(grad_scaler)
            self._layers = [_Layer(layer) for layer in self.capture.layers.values()]
            captured = [layer.captured for layer in self._layers]
            self.distributor = (Sharded.kaisa(captured, grad_worker_fraction, assignment_strategy)
                                if is_sharded(captured) else
                                Replicated.kaisa([(len(layer.A), len(layer.G)) for layer in self._layers],
                                                 1.0 if grad_worker_fraction is None else grad_worker_fraction,
                                                 assignment_strategy))
        except BaseException:
            self.capture.remove()
            raise
        for i, layer in enumerate(self._layers):
            if self.distributor.holds(i):
                layer.second = layer.identity_second_order(compute_method)
            else:
                layer.elsewhere = ("second_order", [t.cpu() for t in layer.identity_second_order(compute_method)])
        self.steps = 0
        self.decomposition_failures = 0
        self.capture.arm()

    # -- statistics handed over by the capture ---------------------------------------------------

    def _input_stat(self, layer: CapturedLayer, call: CallInfo, a: torch.Tensor) -> torch.Tensor | None:
        """``sum_rows a a^T`` ([a | 1] with a bias), fp32, exactly symmetric (covariance kernel)."""
        if a.shape[0] == 0:
            return None
        return symmetric_covariance(a, ones_column=layer.has_bias).mul_(a.shape[0])

    def _grad_output_stat(self, layer: CapturedLayer, call: CallInfo, g: torch.Tensor) -> torch.Tensor | None:
        """``sum_rows g g^T`` (the capture counts the call's loss terms into ``layer.loss_terms``)."""
        if g.shape[0] == 0:
            return None
        return symmetric_covariance(g).mul_(g.shape[0])

    # -- public API -------------------------------------------------------------------------------

    @property
    def layers(self) -> dict[str, CapturedLayer]:
        """The preconditioned layers, by name (the capture's entries)."""
        return self.capture.layers

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, G)`` of layer ``name`` (the live tensors)."""
        layer = self._layers[list(self.capture.layers).index(name)]
        return layer.A, layer.G

    def preconditioned_params(self) -> list[torch.Tensor]:
        """The weights and biases whose gradients ``step()`` replaces."""
        return [p for layer in self._layers for p in (layer.weight, layer.bias) if p is not None]

    def discard_step(self) -> None:
        """Drop what was captured since the last step (a step the GradScaler skipped)."""
        self.capture.clear()

    def _arm(self) -> None:
        """Capture the passes of the next step if it updates the factors (module docstring, Hooks)."""
        self.capture.armed = self.steps % self.factor_update_steps == 0

    @torch.no_grad()
    def step(self, *, lr: float | Mapping[str, float] | None = None,
             damping: float | Mapping[str, float] | None = None) -> None:
        """Update the factors and second-order data when due and precondition the layers' gradients.

        ``lr``/``damping``: a number, or one per layer name; None uses ``self.lr``/``self.damping``.
        Every rank must call it (collectives) with the same values.
        """
        if self._layers:
            lrs = _per_layer("lr", self.lr if lr is None else lr, self._layers)
            dampings = _per_layer("damping", self.damping if damping is None else damping, self._layers)
            if self.steps % self.factor_update_steps == 0:
                self._update_factors()
            if self.steps % self.inv_update_steps == 0:
                self._update_second_order(dampings)
            self._precondition(lrs, dampings)
        self.discard_step()
        self.steps += 1
        self._arm()

    def _second_order_shapes(self, layer: _Layer) -> list[tuple[int, ...]]:
        a, g = len(layer.A), len(layer.G)
        return [(a, a), (a,), (g, g), (g,)] if self.compute_method == "eigen" else [(a, a), (g, g)]

    def state_dict(self) -> dict:
        """``{"steps", "decomposition_failures", "world_size", "compute_method", "factors": {name: {"A",
        "G"}}, "second_order": {name: [tensors]}, "decomposed": {name: {"A", "G", "damping"}}}`` (module
        docstring, Checkpoints): each layer's second-order data is in ``second_order`` or, when this rank
        does not hold it, in ``decomposed`` (host copies: waits for their device-to-host copies)."""
        if self._layers and self._layers[0].A.is_cuda:
            torch.cuda.synchronize(self._layers[0].A.device)
        second, decomposed = {}, {}
        for layer in self._layers:
            if layer.second is None and layer.elsewhere is None:
                raise RuntimeError(f"layer {layer.name!r}: its second-order data is on the ranks that hold it since "
                                   "a distributed checkpoint was loaded; save with distributed_state_dict(), or "
                                   "state_dict() after the next inverse update")
            kind, data = ("second_order", layer.second) if layer.second is not None else layer.elsewhere
            if kind == "second_order":
                second[layer.name] = list(data)
            else:
                decomposed[layer.name] = dict(data)
        return {"steps": self.steps, "decomposition_failures": self.decomposition_failures,
                "world_size": self.distributor.world, "compute_method": self.compute_method,
                "factors": {layer.name: {"A": layer.A, "G": layer.G} for layer in self._layers},
                "second_order": second, "decomposed": decomposed}

    def distributed_state_dict(self) -> dict:
        """The state ``torch.distributed.checkpoint`` saves from every rank and loads into, in place
        (module docstring, Checkpoints): ``state_dict()`` without ``decomposition_failures`` (a count of
        this rank's own decompositions, which keeps its value), with ``second_order`` holding the live data
        of the layers this rank holds and ``decomposed`` empty. Each layer is held somewhere, so the
        saved checkpoint has every layer's data; a rank of another world size or owner assignment loads
        the layers it holds (:meth:`load_distributed_state_dict`)."""
        return {"steps": self.steps, "world_size": self.distributor.world, "compute_method": self.compute_method,
                "factors": {layer.name: {"A": layer.A, "G": layer.G} for layer in self._layers},
                "second_order": {layer.name: layer.second for layer in self._layers if layer.second is not None},
                "decomposed": {}}

    def load_distributed_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`distributed_state_dict` (filled by ``torch.distributed.checkpoint.load``): factors,
        ``steps`` and the second-order data of the layers this rank holds, checked first. The other layers
        have nothing on this rank until their next inverse update: ``state_dict()`` raises RuntimeError
        until then."""
        self.check_distributed_state_dict(state_dict)
        self._load(state_dict)

    def check_distributed_state_dict(self, state_dict: dict) -> None:
        """ValueError unless ``state_dict`` (a :meth:`distributed_state_dict`) fits; changes nothing."""
        self._check_state(state_dict, held_only=True)

    def check_state_dict(self, state_dict: dict) -> None:
        """ValueError unless ``state_dict`` (a ``state_dict()``) fits these layers; changes nothing."""
        self._check_state(state_dict)

    def _check_state(self, state_dict: dict, held_only: bool = False) -> None:
        """``check_state_dict``; ``held_only``: of a ``distributed_state_dict()``, whose ``second_order``
        holds exactly the layers this rank holds."""
        keys = ("steps", "world_size", "compute_method", "factors", "second_order", "decomposed")
        check_state_keys(state_dict, keys if held_only else ("decomposition_failures", *keys), "preconditioner")
        check_int("steps", state_dict["steps"])
        if not held_only:
            check_int("decomposition_failures", state_dict["decomposition_failures"])
        check_int("world_size", state_dict["world_size"], 1)
        if state_dict["compute_method"] != self.compute_method:
            raise ValueError(f"state_dict: the checkpoint's compute_method is {state_dict['compute_method']!r}, "
                             f"this preconditioner's {self.compute_method!r}")
        check_saved_factors(state_dict["factors"], self._layers, ("A", "G"), "preconditioner")
        for layer in self._layers:
            for key in ("A", "G"):
                check_tensor(f"state_dict: factor {key} of layer {layer.name!r}", state_dict["factors"][layer.name][key],
                             getattr(layer, key).shape, getattr(layer, key).dtype)
        second, decomposed = state_dict["second_order"], state_dict["decomposed"]
        names = [layer.name for layer in self._layers if not held_only or layer.second is not None]
        if not isinstance(second, dict) or not isinstance(decomposed, dict) or set(second) & set(decomposed) \
                or set(second) | set(decomposed) != set(names) or (held_only and decomposed):
            which = "this rank holds, in 'second_order'" if held_only else f"{names} once"
            raise ValueError(f"state_dict: 'second_order' and 'decomposed' must hold each of the layers {which}, "
                             f"got {sorted(map(str, second))} and {sorted(map(str, decomposed))}")
        for layer in self._layers:
            if layer.name not in second and layer.name not in decomposed:  # held_only: held elsewhere
                continue
            if layer.name in second:
                data, shapes = second[layer.name], self._second_order_shapes(layer)
                if not isinstance(data, (list, tuple)) or len(data) != len(shapes):
                    raise ValueError(f"state_dict: the second-order data of layer {layer.name!r} must be "
                                     f"{len(shapes)} tensors ({self.compute_method})")
                for i, (t, shape) in enumerate(zip(data, shapes)):
                    check_tensor(f"state_dict: second-order tensor {i} of layer {layer.name!r}", t, shape,
                                 layer.A.dtype)
            else:
                saved = decomposed[layer.name]
                check_state_keys(saved, ("A", "G", "damping"), f"preconditioner's decomposed layer {layer.name!r}")
                for key in ("A", "G"):
                    check_tensor(f"state_dict: decomposed factor {key} of layer {layer.name!r}", saved[key],
                                 getattr(layer, key).shape, getattr(layer, key).dtype)
                check_positive(f"state_dict: damping of the decomposed layer {layer.name!r}", saved["damping"])

    def load_state_dict(self, state_dict: dict) -> None:
        """Load factors, counters and second-order data (from any world size and grad-worker fraction).
        A layer this rank is a grad worker of gets its saved data, or decomposes its saved
        ``decomposed`` factors as its inverse worker did; other ranks keep the layer's entry on the host
        for their own checkpoints."""
        self.check_state_dict(state_dict)
        self._load(state_dict)

    def _load(self, state_dict: dict) -> None:
        """Load a checked ``state_dict()`` or ``distributed_state_dict()`` (without
        ``decomposition_failures``: the count keeps its value)."""
        second, decomposed = state_dict["second_order"], state_dict["decomposed"]
        failures, data = 0, {}
        for layer in self._layers:  # everything computed before anything changes
            if layer.second is None and layer.name not in second and layer.name not in decomposed:
                data[layer.name] = None  # a distributed checkpoint: the data is on the ranks that hold the layer
            elif layer.second is None:
                data[layer.name] = (("second_order", [t.detach().to("cpu", copy=True) for t in second[layer.name]])
                                    if layer.name in second else
                                    ("decomposed", {key: value.detach().to("cpu", copy=True)
                                                    if isinstance(value, torch.Tensor) else float(value)
                                                    for key, value in decomposed[layer.name].items()}))
            elif layer.name in second:
                data[layer.name] = [t.detach().to(device=layer.A.device, copy=True).contiguous()
                                    for t in second[layer.name]]
            else:
                saved = decomposed[layer.name]
                result = self._decomposition(saved["A"].to(layer.A.device), saved["G"].to(layer.A.device),
                                             float(saved["damping"]))
                failures += result is None
                data[layer.name] = result if result is not None else layer.identity_second_order(self.compute_method)
        saved = state_dict["factors"]
        for layer in self._layers:
            layer.A.copy_(saved[layer.name]["A"])
            layer.G.copy_(saved[layer.name]["G"])
            if layer.second is None:
                layer.elsewhere = data[layer.name]
            else:
                layer.second = data[layer.name]
        self.steps = int(state_dict["steps"])
        self.decomposition_failures = int(state_dict.get("decomposition_failures", self.decomposition_failures)) \
            + failures
        self.discard_step()
        self._arm()

    # -- the three phases of a step ---------------------------------------------------------------

    def _update_factors(self) -> None:
        """Running averages of A and G from the statistics captured since the last step."""
        numerators, counts, factors = [], [], []
        for layer in self._layers:
            captured = layer.captured
            terms = captured.loss_terms
            a_sum, g_sum = captured.input_stat, captured.grad_output_stat
            numerators += [a_sum if a_sum is not None else torch.zeros_like(layer.A),
                           g_sum * terms ** 2 if g_sum is not None else torch.zeros_like(layer.G)]
            counts += [captured.input_row_count, terms]
            factors += [layer.A, layer.G]
        count = to_device(torch.tensor(counts, dtype=torch.float64), self._layers[0].A.device)
        handles = [self.distributor.average(numerators, symmetric=self.symmetric_comm),
                   self.distributor.average([count])]
        for handle in handles:
            handle.wait()
        finite = torch.stack([torch.isfinite(numerator).all() for numerator in numerators]).all()
        new = []
        for numerator, n, factor in zip(numerators, count.unbind(), factors):
            n = n.to(factor.dtype)
            new.append(torch.where(finite & (n > 0), numerator / n, factor))
        torch._foreach_lerp_(factors, new, 1.0 - self.factor_decay)

    def _decomposition(self, A: torch.Tensor, G: torch.Tensor, damping: float) -> list[torch.Tensor] | None:
        """The second-order data of factors ``A``, ``G`` (module docstring), or None if a decomposition
        failed."""
        fn = _eigh if self.compute_method == "eigen" else _damped_inverse(damping)
        parts = [_decompose(fn, A), _decompose(fn, G)]
        return None if any(part is None for part in parts) else [t for part in parts for t in part]

    def _update_second_order(self, dampings: list[float]) -> None:
        """Decompose the factors of the layers this rank is inverse worker of; share them with the
        layers' other grad workers (the distributor), who receive them into new tensors: on every rank the
        update replaces a layer's list of second-order data, never its tensors (a skipped grafted step puts
        the old list back, ``KFAC._keep_or_restore``). Ranks that are not a layer's grad workers copy the
        factors to the host (what reproduces the data in their checkpoints)."""
        for i, layer in enumerate(self._layers):
            if self.distributor.decomposes(i):
                result = self._decomposition(layer.A, layer.G, dampings[i])
                if result is None:
                    self.decomposition_failures += 1
                else:
                    layer.second = result
            elif layer.second is not None:  # held here, decomposed by another rank
                layer.second = [torch.empty_like(t) for t in layer.second]
            else:  # ordered on the stream before later factor updates; no host sync
                layer.elsewhere = ("decomposed", {"A": layer.A.to("cpu", non_blocking=True, copy=True),
                                                  "G": layer.G.to("cpu", non_blocking=True, copy=True),
                                                  "damping": float(dampings[i])})
        self.distributor.share_second_order([layer.second for layer in self._layers])

    def _precondition(self, lrs: list[float], dampings: list[float]) -> None:
        """Preconditioned gradients of the layers that have a gradient (on every rank), KL clip, write back."""
        distributor, captured = self.distributor, [layer.captured for layer in self._layers]
        active = [i for i, layer in enumerate(self._layers) if layer.weight.grad is not None]
        grads = distributor.gradients(captured, active)
        mine = [i for i in active if distributor.preconditions(i)]
        if self.compute_method == "eigen":
            second = [self._layers[i].second for i in mine]
            # grad workers of a layer compute its result redundantly: they agree on the kernel configs
            with distributor.agreement(preconditioning=True):
                out = eigen_precondition([grads[i] for i in mine], [s[0] for s in second], [s[1] for s in second],
                                         [s[2] for s in second], [s[3] for s in second],
                                         [dampings[i] for i in mine],
                                         out=[torch.empty(grads[i].shape, dtype=self._layers[i].A.dtype,
                                                          device=grads[i].device) for i in mine])
        else:
            out = [self._layers[i].second[1] @ grads[i].to(self._layers[i].G.dtype) @ self._layers[i].second[0]
                   for i in mine]
        precond = distributor.share_preconditioned(dict(zip(mine, out)), active, grads,
                                                   [layer.A.dtype for layer in self._layers])
        written = [i for i in active if i in precond]  # sharded: the layers this rank owns
        results = [precond[i] for i in written]
        if self.kl_clip is not None and active:
            terms = [(precond[i] * grads[i]).sum().float() * lrs[i] ** 2 for i in written]
            vg = distributor.sum_over_preconditioners(
                torch.stack(terms).sum() if terms else torch.zeros((), device=self._layers[active[0]].A.device))
            if results:
                torch._foreach_mul_(results, (self.kl_clip / vg.abs()).sqrt().clamp(max=1.0))
        distributor.write_gradients(captured, dict(zip(written, results)))


class KFAC(ComposedOptimizer):
    """K-FAC/KAISA preconditioning followed by a base optimizer's step (module docstring).

    ``lr``, ``momentum``, ``weight_decay`` and ``damping`` are per-group hyperparameters (two groups:
    decayed weights, and biases/normalisation weights with weight_decay 0); the other arguments are
    the preconditioner's (:class:`KFACPreconditioner`, available as ``self.preconditioner``); the
    base optimizer is ``self.base`` (``kfopt.composed``).

    ``graft="adam"`` (``"rmsprop"``, ``"sgd"``; ``kfopt.graft``) replaces the base optimizer's step: each
    preconditioned layer's weight and bias step along its preconditioned gradient (``momentum`` on it)
    with AdamW's step length, every other parameter takes AdamW's update (moments of the raw gradient
    with ``graft_betas``, ``graft_eps``)::

        buf <- momentum buf + P ;  w <- w - lr ((||a|| / ||buf||) buf + weight_decay w)

    (``P`` the preconditioned gradient -- for "adam" of Adam's new first moment in place of the gradient,
    ``kfopt.graft`` says why --, ``a`` the AdamW direction; no buffer with ``momentum=0``, then
    ``buf = P``). ``lr`` may be a one-element tensor. With it, AdamW's ``lr``, schedule and
    ``weight_decay`` carry over unchanged.
    """

    _step_supports_amp_scaling = True
    global_hyperparameters = ("graft",)
    state_key = "kfac"
    _blowup_advice = "a larger damping or a smaller lr"
    scaled_statistic = "G"

    def __init__(self, model: nn.Module, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 damping: float = 1e-3, factor_decay: float = 0.95, kl_clip: float | None = 1e-3,
                 factor_update_steps: int = 1, inv_update_steps: int = 10, grad_worker_fraction: float | None = None,
                 compute_method: ComputeMethod = "eigen", base: BaseOptimizer = "sgd",
                 skip_layers: Iterable[str | type] = (), symmetric_comm: bool = False, *,
                 assignment_strategy: Strategy = "compute", loss_average: LossAverage = "batch",
                 grad_scaler: torch.amp.GradScaler | None = None, graft: str = "none",
                 graft_betas: tuple[float, float] = GRAFT_BETAS, graft_eps: float = GRAFT_EPS):
        check_nonnegative("weight_decay", weight_decay)
        check_base(base)
        check_graft_group(graft_defaults(graft, graft_betas, graft_eps))
        preconditioner = KFACPreconditioner(
            model, lr, damping, factor_decay, kl_clip, factor_update_steps, inv_update_steps,
            grad_worker_fraction, compute_method, skip_layers, symmetric_comm,
            assignment_strategy=assignment_strategy, loss_average=loss_average, grad_scaler=grad_scaler)
        self._grad_scaler = grad_scaler
        self._compose(preconditioner, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, damping=damping,
                                           **graft_defaults(graft, graft_betas, graft_eps)), base)

    def _check_group(self, group: dict) -> None:
        self._check_lr(group)
        check_nonnegative("momentum", group["momentum"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_positive("damping", group["damping"])
        check_graft_group(group)

    def _graft_momentum(self, group: dict) -> float:
        return group["momentum"]

    def _second_order_step(self) -> None:
        """``preconditioner.step()`` with each layer's group lr and damping."""
        owner = {id(p): group for group in self.param_groups for p in group["params"]}
        layers = self.preconditioner.layers
        self.preconditioner.step(lr={name: owner[id(layer.module.weight)]["lr"] for name, layer in layers.items()},
                                 damping={name: owner[id(layer.module.weight)]["damping"]
                                          for name, layer in layers.items()})

    def _snapshot(self) -> tuple:
        """Copies of the factors on a factor-update step; the layers' second-order data (the lists the
        inverse update replaces, not copies) and the failure count on an inverse-update step."""
        pre = self.preconditioner
        factors = [f for layer in pre._layers for f in (layer.A, layer.G)] \
            if pre.steps % pre.factor_update_steps == 0 else []
        second = [(layer.second, layer.elsewhere) for layer in pre._layers] \
            if pre.steps % pre.inv_update_steps == 0 else None
        return factors, [f.clone() for f in factors], second, pre.decomposition_failures

    def _keep_or_restore(self, ok: torch.Tensor, snapshot: tuple) -> None:
        """Factors back on the device (``torch.where``); second-order data back on the host: an
        inverse-update step synchronises already (its decompositions are checked), and every rank gets the
        same ``ok`` (same gradients and preconditioned gradients)."""
        factors, saved, second, failures = snapshot
        for factor, old in zip(factors, saved):
            factor.copy_(torch.where(ok, factor, old))
        if second is not None and not bool(ok):
            for layer, (data, elsewhere) in zip(self.preconditioner._layers, second):
                layer.second, layer.elsewhere = data, elsewhere
            self.preconditioner.decomposition_failures = failures
