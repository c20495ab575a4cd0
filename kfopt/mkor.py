r"""MKOR and MKOR-H (Mozaffari et al., NeurIPS 2023): Kronecker-factored inverses kept up to date by
rank-1 Sherman-Morrison updates; the math is in ``docs/mkor.md``.

Two objects, as in ``kfopt.kfac``: :class:`MKORPreconditioner` (the capture, the factors, the steps below
up to the preconditioned gradient; ``kfopt.preconditioner.Preconditioner``: ``precond.step()`` in
front of any optimizer) and :class:`MKOR`, a ``kfopt.composed.ComposedOptimizer`` composing one with a
base optimizer (``MKOR.step()`` = ``precond.step()`` then ``base.step()``).

Per preconditioned layer (``nn.Linear``/``nn.Conv2d`` with groups=1, minus ``skip_layers`` and layers
whose weight is frozen; ``kfopt.capture``; grouped/depthwise Conv2d layers and the projections inside
``nn.MultiheadAttention``, its ``out_proj`` included, are never preconditioned: their parameters get the
base optimizer's update), with ``V = [dW | db]`` (d_out x (d_in [+ 1])):

Vectors (on factor-update steps: every ``inv_freq`` steps, starting at step 0)::

    a = (1 / R) sum_rows [x | 1]                  the mean layer input (1 appended with a bias;
                                                   Conv2d: unfolded patches, R = batch x positions)
    g = (1 / R) sum_rows N g_row                  the mean per-example output gradient

``g_row`` is the output gradient of the backpropagated loss and ``N`` its number of loss terms
(``loss_average``: "batch" -> the summed batch sizes of the calls, "batch+sequence" -> their rows,
None (a summed loss) -> 1), so ``N g_row`` is the gradient of one loss term (``kfopt.capture``,
Scaling), exactly as in ``kfopt.kfac``. Everything captured since the last step is summed (several
calls or micro-batches; with micro-batch losses divided by their number).

Factors, ``L_0 = R_0 = I``, ``gamma = stat_decay``::

    L_k = gamma L_{k-1} + (1 - gamma) g g^T   = gamma^k I + (1 - gamma) sum_{i<=k} gamma^(k-i) g_i g_i^T
    R_k likewise with a                       (d_in [+ 1])^2

MKOR never forms them: it keeps ``JL = L^{-1}``, ``JR = R^{-1}`` (identity at the start) and applies
each update by exact Sherman-Morrison (``kfopt.kernels.rank1_inverse_update``; all factors of a step
in one pipeline): without stabiliser events, ``JL == inv(L_k)`` after k updates. Each inverse is
stored as ``scale * F`` with ``F`` in ``factor_dtype`` (fp32, bf16 or fp16) normalised to
``max|F| <= 1`` and ``scale`` an fp32 scalar (the kernel's scale handling: no overflow in any storage
dtype, whatever the magnitude of the vectors; :meth:`MKOR.inverse_factors` returns ``scale * F``).

Stabiliser (before each update, per factor, on the device): if ``max_ij |J_ij| > stabilizer_threshold``
(the largest entry of the true inverse, not of the stored ``F``), ``J <- zeta J + (1 - zeta) I`` with
``zeta = stabilizer_blend``. A factor holding NaN/inf (or found numerically indefinite along the new
vector) is reset to ``I`` before the update. A non-finite vector (e.g. a layer not called since the
last update: its count is 0) leaves the factor unchanged. Blends, resets and skips are counted per
factor (:attr:`MKOR.factor_events`). A factor-update step whose parameter gradients are not all finite
(the base optimizer's step is then skipped: ``kfopt.LAMB``) changes no factor, scale or count: decided
on the device, without a host synchronisation.

Preconditioning (every step, for every layer that has a gradient; ``kfopt.kernels.kronecker_precondition``)::

    D = JL V JR,    V <- (||V|| / ||D||) D          (joint Frobenius norm of [dW | db])

keeping ``V`` where the ratio is not finite. The result replaces ``.grad`` of the weight and bias;
the base optimizer then takes its step on all parameters (raw gradients for parameters that no
preconditioned layer owns: embeddings, norms, skipped layers) and owns weight decay and momentum.

Not copied from the reference code (``docs/mkor.md``): its damped recursion ``J <- SM(0.95 J + 0.05 I, v)``
(the EMA above is used), its stabiliser that can never run (this one runs and also catches NaN/inf),
its fp16 ``v^T J v`` that overflows (the math here is fp32 with the scale handling above), its sum of
weight and bias norms (the joint norm is used) and its double division by the world size.

Base optimizer and param groups
    The param groups are ``kfopt.param_groups(model, weight_decay)`` (decayed weights; biases and
    normalisation weights without decay), carrying ``lr`` and ``weight_decay``; the base optimizer is
    built from *the same dicts*, so LR schedulers on MKOR drive it. ``base``: ``"lamb"``
    (``kfopt.LAMB``), ``"sgd"``, ``"adamw"`` (torch.optim), with ``**base_kwargs`` passed to its
    constructor, or a callable ``base(param_groups) -> torch.optim.Optimizer`` that builds its
    optimizer from the dicts it is given (then ``base_kwargs`` may only hold ``weight_decay``).
    ``weight_decay`` defaults to the base's default (LAMB, AdamW: 0.01; SGD and callables: 0).

Grafting (``graft="adam"``, ``"rmsprop"``, ``"sgd"``; ``kfopt.graft``)
    Replaces the base optimizer's step: ``w <- w - lr ((||a|| / ||V||) V + weight_decay w)`` for each
    preconditioned layer's weight and bias (``V`` the preconditioned gradient above -- for "adam" of
    Adam's new first moment in place of the gradient, ``kfopt.graft`` says why --, ``a`` the AdamW
    direction from the raw gradient's moments with ``graft_betas``, ``graft_eps``; MKOR has no
    momentum of its own, so none on ``V``), AdamW's update for every other parameter, and for all of
    them once MKOR-H has switched. AdamW's ``lr``, schedule and ``weight_decay`` carry over. A step the
    graft skips (non-finite gradients or update, a bad tensor lr) also leaves the factors, scales and
    counts of a factor-update step unchanged (``kfopt.composed``); one whose gradients were finite counts
    in ``blown_up_steps`` too (a RuntimeWarning once).

Distributed (``torch.distributed`` initialised, model wrapped in ``DistributedDataParallel`` so that
every rank starts ``step()`` with the same gradients; every exchange goes through the preconditioner's
``distributor``, ``kfopt.distribution.Replicated``)
    On factor-update steps, each rank's sums and counts are averaged over all ranks in two
    all-reduces, so that the quotients are the vectors of the concatenated global batch (world-size
    invariant, also for unequal local batches): all layers' ``[sum a | R]`` in one buffer, all
    layers' ``[N sum g | R]`` in a second. The ``a`` all-reduce is started asynchronously from the
    first output-gradient hook of each backward pass that follows captured forwards (all inputs of
    that forward are known then), so it overlaps the rest of the backward pass (and DDP's gradient
    all-reduces); a later forward of the same step (micro-batches) restarts it with the new sums, so
    only the last backward is overlapped. The ``g`` all-reduce starts in ``step()``, once every
    gradient is known, and is not overlapped. Every rank then applies the same rank-1 updates to the
    same factors (deterministic kernels, their tuned configs agreed across the ranks:
    ``kfopt.autotune.agree_on_configs``), so factors and parameters stay bit-identical on all ranks.

FSDP2 and HSDP (``fully_shard`` on the layers and the root; placements ``(Shard(0),)`` or
``(Replicate(), Shard(0))``, any other raises ValueError at construction naming the layer; the
distributor is ``kfopt.sharded_distribution.Sharded``; volumes per step in ``docs/sharding.md``)
    The vectors are averaged over every data-parallel rank as above (every rank takes part), and only
    each layer's owner in the shard group (HSDP: in each replicate group, computing the same bits) holds
    and updates its factors, scales and event counts: ``held_layers`` names a rank's layers,
    ``factor_events`` and ``inverse_factors`` cover those alone. Whether a factor-update step's gradients
    are all finite is decided over the whole model: each rank's verdict on its shards, summed over the
    shard group (``kfopt.sharding``), so every owner skips the same updates. Each step, each layer's rows
    of ``[dW | db]`` go to the layer's owner, the owner preconditions the whole matrix (its joint norm is
    the whole layer's) and sends the rows back (``last_ratios`` then holds the ratios of the layers this
    rank owns). The base optimizer steps on the local shards and reduces its
    own whole-tensor norms (LAMB's trust ratios: ``kfopt.sharding``). Grafted, the graft steps the
    local shards with its whole-tensor norms and skip verdict reduced over the shard group
    (``kfopt.composed``, ``kfopt.graft``).

AMP
    Under ``torch.autocast`` the rows are summed in fp32. With ``torch.amp.GradScaler`` pass
    ``grad_scaler=scaler`` (output gradients entering ``g`` are unscaled) and call
    ``scaler.step(mkor)``: MKOR unscales the gradients if the scaler has not, reads ``found_inf`` on
    the host (the synchronisation ``GradScaler.step`` does for every torch optimizer) and on an
    overflow skips the whole step: factors, scales, counters and parameters unchanged,
    ``skipped_steps`` incremented, and the step is redone as a factor-update step if it was one.
    Under FSDP2 ``found_inf`` is torch's, reduced over the mesh when it unscales the DTensor gradients,
    so every rank skips together.

Checkpoints
    ``state_dict()`` is the base optimizer's state dict plus ``"mkor"``: ``steps`` (MKOR-H adds
    ``switched_at`` and its switch criterion's state) and per layer ``{"JL", "JR"}`` (the stored ``F``, plain tensors in ``factor_dtype``),
    ``{"JL_scale", "JR_scale"}`` (0-d fp32: the inverse is ``scale * F``) and ``events`` ((2, 3) int32:
    per factor the counts of blends, resets and skips), plus ``"mkor_skipped_steps"``. Factors are
    identical on all ranks, so a checkpoint loads at any world size; a round trip continues
    bit-identically. Constructor-only settings (inv_freq, stat_decay, stabiliser, factor_dtype) are not
    saved. Under FSDP2 a rank holds only its layers' factors, so ``state_dict()`` raises RuntimeError
    there (unless the rank holds every layer: a shard group of 1); ``load_state_dict`` of a whole state
    loads each rank's layers. ``torch.distributed.checkpoint`` (FSDP2, any world size or mesh):
    ``MKOR.distributed_state_dict()`` and ``load_distributed_state_dict`` (``kfopt.composed``) carry the
    preconditioner's ``distributed_state_dict()``, the entries above for the layers this rank holds:
    each owner saves its layers' (HSDP's replicas the same, once) and the new owners load theirs
    (MKOR-H adds its switch criterion; a switched MKOR-H's holds no factors and loads into an MKORH
    that has switched).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from torch import nn

from kfopt.kernels.kronecker import kronecker_precondition
from kfopt.kernels.multi_tensor import to_device
from kfopt.kernels.rank1_inverse import rank1_inverse_update

from . import collectives
from .capture import CallInfo, CapturedLayer, LayerCapture, LossAverage
from .composed import BaseOptimizer, ComposedOptimizer, check_base
from .distribution import Replicated
from .graft import GRAFT_BETAS, GRAFT_EPS, check_graft_group, graft_defaults
from .layer_state import LayerState, check_saved_factors, check_state_keys
from .preconditioner import PreconditionerAttributes
from .sharded_distribution import Sharded, is_sharded
from .sharding import ShardLayout, local, shard_layout
from .validation import KIND_KEY, check_int, check_keys, check_loss_average, check_nonnegative, check_positive, check_tensor

logger = logging.getLogger(__name__)

#: the default weight decay of each base optimizer (of the decayed group; callables: 0)
_DEFAULT_WEIGHT_DECAY = {"lamb": 0.01, "sgd": 0.0, "adamw": 0.01}
#: factor storage dtypes (float64 only where the PyTorch kernel path runs)
FACTOR_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_base(base, base_kwargs: dict) -> float:
    """Validate ``base`` and ``base_kwargs``; returns the weight decay of the decayed group."""
    check_base(base)
    if isinstance(base, str):
        weight_decay = base_kwargs.get("weight_decay", _DEFAULT_WEIGHT_DECAY[base])
    else:
        extra = sorted(set(base_kwargs) - {"weight_decay"})
        if extra:
            raise ValueError(f"base: a callable base builds its own optimizer; pass {extra} to it, not to MKOR")
        weight_decay = base_kwargs.get("weight_decay", 0.0)
    check_nonnegative("weight_decay", weight_decay)
    return weight_decay


class _Layer(LayerState):
    """A preconditioned layer: its capture entry and its stored inverse factors ``F`` (JL, JR), None on a
    rank that does not hold them (FSDP2: the layer's owner holds them)."""

    def __init__(self, captured: CapturedLayer, factor_dtype: torch.dtype, held: bool):
        super().__init__(captured)
        device = captured.module.weight.device
        self.sides = (captured.out_features, captured.in_features + captured.has_bias)  # of JL, JR
        self.JL, self.JR = ((torch.eye(side, dtype=factor_dtype, device=device) for side in self.sides) if held
                            else (None, None))

    def has_gradient(self) -> bool:
        return self.weight.grad is not None and (self.bias is None or self.bias.grad is not None)


class MKORPreconditioner:
    """MKOR's preconditioning of a model's Linear/Conv2d gradients (module docstring): rank-1-updated
    Kronecker-factored inverses; ``kfopt.preconditioner.Preconditioner``, so it sits in front of any
    optimizer (``precond.step(); optimizer.step()``; the optimizer owns the parameter update).

    Args:
        model: the model (or a ``DistributedDataParallel`` wrapping it).
        inv_freq: factor-update interval in steps (updates at steps 0, inv_freq, 2 inv_freq, ...).
        stat_decay: ``gamma`` of the running averages, in (0, 1).
        stabilizer_threshold: blend a factor when its largest entry exceeds this (> 0; inf: never). The
            default 10 did better than 2 (the reference code's value, which its bug never applies), 100,
            1e3 and inf over 300 factor updates on a digits MLP, and no worse than 100 on the chars task.
        stabilizer_blend: ``zeta`` of the blend ``zeta J + (1 - zeta) I``, in [0, 1].
        factor_dtype: storage dtype of the inverse factors (fp32, bf16, fp16; float64 only with the
            PyTorch kernel path).
        skip_layers: module names or types not to precondition (as ``LayerCapture``).
        loss_average: how the backpropagated loss averages its terms (``kfopt.capture.loss_term_count``).
        grad_scaler: the ``torch.amp.GradScaler`` whose scale output gradients are divided by.

    Attributes: ``steps`` (completed steps), ``layers`` (names of the preconditioned layers),
    ``factor_events``, ``last_ratios`` (the ``||V|| / ||D||`` of each layer that had a gradient at the
    last step, a device tensor, NaN where the raw gradient was kept; under FSDP2 of the layers this rank
    owns), ``capture``, ``distributor``.
    """

    def __init__(self, model: nn.Module, inv_freq: int = 10, stat_decay: float = 0.95,
                 stabilizer_threshold: float = 10.0, stabilizer_blend: float = 0.9,
                 factor_dtype: torch.dtype = torch.float32, skip_layers: Iterable[str | type] = (), *,
                 loss_average: LossAverage = "batch", grad_scaler: torch.amp.GradScaler | None = None):
        if isinstance(inv_freq, bool) or not isinstance(inv_freq, int) or inv_freq < 1:
            raise ValueError(f"inv_freq: expected an int >= 1, got {inv_freq!r}")
        if not (isinstance(stat_decay, (int, float)) and not isinstance(stat_decay, bool) and 0 < stat_decay < 1):
            raise ValueError(f"stat_decay: expected a number in (0, 1), got {stat_decay!r}")
        if (not isinstance(stabilizer_threshold, (int, float)) or isinstance(stabilizer_threshold, bool)
                or math.isnan(stabilizer_threshold) or stabilizer_threshold <= 0):
            raise ValueError(f"stabilizer_threshold: expected a number > 0 (inf: never blend), got "
                             f"{stabilizer_threshold!r}")
        if (not isinstance(stabilizer_blend, (int, float)) or isinstance(stabilizer_blend, bool)
                or not 0 <= stabilizer_blend <= 1):
            raise ValueError(f"stabilizer_blend: expected a number in [0, 1], got {stabilizer_blend!r}")
        if factor_dtype not in FACTOR_DTYPES:
            raise ValueError(f"factor_dtype: expected one of {FACTOR_DTYPES}, got {factor_dtype!r}")
        check_loss_average("loss_average", loss_average)
        self.inv_freq, self.stat_decay = inv_freq, float(stat_decay)
        self.stabilizer_threshold, self.stabilizer_blend = float(stabilizer_threshold), float(stabilizer_blend)
        self.factor_dtype, self.loss_average = factor_dtype, loss_average

        self.capture = LayerCapture.trainable(model, skip_layers, input_fn=self._input_stat,
                                              grad_output_fn=self._grad_output_stat, loss_average=loss_average)
        try:  # a constructor that raises leaves the model without hooks
            self.capture.set_grad_scale(grad_scaler)
            captured = list(self.capture.layers.values())
            self._sharded = is_sharded(captured)
            # FSDP2/HSDP: whole-tensor verdicts (the finite check) are reduced over the shard group
            self._shards = (shard_layout(self.capture.model.named_parameters()) if self._sharded
                            else ShardLayout(None))
            self.distributor = Sharded(captured) if self._sharded else Replicated()
            self._layers = [_Layer(layer, factor_dtype, self.distributor.holds(i)) for i, layer in enumerate(captured)]
            # the layers whose factors this rank holds (all but under FSDP2: the owner's), and each one's
            # position in the scales and event counts, which are theirs alone
            self._held = [i for i, layer in enumerate(self._layers) if layer.JL is not None]
            self._slot = {i: k for k, i in enumerate(self._held)}
            device = self._layers[0].weight.device if self._layers else torch.device("cpu")
            self._scales = torch.ones(2 * len(self._held), dtype=torch.float32, device=device)
            self._events = torch.zeros((2 * len(self._held), 3), dtype=torch.int32, device=device)
            self._a_index, self._a_count_index = self._vector_layout([layer.sides[1] for layer in self._layers],
                                                                     device)
            self._g_index, self._g_count_index = self._vector_layout([layer.sides[0] for layer in self._layers],
                                                                     device)
        except BaseException:
            self.capture.remove()
            raise
        self._overlap = self.distributor.world > 1
        self._a_buffer: torch.Tensor | None = None
        self._a_handle: collectives.CollectiveHandle | None = None
        self._a_current = False
        self.steps = 0
        self.last_ratios: torch.Tensor | None = None
        self.capture.arm()

    def preconditioned_params(self) -> list[torch.Tensor]:
        """The weights and biases whose gradients ``step()`` replaces."""
        return [p for layer in self._layers for p in (layer.weight, layer.bias) if p is not None]

    @torch.no_grad()
    def step(self) -> None:
        """Factor update (when due) and preconditioning; then prepare the capture for the next step.
        Every rank must call it (collectives)."""
        if self._layers:
            if self.steps % self.inv_freq == 0:
                # the ranks that hold the same factors update them alike (replicated: every rank)
                with self.distributor.agreement(preconditioning=True):
                    self._update_factors()
            # replicated: every rank preconditions every layer; sharded: each owner its own layers
            with self.distributor.agreement(preconditioning=True):
                self._precondition()
        self.discard_step()
        self.steps += 1
        self._arm()

    def free(self) -> None:
        """Remove the capture's hooks and drop the factors, their scales and counters (MKOR-H's switch):
        no layer is preconditioned afterwards."""
        self.discard_step()
        self.capture.remove()
        self._layers, self._held, self._slot = [], [], {}
        self._scales = self._scales.new_empty(0)
        self._events = self._events.new_empty((0, 3))

    # -- public helpers ----------------------------------------------------------------------------

    @property
    def layers(self) -> list[str]:
        """Names of the preconditioned layers, in module order."""
        return [layer.name for layer in self._layers]

    @property
    def held_layers(self) -> list[str]:
        """Names of the layers whose factors this rank holds: all of them, but under FSDP2 the layers it
        owns (module docstring)."""
        return [self._layers[i].name for i in self._held]

    def inverse_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(JL, JR)`` of layer ``name`` as the true inverses ``scale * F`` (new fp32 tensors, or float64
        for float64 factors); ValueError for a layer whose factors another rank holds (FSDP2)."""
        i = self.layers.index(name)
        layer = self._layers[i]
        if layer.JL is None:
            raise ValueError(f"name: the factors of layer {name!r} are held by its owner, rank "
                             f"{self.distributor.owners[i]} of the shard group")
        k = self._slot[i]
        dtype = torch.promote_types(self.factor_dtype, torch.float32)
        return (self._scales[2 * k].to(dtype) * layer.JL.to(dtype),
                self._scales[2 * k + 1].to(dtype) * layer.JR.to(dtype))

    @property
    def factor_events(self) -> torch.Tensor:
        """Counts per held layer (``held_layers``: all but under FSDP2) and factor (JL, JR) of [stabiliser
        blends, resets, skipped updates] since the start: a (layers, 2, 3) int32 device tensor."""
        return self._events.view(len(self._held), 2, 3)

    # -- statistics handed over by the capture -----------------------------------------------------

    def _input_stat(self, layer: CapturedLayer, call: CallInfo, a: torch.Tensor) -> torch.Tensor:
        """``sum_rows a`` in fp32; the next backward restarts the ``a`` all-reduce."""
        self._a_current = False
        return a.sum(0, dtype=torch.float32)

    def _grad_output_stat(self, layer: CapturedLayer, call: CallInfo, g: torch.Tensor) -> torch.Tensor:
        """``sum_rows g`` in fp32 (the capture counts the call's loss terms into ``layer.loss_terms``).
        The first one of a backward after captured forwards starts the asynchronous ``a`` all-reduce
        (distributed only)."""
        if self._overlap and not self._a_current:
            self._start_a_reduce()
        return g.sum(0, dtype=torch.float32)

    # -- factor update -----------------------------------------------------------------------------

    @staticmethod
    def _vector_layout(sizes: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather indices into a buffer of per-layer segments ``[numerator (size) | count]``: the
        numerators' positions, and for each of them the position of its layer's count."""
        values, counts, offset = [], [], 0
        for size in sizes:
            values.extend(range(offset, offset + size))
            counts.extend([offset + size] * size)
            offset += size + 1
        return (to_device(torch.tensor(values, dtype=torch.int64), device),
                to_device(torch.tensor(counts, dtype=torch.int64), device))

    def _numerators(self, sums: list[torch.Tensor | None], sizes: list[int], counts: list[list[float]]
                    ) -> torch.Tensor:
        """One fp32 buffer of per-layer segments ``[sum (zeros if None) | counts]``; the counts travel to
        the device in one non-blocking copy."""
        device = self._scales.device
        flat = to_device(torch.tensor([c for layer_counts in counts for c in layer_counts], dtype=torch.float32),
                         device)
        parts, offset = [], 0
        for total, size, layer_counts in zip(sums, sizes, counts):
            parts.append(total if total is not None else torch.zeros(size, dtype=torch.float32, device=device))
            parts.append(flat[offset:offset + len(layer_counts)])
            offset += len(layer_counts)
        return torch.cat(parts)

    def _a_numerators(self) -> torch.Tensor:
        """``[sum_rows a (| R) | R]`` of every layer (the bias entry of ``sum [a | 1]`` is R)."""
        layers = [layer.captured for layer in self._layers]
        return self._numerators([c.input_stat for c in layers], [c.in_features for c in layers],
                                [[float(c.input_row_count)] * (1 + c.has_bias) for c in layers])

    def _g_numerators(self) -> torch.Tensor:
        """``[N sum_rows g | R]`` of every layer."""
        sums = []
        for layer in self._layers:
            captured = layer.captured
            terms = captured.loss_terms
            sums.append(captured.grad_output_stat * terms if captured.grad_output_stat is not None else None)
        layers = [layer.captured for layer in self._layers]
        return self._numerators(sums, [c.out_features for c in layers],
                                [[float(c.grad_output_row_count)] for c in layers])

    def _start_a_reduce(self) -> None:
        """(Re)start averaging the ``a`` numerators over the ranks (module docstring, Distributed)."""
        if self._a_handle is not None:
            self._a_handle.wait()
        self._a_buffer = self._a_numerators()
        self._a_handle = self.distributor.average([self._a_buffer])
        self._a_current = True

    def _update_factors(self) -> None:
        """Average the vectors over the ranks and apply one rank-1 update to every factor."""
        if not self._a_current:
            self._start_a_reduce()
        g_buffer = self._g_numerators()
        g_handle = self.distributor.average([g_buffer])
        self._a_handle.wait()
        g_handle.wait()
        a = self._a_buffer[self._a_index] / self._a_buffer[self._a_count_index]
        g = g_buffer[self._g_index] / g_buffer[self._g_count_index]
        # a step whose gradients are not all finite changes no factor (the base skips it): non-finite
        # vectors leave the factors and scales unchanged, and the skips they count are taken back
        grads = [local(p.grad) for p in self.capture.model.parameters() if p.grad is not None]
        finite = torch.stack([torch.isfinite(grad).all() for grad in grads]).all() if grads else None
        if finite is not None:
            finite = self._shards.all_true(finite)  # sharded: every shard of the group
            a, g = a.masked_fill(~finite, math.nan), g.masked_fill(~finite, math.nan)
            events = self._events.clone()
        a_vectors = a.split([layer.sides[1] for layer in self._layers])
        g_vectors = g.split([layer.sides[0] for layer in self._layers])
        # FSDP2: the owner's layers only (every rank took part in the averages and the verdict above)
        factors = [f for i in self._held for f in (self._layers[i].JL, self._layers[i].JR)]
        vectors = [v for i in self._held for v in (g_vectors[i], a_vectors[i])]
        if factors:
            rank1_inverse_update(factors, vectors, self._scales, decay=self.stat_decay,
                                 threshold=self.stabilizer_threshold, blend=self.stabilizer_blend,
                                 counts=self._events)
        if finite is not None and factors:
            self._events.copy_(torch.where(finite, self._events, events))

    def discard_step(self) -> None:
        """Drop what was captured since the last step (after using it, or for a step the GradScaler
        skipped); an ``a`` all-reduce in flight is completed first (every rank started it)."""
        if self._a_handle is not None:
            self._a_handle.wait()
        self._a_handle, self._a_buffer, self._a_current = None, None, False
        self.capture.clear()

    def _arm(self) -> None:
        """Capture the passes of the next step if it updates the factors."""
        self.capture.armed = self.steps % self.inv_freq == 0

    # -- preconditioning ---------------------------------------------------------------------------

    def _precondition(self) -> None:
        """Replace the gradients of the layers that have one by their preconditioned gradients."""
        indices = [i for i, layer in enumerate(self._layers) if layer.has_gradient()]
        if not indices:
            return
        captured = [layer.captured for layer in self._layers]
        # replicated: views of the local weight gradients, the bias gradients beside them; sharded: the
        # owner's whole [dW | db] gathered from the shards. Either way written in place.
        matrices = self.distributor.gradients(captured, indices, with_bias=self._sharded)
        active = [self._layers[i] for i in matrices]
        if self._sharded:
            grads = [m[:, :layer.captured.in_features] for m, layer in zip(matrices.values(), active)]
            biases = [m[:, -1] if layer.bias is not None else None for m, layer in zip(matrices.values(), active)]
        else:
            grads = list(matrices.values())
            biases = [layer.bias.grad if layer.bias is not None else None for layer in active]
        self.last_ratios = kronecker_precondition([layer.JL for layer in active], grads,
                                                  [layer.JR for layer in active], biases)
        self.distributor.write_gradients(captured, matrices)

    # -- checkpoints -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """``{"steps", "factors": {name: {"JL", "JR", "JL_scale", "JR_scale", "events"}}}`` (module
        docstring, Checkpoints); RuntimeError where another rank holds a layer's factors (FSDP2: save
        :meth:`distributed_state_dict`)."""
        elsewhere = [layer.name for layer in self._layers if layer.JL is None]
        if elsewhere:
            raise RuntimeError(f"layers {elsewhere}: their factors are held by their owners in the shard group; "
                               "save with distributed_state_dict()")
        return self.distributed_state_dict()

    def distributed_state_dict(self) -> dict:
        """The state ``torch.distributed.checkpoint`` saves from every rank and loads into, in place:
        ``state_dict()`` with the factors of the layers this rank holds (``held_layers``; FSDP2: the
        owners', so the checkpoint has every layer's once); :meth:`load_distributed_state_dict` of another
        world size or mesh loads the new owners' layers."""
        return {"steps": self.steps, "factors": {
            self._layers[i].name: {"JL": self._layers[i].JL, "JR": self._layers[i].JR, "JL_scale": self._scales[2 * k],
                                   "JR_scale": self._scales[2 * k + 1], "events": self.factor_events[k]}
            for k, i in enumerate(self._held)}}

    def check_state_dict(self, saved: dict, layers: list[_Layer] | None = None) -> None:
        """ValueError unless ``saved`` (a ``state_dict()``) fits: keys, ``steps``, and every layer's
        factors (shape, ``factor_dtype``), scales (0-d fp32) and event counts of ``layers`` (default:
        this preconditioner's, also those another rank holds); changes nothing."""
        layers = self._layers if layers is None else layers
        check_state_keys(saved, ("steps", "factors"), "optimizer")
        check_int("state_dict: mkor steps", saved["steps"])
        check_saved_factors(saved["factors"], layers, (), "optimizer")
        for layer in layers:
            layer_state = saved["factors"][layer.name]
            check_state_keys(layer_state, ("JL", "JR", "JL_scale", "JR_scale", "events"), f"layer {layer.name!r}")
            where = f"state_dict: layer {layer.name!r}"
            for key, side in zip(("JL", "JR"), layer.sides):
                check_tensor(f"{where} {key}", layer_state[key], (side, side), self.factor_dtype)
                check_tensor(f"{where} {key}_scale", layer_state[f"{key}_scale"], (), torch.float32)
            check_tensor(f"{where} events", layer_state["events"], (2, 3), torch.int32)

    def check_distributed_state_dict(self, saved: dict) -> None:
        """ValueError unless ``saved`` (a :meth:`distributed_state_dict`) holds the factors of exactly the
        layers this rank holds, fitting; changes nothing."""
        self.check_state_dict(saved, [self._layers[i] for i in self._held])

    def load_state_dict(self, mkor: dict) -> None:
        """Load a ``state_dict()`` (each rank the layers it holds), checked first (``check_state_dict``: a
        state that does not fit raises ValueError and changes nothing); statistics captured since the
        last step are dropped."""
        self.check_state_dict(mkor)
        self._load(mkor)

    def load_distributed_state_dict(self, mkor: dict) -> None:
        """Load a :meth:`distributed_state_dict` (filled by ``torch.distributed.checkpoint.load``: the
        factors of the layers this rank holds), checked first."""
        self.check_distributed_state_dict(mkor)
        self._load(mkor)

    def _load(self, mkor: dict) -> None:
        """Load the held layers' factors and ``steps`` of a checked state."""
        for k, i in enumerate(self._held):
            layer = self._layers[i]
            saved = mkor["factors"][layer.name]
            layer.JL.copy_(saved["JL"])
            layer.JR.copy_(saved["JR"])
            self._scales[2 * k] = saved["JL_scale"]
            self._scales[2 * k + 1] = saved["JR_scale"]
            self.factor_events[k].copy_(saved["events"])
        self.steps = int(mkor["steps"])
        self.discard_step()
        self._arm()


class MKOR(PreconditionerAttributes, ComposedOptimizer):
    """MKOR: an :class:`MKORPreconditioner` in front of a base optimizer (module docstring).

    Args:
        model: the model (or a ``DistributedDataParallel`` wrapping it).
        lr: learning rate of the base optimizer (per group in ``param_groups``).
        base: ``"lamb"``, ``"sgd"``, ``"adamw"`` or a callable (module docstring).
        inv_freq, stat_decay, stabilizer_threshold, stabilizer_blend, factor_dtype, skip_layers,
            loss_average, grad_scaler: the preconditioner's (:class:`MKORPreconditioner`).
        graft, graft_betas, graft_eps: grafting (module docstring; "none": the base optimizer's step).
        **base_kwargs: the base optimizer's other arguments (``weight_decay``, ``betas``, ``momentum``...).

    Attributes: ``base`` (the base optimizer), ``preconditioner``, and the preconditioner's ``steps``,
    ``layers``, ``factor_events``, ``last_ratios``, ``capture``.
    """

    _step_supports_amp_scaling = True
    global_hyperparameters = ("graft",)
    state_key = "mkor"
    scaled_statistic = "g"
    _blowup_advice = "a smaller lr or stabilizer_threshold"

    def __init__(self, model: nn.Module, lr: float = 1e-3, base: BaseOptimizer = "lamb", inv_freq: int = 10,
                 stat_decay: float = 0.95, stabilizer_threshold: float = 10.0, stabilizer_blend: float = 0.9,
                 factor_dtype: torch.dtype = torch.float32, skip_layers: Iterable[str | type] = (), *,
                 loss_average: LossAverage = "batch", grad_scaler: torch.amp.GradScaler | None = None,
                 graft: str = "none", graft_betas: tuple[float, float] = GRAFT_BETAS, graft_eps: float = GRAFT_EPS,
                 **base_kwargs):
        check_nonnegative("lr", lr)
        check_graft_group(graft_defaults(graft, graft_betas, graft_eps))
        weight_decay = _check_base(base, base_kwargs)
        preconditioner = MKORPreconditioner(model, inv_freq, stat_decay, stabilizer_threshold, stabilizer_blend,
                                            factor_dtype, skip_layers, loss_average=loss_average,
                                            grad_scaler=grad_scaler)
        self._grad_scaler = grad_scaler
        self._compose(preconditioner, dict(lr=lr, weight_decay=weight_decay,
                                           **graft_defaults(graft, graft_betas, graft_eps)),
                      base, **{k: v for k, v in base_kwargs.items() if k != "weight_decay"})

    def _check_group(self, group: dict) -> None:
        self._check_lr(group)
        check_nonnegative("weight_decay", group["weight_decay"])
        check_graft_group(group)

    def _snapshot(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of the preconditioner's inverse factors, scales and event counts on a factor-update step."""
        pre = self.preconditioner
        state = [f for i in pre._held for f in (pre._layers[i].JL, pre._layers[i].JR)] + [pre._scales, pre._events] \
            if pre._held and pre.steps % pre.inv_freq == 0 else []
        return state, [t.clone() for t in state]

    def _keep_or_restore(self, ok: torch.Tensor, snapshot: tuple[list[torch.Tensor], list[torch.Tensor]]) -> None:
        for t, old in zip(*snapshot):
            t.copy_(torch.where(ok, t, old))

    # -- the preconditioner's, for convenience -----------------------------------------------------

    def inverse_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.preconditioner.inverse_factors(name)

    @property
    def factor_events(self) -> torch.Tensor:
        return self.preconditioner.factor_events

    @property
    def last_ratios(self) -> torch.Tensor | None:
        return self.preconditioner.last_ratios


class MKORH(MKOR):
    r"""MKOR-H: MKOR that hands over to its base optimizer when second-order steps stop paying.

    The switch criterion (deterministic; on the observed training loss, identical on every rank):

    * Losses are observed once per step: the value returned by ``step(closure)``, or passed to
      :meth:`observe` (call it every step when not using a closure; without observations it never
      switches). They are summed on the device; every ``switch_window`` observations the window's
      mean loss is formed (averaged over the ranks when distributed: one host synchronisation per
      window). Windows with a non-finite mean are ignored.
    * The decrease rate of window j is ``rate_j = (mean_{j-1} - mean_j) / |mean_{j-1}|`` (relative
      decrease per window); ``best`` is the largest rate seen so far.
    * MKOR-H switches when, for ``switch_patience`` consecutive windows, ``best > 0`` and
      ``rate_j < switch_fraction * best``: the loss curve has flattened to a small fraction of its
      steepest descent. While the rate holds up (or grows) it does not switch.

    On switching (also by hand: :meth:`switch`) the capture hooks are removed, the factors and their
    scales are freed, and later steps are the base optimizer's steps on raw gradients, continuing its
    state (moments, step counts) without a break. The step is logged (``logging``, logger
    ``kfopt.mkor``) and kept in ``switched_at`` (the number of completed steps when it switched;
    saved in ``state_dict()``, and a loaded switched state switches at once).

    Args: as :class:`MKOR`, plus ``switch_window`` (observations per window, >= 1),
    ``switch_fraction`` (in (0, 1)) and ``switch_patience`` (windows, >= 1).
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, base: BaseOptimizer = "lamb", inv_freq: int = 10,
                 stat_decay: float = 0.95, stabilizer_threshold: float = 10.0, stabilizer_blend: float = 0.9,
                 factor_dtype: torch.dtype = torch.float32, skip_layers: Iterable[str | type] = (), *,
                 switch_window: int = 50, switch_fraction: float = 0.1, switch_patience: int = 2,
                 loss_average: LossAverage = "batch", grad_scaler: torch.amp.GradScaler | None = None,
                 graft: str = "none", graft_betas: tuple[float, float] = GRAFT_BETAS, graft_eps: float = GRAFT_EPS,
                 **base_kwargs):
        for name, value in (("switch_window", switch_window), ("switch_patience", switch_patience)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        check_positive("switch_fraction", switch_fraction)
        if switch_fraction >= 1:
            raise ValueError(f"switch_fraction: expected a number in (0, 1), got {switch_fraction!r}")
        super().__init__(model, lr, base, inv_freq, stat_decay, stabilizer_threshold, stabilizer_blend,
                         factor_dtype, skip_layers, loss_average=loss_average, grad_scaler=grad_scaler,
                         graft=graft, graft_betas=graft_betas, graft_eps=graft_eps, **base_kwargs)
        self.switch_window, self.switch_fraction, self.switch_patience = switch_window, switch_fraction, switch_patience
        self.switched_at: int | None = None
        self.window_means: list[float] = []
        self._best_rate = -math.inf
        self._flat_windows = 0
        self._window_sum: torch.Tensor | None = None
        self._window_count = 0

    @property
    def switched(self) -> bool:
        """Whether MKOR-H runs its base optimizer alone now."""
        return self.switched_at is not None

    def observe(self, loss: torch.Tensor | float) -> None:
        """Record this step's training loss (a 0-d tensor, read without a host synchronisation except
        at the end of a window, or a number) for the switch criterion (class docstring)."""
        if self.switched:
            return
        value = loss.detach().reshape(()).to(torch.float64) if isinstance(loss, torch.Tensor) else \
            torch.tensor(float(loss), dtype=torch.float64)
        self._window_sum = value if self._window_sum is None else self._window_sum + value.to(self._window_sum.device)
        self._window_count += 1
        if self._window_count < self.switch_window:
            return
        total = self._window_sum.reshape(1)
        self.preconditioner.distributor.average([total]).wait()
        mean = total.item() / self._window_count
        self._window_sum, self._window_count = None, 0
        if not math.isfinite(mean):
            return
        self.window_means.append(mean)
        if len(self.window_means) < 2:
            return
        previous = self.window_means[-2]
        rate = (previous - mean) / abs(previous) if previous != 0 else 0.0
        self._best_rate = max(self._best_rate, rate)
        flat = self._best_rate > 0 and rate < self.switch_fraction * self._best_rate
        self._flat_windows = self._flat_windows + 1 if flat else 0
        if self._flat_windows >= self.switch_patience:
            self.switch()

    def switch(self) -> None:
        """Hand over to the base optimizer now (class docstring); no-op when already switched."""
        if self.switched:
            return
        self.preconditioner.free()
        self.switched_at = self.steps
        logger.info("MKOR-H switched to its base optimizer (%s) after %d steps", type(self.base).__name__,
                    self.steps)

    def step(self, closure=None):
        """As :meth:`MKOR.step` (after the switch: the base optimizer's step); a closure's loss is observed."""
        loss = super().step(closure)
        if loss is not None:
            self.observe(loss)
        return loss

    def _own_state(self) -> dict:
        return {**super()._own_state(), **self._switch_state()}

    def _switch_state(self) -> dict:
        """The switch criterion's state (``_SWITCH_KEYS``), saved beside the preconditioner's."""
        window_sum = self._window_sum if self._window_sum is not None else torch.zeros((), dtype=torch.float64)
        return dict(switched_at=self.switched_at, window_means=list(self.window_means), best_rate=self._best_rate,
                    flat_windows=self._flat_windows, window_sum=window_sum.detach().clone(),
                    window_count=self._window_count)

    _loads_checkpoints_of = ("MKOR",)
    _SWITCH_KEYS = ("switched_at", "window_means", "best_rate", "flat_windows", "window_sum", "window_count")

    def _check_own_state(self, saved: dict, distributed: bool = False) -> None:
        """As MKOR's, plus the switch criterion's state (MKOR-H checkpoints); a switched state holds no
        factors. ``distributed``: of a ``distributed_state_dict()`` (the factors of the layers this rank
        holds)."""
        check_state_keys(saved, ("steps", "factors"), "optimizer")
        switched_at = saved.get("switched_at")
        if switched_at is not None:
            check_int("state_dict: mkor switched_at", switched_at)
        if self.switched and switched_at is None:
            raise ValueError("state_dict: MKOR-H has switched to its base optimizer and freed its factors; it "
                             "cannot load a state that has not switched (build a new MKORH)")
        pre = self.preconditioner
        pre.check_state_dict(saved, [] if switched_at is not None else
                             [pre._layers[i] for i in pre._held] if distributed else None)
        if not any(key in saved for key in self._SWITCH_KEYS):
            return
        check_keys(saved, self._SWITCH_KEYS, "state_dict['mkor']")
        if not isinstance(saved["window_means"], (list, tuple)) or not all(
                isinstance(v, (int, float)) for v in saved["window_means"]):
            raise ValueError(f"state_dict: mkor window_means: expected a list of numbers, got {saved['window_means']!r}")
        if isinstance(saved["best_rate"], bool) or not isinstance(saved["best_rate"], (int, float)):
            raise ValueError(f"state_dict: mkor best_rate: expected a number, got {saved['best_rate']!r}")
        check_int("state_dict: mkor flat_windows", saved["flat_windows"])
        check_int("state_dict: mkor window_count", saved["window_count"])
        check_tensor("state_dict: mkor window_sum", saved["window_sum"], (), torch.float64)

    def check_state_dict(self, state_dict: dict) -> None:
        if isinstance(state_dict, dict) and state_dict.get(KIND_KEY) == "MKORH":
            check_keys(state_dict.get("mkor"), self._SWITCH_KEYS, "state_dict['mkor']")
        super().check_state_dict(state_dict)

    def load_state_dict(self, state_dict: dict) -> None:
        """As :meth:`MKOR.load_state_dict`, with the switch criterion's state (an MKOR state starts it
        afresh); a switched state switches this optimizer (one that has switched cannot load a state
        that has not). Everything is checked before anything changes."""
        if not isinstance(state_dict, dict) or self.state_key not in state_dict:  # DCP's base part, or refused
            super().load_state_dict(state_dict)
            return
        self.check_state_dict(state_dict)
        mkor = {"switched_at": None, "window_means": [], "best_rate": -math.inf, "flat_windows": 0,
                "window_sum": torch.zeros((), dtype=torch.float64), "window_count": 0, **state_dict["mkor"]}
        if mkor["switched_at"] is not None:
            self.preconditioner.free()
        super().load_state_dict(state_dict)
        self._load_switch_state(mkor)

    def distributed_state_dict(self) -> dict:
        """As :meth:`MKOR.distributed_state_dict`, with the switch criterion's state under ``"mkor"``. A
        switched MKOR-H's holds no factors: load it into an MKORH that has switched too (``switch()``
        before taking the template; ``dcp.load`` names the factors it misses otherwise)."""
        state = super().distributed_state_dict()
        state[self.state_key].update(self._switch_state())
        return state

    def load_distributed_state_dict(self, state_dict: dict) -> None:
        """As :meth:`MKOR.load_distributed_state_dict`, with the switch criterion's state (checked first, as
        :meth:`load_state_dict` checks it)."""
        check_keys(state_dict, (self.state_key,), "state_dict")
        mkor = state_dict[self.state_key]
        check_keys(mkor, self._SWITCH_KEYS, "state_dict['mkor']")
        self._check_own_state(mkor, distributed=True)
        if mkor["switched_at"] is not None:
            self.preconditioner.free()
        super().load_distributed_state_dict(state_dict)
        self._load_switch_state(mkor)

    def _load_switch_state(self, mkor: dict) -> None:
        self.switched_at = mkor["switched_at"]
        self.window_means = list(mkor["window_means"])
        self._best_rate, self._flat_windows = float(mkor["best_rate"]), int(mkor["flat_windows"])
        self._window_count = int(mkor["window_count"])
        self._window_sum = mkor["window_sum"].detach().clone() if self._window_count else None
