r"""``kfopt.SINGD``: structured inverse-free natural gradient descent (Lin, Dangel, Eschenhagen et al., ICML
2024), with the arguments, defaults (all but ``normalize_lr_cov``, below) and update of the reference package
``singd`` (0.0.5), on kfopt's layer capture and structured kernels. The math is in ``docs/singd.md``.

Two objects
===========
:class:`SINGDPreconditioner` holds the capture, the factors and momenta and computes the statistics,
the factor update and the natural gradient (``kfopt.preconditioner.Preconditioner``: alone, in front of
any optimizer, ``precond.step()`` writes ``N`` into ``.grad``). :class:`SINGD` is a
``kfopt.composed.ComposedOptimizer``: one preconditioner over its param groups in front of a base
optimizer built from the same group dicts (below, Base optimizer).

Defaults
========
``normalize_lr_cov=True`` (``singd``: False). With the reference's defaults the factor step
``lr_cov * K m_K`` scales with ``avgtr(H_C) H_K``, i.e. with the square of the inputs' and output
gradients' scale: on a least-squares problem whose inputs have a Hessian of condition number 1e4
(largest eigenvalue ~1e4) the factor updates overflow within the first steps and, unchecked, turn the
weights into NaN (kfopt skips those updates instead: below). Normalized factor steps
(``lr_cov / max(1, max|m|)``) do not grow with that scale and train the same problem below 1e-4 of its
starting loss in 200 steps with every other default unchanged (``tests/test_singd.py``); where
``max|m| <= 1`` they only halve the step (``(1 - alpha1) / 2`` with ``alpha1 = 0.5``). ``max|m|`` is the
largest entry, not the spectral norm: with aggressive ``T``, ``lr_cov`` and ``damping`` a factor can
still run away (``docs/singd.md``, Numerics). Pass ``normalize_lr_cov=False`` for the reference's
behaviour.

Per preconditioned layer (``nn.Linear``, ``nn.Conv2d`` with groups=1; ``G = [dW | db]``, d_out x d_K)
======================================================================================================
Factors ``K`` (d_K x d_K, d_K = d_in [+ 1 with a bias]) and ``C`` (d_out x d_out) in the group's
``structures`` (``kfopt.structures``), stored in ``preconditioner_dtype`` (None: the weight's dtype);
``K = C = I`` at the start; momenta ``m_K = m_C = 0`` (kept only while ``alpha1 != 0``).

Statistics (captured in the forward/backward of steps with ``steps % T == 0``), summed over the
layer's captured calls ``c`` (several calls per forward, micro-batches)::

    H_K = sum_c Proj(K^T a_c^T a_c K) / R_c        a_c: the call's input rows [| 1 with a bias], R_c rows
    H_C = sum_c n_c Proj(C^T g_c^T g_c C)          g_c: output gradients of the backpropagated loss,
                                                   n_c: its number of loss terms (loss_average)

Rows are those of ``kfopt.capture`` (Conv2d: unfolded patches). ``kfac_approx="expand"`` uses every row
(batch x positions); ``"reduce"`` first averages ``a`` and sums ``g`` over a call's positions (sequence
positions of a Linear call, output pixels of a Conv2d call), leaving one row per example. ``n_c``:
1 (``loss_average=None``, a summed loss), the batch size (``"batch"``), batch x positions
(``"batch+sequence"``). ``Proj`` is the structure's projection (``kfopt.structures``).

Update (at those steps, before the natural gradient), with ``avgtr(M) = tr(M) / side``,
``s = 1/2`` (``(1 - alpha1) / 2`` with ``normalize_lr_cov``), ``u`` the grad-scale correction (below)::

    m_K <- alpha1 m_K + s [ u avgtr(H_C) H_K + damping avgtr(Proj(C^T C)) Proj(K^T K) - I ]
    m_C <- alpha1 m_C + s [ u avgtr(H_K) H_C + damping avgtr(Proj(K^T K)) Proj(C^T C) - I ]
    K <- K - b_K K m_K,     C <- C - b_C C m_C

``b = lr_cov`` (a float, or ``lr_cov(steps)`` for a callable), divided by ``max(1, max|m|)`` with
``normalize_lr_cov``. ``kfac_like=True`` (IKFAC) drops the trace couplings (``H_K`` and ``u H_C``, damping
times the plain ``Proj(K^T K)``/``Proj(C^T C)``) and forces ``alpha1 = 0`` (with a warning, as the
reference). The statistics are computed with the factors of the step they were captured in, in fp32
(float64 for a float64 model) whatever the factors' storage dtype; momenta and factors are updated in
fp32 and rounded to their storage dtype. A layer with no captured statistics at a due step (it was
not called) keeps its factors and momenta.

Parameter update (every step; the default base, ``kfopt.heavy_ball.HeavyBall``)::

    N = C C^T G K K^T                      (structured products, fp32 accumulation, fp32 result)
    d = N + weight_decay * w,   buf <- momentum * buf + d   (buf exists only while momentum != 0),
    w <- w - lr * (buf or d)

Parameters outside preconditioned layers -- parameters of other modules (embeddings, norms), of layers
in ``skip_layers``, of layers whose weight is not in ``params``, of grouped or depthwise Conv2d layers and
of ``nn.MultiheadAttention`` (its ``out_proj`` included) -- get the same rule with ``N = g``, their
raw gradient: SGD with heavy-ball momentum (as if ``K = C = I``), with their group's lr, momentum and
weight decay. (The reference leaves them untrained.) ``params=None`` trains every parameter of the model
that requires grad; a layer's weight and bias must be in the same param group. Momentum buffers are fp32
(float64 for float64 parameters); parameters are updated in fp32 and rounded to their dtype.

Base optimizer
==============
``base="heavy_ball"`` (the default) is the parameter update above: ``kfopt.heavy_ball.HeavyBall``,
stepped with the fp32 natural gradients (not their rounding to a 16-bit ``.grad``) and with the step's
verdict (below, Non-finite gradients) on the device. ``base="sgd"``, ``"adamw"``, ``"lamb"`` or a callable
``base(param_groups)`` (``kfopt.composed``) take ``N`` in ``.grad`` (rounded to the gradient's dtype) and
their own hyperparameters from the param groups (``lr``, ``momentum``, ``weight_decay``, and their own
defaults). They cannot take the verdict on the device: SINGD reads it on the host (one synchronisation
per step) and does not step them where it is False, so a skipped step still changes nothing (a base's
own skips, e.g. LAMB's, count in ``skipped_steps`` too). With such a base the factors and momenta live in
a dict of SINGD's own (AdamW and LAMB create their state where a parameter's is empty), with the default
one in the weight's per-parameter state beside ``momentum_buffer``; checkpoints hold them in the
weight's state either way (Checkpoints).

Grafting (``graft="adam"``, ``"rmsprop"``, ``"sgd"``; ``kfopt.graft`` through ``ComposedOptimizer``'s
grafted step; the base optimizer does not step): the parameter update above is replaced by, per
preconditioned weight and bias (``N`` its part of the natural gradient -- for "adam" of Adam's new first
moment in place of the gradient ``G``, ``kfopt.graft`` says why --, ``a`` the AdamW direction from the
raw gradient's moments with ``graft_betas``, ``graft_eps``)::

    buf <- momentum buf + N ;   w <- w - lr ((||a|| / ||buf||) buf + weight_decay w)

(``buf = N`` with ``momentum=0``), and by AdamW's update ``w <- w - lr (a + weight_decay w)`` for the
other parameters: weight decay is decoupled, and AdamW's ``lr``, schedule and ``weight_decay`` carry
over. The graft's state (fp32 moments, step, ``graft_momentum_buffer``) replaces ``momentum_buffer``.

Param groups carry every hyperparameter above (per group, so LR schedulers and per-group structures
work). ``lr`` may be a one-element floating tensor (as some schedulers and ``torch.compile`` users set
it; ``device_lr``), with or without grafting: its form is checked at every step on the host, its value
on the device, without a host synchronisation: a step with a NaN, infinite or negative tensor lr is
skipped and counted like a step with a non-finite gradient (below). Without grafting the parameter
update is then ``w - (lr * d)`` instead of ``w + (-lr) * d``, equal to the float lr's within rounding;
the grafting kernel reads it from its device table. ``structures`` and
``preconditioner_dtype`` are read when the factors are built (construction); changing them in a group
afterwards has no effect. Layers are selected at construction: parameters added later with
``add_param_group`` get the first-order rule.

AMP
===
``torch.autocast``: inputs and output gradients arrive in the autocast dtype; the kernels accumulate in
fp32. ``torch.amp.GradScaler``: ``scaler.step(opt)`` calls ``step()`` with ``found_inf`` and ``grad_scale``
(``_step_supports_amp_scaling``). If the scaler found inf/NaN gradients the step is skipped: parameters,
factors, momenta and buffers unchanged, the captured statistics dropped, ``skipped_steps`` incremented,
``steps`` incremented (as the reference). Reading ``found_inf`` synchronises with the host, as
``GradScaler.step`` does for every torch optimizer (the entry shared by the kfopt optimizers,
``KfoptOptimizer._grad_scaler_skips_step``). Otherwise gradients are divided by ``grad_scale`` in
place. With ``grad_scaler=scaler`` at construction the capture unscales each output gradient exactly
when it arrives (fp32) and ``u = 1``. Without it SINGD still trains correctly: the statistics of the
first ``scaler.step`` were captured with the full scale (``u = 1 / grad_scale^2``: H_C scales with the
square of the gradients); from then on the capture divides each output gradient (fp32) by the scale
of the previous ``scaler.step``, kept on the device, and ``u = (previous / grad_scale)^2`` (a power of
two, usually 1: the scaler changes its scale rarely). So the statistics never carry the square of a
large scale -- which overflows fp32 once the scaler has grown its scale past ~2^64 (it grows forever
while gradients stay finite, e.g. fp32 weights under bf16 autocast), and every step would then be
skipped for non-finite statistics while the scaler, seeing finite gradients, never backs off. Only
the first step's statistics can overflow (an absurd initial scale): that one step is skipped.
Calling ``scaler.unscale_(opt)`` before ``scaler.step`` (to clip gradients) requires
``grad_scaler=scaler`` (otherwise the statistics' scale is unknown: RuntimeError).
The reference's ``init_grad_scale`` (an approximation of that unknown scale) is therefore not needed.

Non-finite gradients, statistics and updates
============================================
With or without a GradScaler, a step whose gradients (any parameter's) or due statistics (``H_K``,
``H_C`` after the rank average) hold NaN/inf is skipped on the device, without a host sync (as
``kfopt.LAMB``, ``LARS`` and ``SONew`` skip one): parameters, momentum buffers, factors and momenta keep
their values bit for bit, ``skipped_steps`` is incremented, the statistics are dropped and ``steps`` is
incremented (as for a GradScaler skip). The update is computed and committed with ``torch.where`` on a device flag; the
only state a skipped step can add is a momentum buffer or factor momentum first needed in it, created
as zeros (the value it stands for while absent).

The same holds when the inputs are finite but SINGD's own update is not (a factor step too large for the
problem's scale overflows the new factors, their momenta, or the natural gradient computed with them):
the new factors, momenta and the natural gradient are formed first, checked on the device, and
committed only when all are finite -- factors keep their last finite values, weights never receive a
non-finite value. Such a step counts in ``skipped_steps`` and in ``blown_up_steps`` (checkpointed);
reading ``skipped_steps`` warns once (``RuntimeWarning`` naming the count; ``kfopt.optimizer``: the
warning reads the count, a host synchronisation that ``step()`` never makes). The two checks make one
0-d device bool, the step's verdict (``SINGD._second_order_step``; agreed over the ranks), which the
default base takes on the device (``HeavyBall.step(verdict=...)``; other bases: Base optimizer). With
grafting the graft kernel takes it as its ``found_inf`` and adds its own parameter-side check
(``kfopt.kernels.graft``); the new factors and momenta commit only where it took the step.

Distributed
===========
Wrap the model in ``DistributedDataParallel`` (gradients averaged by DDP; every exchange goes through
the preconditioner's ``distributor``, ``kfopt.distribution.Replicated``). At a due step each rank's
``H_K`` and ``H_C`` are averaged over the ranks in structured form (their free parameters, one bucketed
all-reduce); with ``loss_average=None`` ``H_C`` is summed instead (a summed loss's per-term gradients are
the same on every world size). With a mean loss, a layer's rows divided by the local rows and output
gradients scaled by the local ``n_c``, the rank average equals the single-process statistic of the
global batch (for equal local batches), so parameters are the same on every rank and equal to the
global-batch run. Every rank must capture every due layer (as DDP requires); a layer missing on a rank
contributes zeros there. The step runs under ``kfopt.autotune.agree_on_configs()`` (every rank launches
the same kernels), so tuned kernel configs, and with them the replicas' bits, agree across ranks.

FSDP2 and HSDP (``fully_shard`` models whose Linear/Conv2d weights and biases are row shards; the
distributor is ``kfopt.sharded_distribution.Sharded``, docs/sharding.md): the statistics are averaged
over every rank as above and every rank keeps and updates all factors and momenta (its statistics need
them); each layer's ``N`` is computed by its owner rank from the whole ``G`` gathered from the row
shards (under the owner's own kernel configs, or its HSDP replicas'), each rank receives its rows of
``N`` and updates its shards; whether the step is finite is agreed over every rank (one all-reduce of
each verdict), so a NaN in one rank's shard skips the step on every rank. Grafted, the graft's state is
laid out like the parameters and its norms and verdict are summed over the shard group
(``kfopt.composed``).

Checkpoints
===========
``state_dict()`` holds plain tensors and numbers (``torch.load(weights_only=True)`` works): the param
groups (a callable ``lr_cov`` is saved as None and ``load_state_dict`` keeps the optimizer's own), per
parameter ``momentum_buffer``, and in each preconditioned layer's weight state its factors and momenta
by free-parameter tensor (``"K.<name>"``, ``"C.<name>"``, ``"m_K.<name>"``, ``"m_C.<name>"``, see
``kfopt.structures``; with the default base they are its per-parameter state, with another base the
base's per-parameter state takes ``momentum_buffer``'s place), plus ``"steps"``, ``"skipped_steps"``
(SINGD's own skips), ``"blown_up_steps"`` (a checkpoint without it loads as 0), with a base other than the
default ``"base_optimizer"`` (its class name: a checkpoint loads only into a SINGD with the same base;
without it, the default's: SINGD's checkpoints from before ``base`` have the default's format) and for a
kfopt base ``"base_skipped_steps"`` (its own skip count), and ``"last_grad_scale"`` (the scale of the
last ``scaler.step`` that the capture divides output gradients by, without ``grad_scaler=``: a 0-d fp32
tensor, or None before the first scaler step and with ``grad_scaler=``, whose optimizer ignores it), so a
checkpoint taken under a GradScaler continues bit-identically. Checkpoints of earlier versions (no
``"last_grad_scale"``) are rejected. Loading requires the same structures and
preconditioner dtypes per group. Statistics captured but not yet consumed by a step are not saved:
checkpoint between steps. ``distributed_state_dict()`` (``torch.distributed.checkpoint``) is
``ComposedOptimizer``'s: the base's per-parameter state by parameter name, ``"singd"``: the
preconditioner's ``distributed_state_dict()`` (``steps`` and every layer's factors and momenta, the plain
tensors every rank holds), the counts, and ``"last_grad_scale"`` (0 for None).
"""

from __future__ import annotations

import numbers
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch import nn

from kfopt.kernels.dispatch import KERNEL_DTYPES, use_triton
from kfopt.kernels.structured import result_dtype

from . import collectives  # noqa: F401  (kfopt.singd.collectives: what the distributor calls; tests spy on it)
from .capture import CallInfo, CapturedLayer, LayerCapture, loss_term_count
from .composed import BaseOptimizer, ComposedOptimizer, _base_part, check_base
from .distribution import Replicated
from .graft import GRAFT_BETAS, GRAFT_EPS, check_graft_group, graft_defaults
from .heavy_ball import HeavyBall
from .layer_state import LayerState
from .optimizer import KfoptOptimizer
from .preconditioner import PreconditionerAttributes
from .sharded_distribution import Sharded, is_sharded
from .sharding import local
from .structures import Structure, StructureSpec, parse_structure
from .validation import (
    KIND_KEY,
    check_bool,
    check_counter,
    check_keys,
    check_nonnegative,
    check_tensor,
    check_unit_interval,
)

_LOSS_AVERAGES = (None, "batch", "batch+sequence")
_FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _Layer(LayerState):
    """A preconditioned layer: its capture entry, param group, factors, momenta and pending statistics."""

    def __init__(self, captured: CapturedLayer, group: int):
        super().__init__(captured)
        self.group = group
        self.K: Structure | None = None
        self.C: Structure | None = None
        self.m_K: Structure | None = None
        self.m_C: Structure | None = None
        self.H_K: Structure | None = None
        self.H_C: Structure | None = None

    @property
    def sides(self) -> tuple[int, int]:
        """(d_K, d_C)."""
        return self.captured.in_features + self.captured.has_bias, self.captured.out_features

    def clear_statistics(self) -> None:
        self.H_K = self.H_C = None


#: factor updates awaiting their commit: (tensors of the factor or momentum, their new values) pairs
_Commits = list[tuple[list[torch.Tensor], list[torch.Tensor]]]


def _commit(finite: torch.Tensor, targets: list[torch.Tensor], new: list[torch.Tensor]) -> None:
    """``targets <- new`` (rounded to the targets' dtypes) where the 0-d ``finite`` is True; unchanged
    otherwise, bit for bit: a skipped step decided on the device."""
    for t, n in zip(targets, new):
        t.copy_(torch.where(finite, n, t))


def _is_factor_key(key: str) -> bool:
    """Whether a per-parameter state key is a factor's or factor momentum's (``"K.<name>"``, ``"m_C.<name>"``)."""
    return "." in key


def statistics(layers: list[_Layer]) -> list[torch.Tensor]:
    """The pending ``H_K`` and ``H_C`` tensors of ``layers``."""
    return [t for layer in layers for t in layer.H_K.tensors + layer.H_C.tensors]


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def _structure_specs(structures) -> tuple[StructureSpec, StructureSpec]:
    if not isinstance(structures, (tuple, list)) or len(structures) != 2:
        raise ValueError(f"structures: expected a pair of structure names (for K and C), got {structures!r}")
    try:
        return parse_structure(structures[0]), parse_structure(structures[1])
    except ValueError as exc:
        raise ValueError(f"structures: {exc}") from None


def _check_factor_group(group: dict, stacklevel: int = 3) -> None:
    """ValueError naming the first bad hyperparameter of the factors in ``group`` (damping, alpha1, T,
    loss_average, lr_cov, structures, kfac_approx, kfac_like, normalize_lr_cov, preconditioner_dtype);
    normalises ``structures`` and ``preconditioner_dtype`` to tuples, and ``kfac_like`` forces
    ``alpha1 = 0`` (with a warning ``stacklevel`` frames up)."""
    check_nonnegative("damping", group["damping"])
    check_unit_interval("alpha1", group["alpha1"])
    _check_int("T", group["T"], 1)
    if group["loss_average"] not in _LOSS_AVERAGES:
        raise ValueError(f"loss_average: expected None, 'batch' or 'batch+sequence', got {group['loss_average']!r}")
    if not callable(group["lr_cov"]):
        check_nonnegative("lr_cov", group["lr_cov"])
    _structure_specs(group["structures"])
    group["structures"] = tuple(group["structures"])
    if group["kfac_approx"] not in ("expand", "reduce"):
        raise ValueError(f"kfac_approx: expected 'expand' or 'reduce', got {group['kfac_approx']!r}")
    check_bool("kfac_like", group["kfac_like"])
    check_bool("normalize_lr_cov", group["normalize_lr_cov"])
    dtypes = group["preconditioner_dtype"]
    if (not isinstance(dtypes, (tuple, list)) or len(dtypes) != 2
            or any(d is not None and d not in _FACTOR_DTYPES for d in dtypes)):
        raise ValueError("preconditioner_dtype: expected a pair of None or floating dtypes (float16, bfloat16, "
                         f"float32, float64) for (K, C), got {dtypes!r}")
    group["preconditioner_dtype"] = tuple(dtypes)
    if group["kfac_like"] and group["alpha1"] != 0:
        warnings.warn(f"kfac_like=True ignores alpha1={group['alpha1']}: setting alpha1=0 in its param group",
                      stacklevel=stacklevel)
        group["alpha1"] = 0.0


class SINGDPreconditioner:
    """SINGD's structured Kronecker factors and natural gradient (module docstring: Statistics, Update,
    ``N = C C^T G K K^T``) for a model's Linear/Conv2d layers; ``kfopt.preconditioner.Preconditioner``.

    Alone, in front of any optimizer (``precond.step(); optimizer.step()``), with one set of the
    hyperparameters below: ``step()`` updates the factors of a due step and replaces each layer's
    ``.grad`` by its ``N``; where anything of the step is not finite (a gradient, a statistic, a new
    factor or momentum, ``N``) it changes nothing (factors and raw gradients kept). With
    ``torch.optim.SGD(momentum=m, weight_decay=wd)`` behind it, that is :class:`SINGD`'s update (within
    rounding). :class:`SINGD` builds one over its own param groups (``_over``: each layer's
    hyperparameters are its weight's group's, its factors and momenta live where SINGD keeps them) and
    steps it with its own pieces (``updated_layers``, ``propose``), committing what they propose.

    Args: ``model`` (or a ``DistributedDataParallel`` wrapping it), ``damping``, ``alpha1``, ``T``,
    ``loss_average``, ``lr_cov``, ``structures``, ``kfac_approx``, ``kfac_like``,
    ``preconditioner_dtype``, ``normalize_lr_cov``, ``skip_layers``, ``grad_scaler``: as :class:`SINGD`'s.
    The layers whose weight requires grad are preconditioned.
    """

    def __init__(self, model: nn.Module, damping: float = 1e-3, alpha1: float = 0.5, T: int = 10,
                 loss_average: str | None = "batch", lr_cov: float | Callable[[int], float] = 1e-2,
                 structures: tuple[str, str] = ("dense", "dense"), kfac_approx: str = "expand",
                 kfac_like: bool = False, preconditioner_dtype: tuple = (None, None), normalize_lr_cov: bool = True,
                 skip_layers: Iterable[str | type] = (), *, grad_scaler: torch.amp.GradScaler | None = None):
        group = dict(damping=damping, alpha1=alpha1, T=T, loss_average=loss_average, lr_cov=lr_cov,
                     structures=structures, kfac_approx=kfac_approx, kfac_like=kfac_like,
                     preconditioner_dtype=preconditioner_dtype, normalize_lr_cov=normalize_lr_cov)
        _check_factor_group(group)
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        group["params"] = [p for p in inner.parameters() if p.requires_grad]
        state: dict[torch.Tensor, dict] = {}
        self._attach(model, lambda: [group], lambda p: state.setdefault(p, {}), tuple(skip_layers), grad_scaler)

    @classmethod
    def _over(cls, model: nn.Module, groups: Callable[[], list[dict]], state_of: Callable[[torch.Tensor], dict],
              skip_layers: tuple, grad_scaler: torch.amp.GradScaler | None) -> "SINGDPreconditioner":
        """A preconditioner whose hyperparameters are those of the param group of each layer's weight in
        ``groups()`` and whose factors and momenta live in ``state_of(weight)`` (:class:`SINGD`'s)."""
        preconditioner = cls.__new__(cls)
        preconditioner._attach(model, groups, state_of, skip_layers, grad_scaler)
        return preconditioner

    def _attach(self, model: nn.Module, groups: Callable[[], list[dict]], state_of: Callable[[torch.Tensor], dict],
                skip_layers: tuple, grad_scaler: torch.amp.GradScaler | None) -> None:
        self._groups, self._state_of = groups, state_of
        self.steps = 0
        self.capture = self._build_capture(model, skip_layers)
        try:  # a constructor that raises leaves the model without hooks
            self.capture.set_grad_scale(grad_scaler)
            layers = list(self.capture.layers.values())
            self.distributor = Sharded(layers) if is_sharded(layers) else Replicated()
            group_of = {id(p): i for i, group in enumerate(groups()) for p in group["params"]}
            self._layers = [_Layer(captured, group_of[id(captured.module.weight)])
                            for captured in self.capture.layers.values()]
            self._by_name = {layer.name: layer for layer in self._layers}
            for layer in self._layers:
                self._init_factors(layer)
        except BaseException:
            self.capture.remove()
            raise
        self._arm()

    def _group(self, layer: _Layer) -> dict:
        """The hyperparameters of ``layer`` (its weight's param group)."""
        return self._groups()[layer.group]

    def preconditioned_params(self) -> list[torch.Tensor]:
        """The weights and biases whose gradients ``step()`` replaces."""
        return [p for layer in self._layers for p in (layer.weight, layer.bias) if p is not None]

    @torch.no_grad()
    def step(self) -> torch.Tensor | None:
        """The preconditioner alone (class docstring): factor update of the due layers, ``N`` into
        ``.grad``, both only where everything is finite (decided on the device). Every rank must call it.
        Returns that verdict, a 0-d device bool agreed over the ranks (None: no gradient, no statistic)."""
        updated = self.updated_layers()
        active = [layer for layer in self._layers if layer.weight.grad is not None]
        grads = [local(p.grad) for layer in active for p in (layer.weight, layer.bias)
                 if p is not None and p.grad is not None]
        inputs = grads + statistics(updated)
        finite = None
        if inputs:
            with self.distributor.agreement():  # every rank updates the same factors
                pending, directions = self.propose(updated, 1.0)
                directions = [(p, d) for _, p, d in directions if p.grad is not None]
                targets = [local(p.grad) for p, _ in directions] + [t for old, _ in pending for t in old]
                values = [d for _, d in directions] + [t for _, new in pending for t in new]
                finite = self.distributor.all_finite(
                    torch.stack([torch.isfinite(t).all() for t in inputs + values]).all())
                _commit(finite, targets, values)
        self.finish_step()
        return finite

    def updated_layers(self) -> list[_Layer]:
        """The layers whose factors this step updates: the due ones with statistics, averaged over the
        ranks (every rank must call it)."""
        due = [layer for layer in self._layers if self._due(layer)]
        if due and self.distributor.distributed:
            self.average_statistics(due)
        return [layer for layer in due if layer.H_K is not None and layer.H_C is not None]

    def propose(self, updated: list[_Layer], correction: float | torch.Tensor
                ) -> tuple[_Commits, list[tuple[dict, torch.Tensor, torch.Tensor]]]:
        """The new factors and momenta of the ``updated`` layers (``update_factors``: ``(targets, new values)``
        pairs, consuming their statistics) and the natural gradients computed with them
        (``natural_gradients``), committed by the caller only where the step is finite."""
        pending, new_factors = [], {}
        for layer in updated:
            commits, new_factors[layer.name] = self.update_factors(layer, correction)
            pending += commits
        return pending, self.natural_gradients(new_factors)

    # -- checkpoints of the preconditioner alone ------------------------------------------------

    def state_dict(self) -> dict:
        """``{"steps", "factors": {layer name: {"K.<name>", "C.<name>", "m_K.<name>", "m_C.<name>"}}}``:
        factors and momenta (where present) by free-parameter tensor (``kfopt.structures``)."""
        return {"steps": self.steps,
                "factors": {layer.name: {k: v for k, v in self._state_of(layer.weight).items() if _is_factor_key(k)}
                            for layer in self._layers}}

    def check_state_dict(self, state_dict: dict) -> None:
        """ValueError unless ``state_dict`` fits these layers, structures and dtypes; changes nothing."""
        check_keys(state_dict, ("steps", "factors"), "state_dict")
        steps = state_dict["steps"]
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise ValueError(f"state_dict: expected 'steps' an int >= 0, got {steps!r}")
        saved = state_dict["factors"]
        if not isinstance(saved, dict) or set(saved) != set(self._by_name):
            raise ValueError(f"state_dict has factors for layers {sorted(map(str, saved))}, the preconditioner has "
                             f"layers {sorted(self._by_name)}")
        for layer in self._layers:
            expected = {}
            for key, spec, side, dtype in self._factor_layout(layer, self._group(layer)):
                for name, t in spec.zeros(side, dtype, torch.device("meta")).named_tensors().items():
                    expected[f"{key}.{name}"] = expected[f"m_{key}.{name}"] = (tuple(t.shape), dtype)
            entries = saved[layer.name]
            momenta = [key for key in expected if key.startswith("m_")]
            required = [key for key in expected if not key.startswith("m_")]
            if not isinstance(entries, dict) or set(entries) not in (set(required), set(expected)):
                raise ValueError(f"state_dict: layer {layer.name!r} must hold {required} and all or none of "
                                 f"{momenta}")
            for key, value in entries.items():
                check_tensor(f"state_dict: {key} of layer {layer.name!r}", value, *expected[key])

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a ``state_dict()``, checked first; statistics captured since the last step are dropped."""
        self.check_state_dict(state_dict)
        for layer in self._layers:
            self._load_factors(layer, state_dict["factors"][layer.name])
        self.steps = int(state_dict["steps"])
        self.discard_step()
        self._arm()

    def _load_factors(self, layer: _Layer, saved: dict[str, torch.Tensor]) -> None:
        """The layer's factors and momenta replaced by (copies of) the checked ``saved`` ones."""
        state = self._state_of(layer.weight)
        for key in [key for key in state if _is_factor_key(key)]:
            del state[key]
        for key, value in saved.items():
            if _is_factor_key(key):
                state[key] = value.detach().to(layer.weight.device, copy=True)
        self._bind(layer)

    # -- torch.distributed.checkpoint -------------------------------------------------------------

    def distributed_state_dict(self) -> dict:
        """The state ``torch.distributed.checkpoint`` saves from every rank and loads into, in place: the
        ``state_dict()`` of the live tensors (factors and momenta are replicated on every rank, FSDP2
        included), with zero factor momenta created where ``alpha1 != 0`` and none exists yet (as the
        first factor update creates them), so that a fresh preconditioner holds what a checkpoint fills."""
        for layer in self._layers:
            for key in ("K", "C"):
                if self._group(layer)["alpha1"] != 0 and getattr(layer, f"m_{key}") is None:
                    self._new_momentum(layer, key)
        return self.state_dict()

    def check_distributed_state_dict(self, state_dict: dict) -> None:
        """ValueError unless ``state_dict`` (a :meth:`distributed_state_dict`) fits; changes nothing."""
        self.check_state_dict(state_dict)

    def load_distributed_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`distributed_state_dict` that ``dcp.load`` filled, checked first."""
        self.load_state_dict(state_dict)

    # -- construction ---------------------------------------------------------------------------

    def _build_capture(self, model: nn.Module, skip_layers: tuple) -> LayerCapture:
        """The capture of the layers whose weight is trained here (module docstring)."""
        capture = LayerCapture(model, skip_layers, input_fn=self._input_stat, grad_output_fn=self._grad_output_stat)
        group_of = {id(p): i for i, group in enumerate(self._groups()) for p in group["params"]}
        untrained = []
        for name, layer in capture.layers.items():
            weight, bias = layer.module.weight, layer.module.bias
            if id(weight) not in group_of:
                untrained.append(name)
            elif bias is not None and group_of.get(id(bias)) != group_of[id(weight)]:
                capture.remove()
                raise ValueError(f"layer {name!r}: its weight and bias must be in the same param group (the "
                                 "factor K spans both); add the bias to the weight's group or skip the layer")
        if untrained:
            capture.remove()
            capture = LayerCapture(model, skip_layers + tuple(untrained), input_fn=self._input_stat,
                                   grad_output_fn=self._grad_output_stat)
        return capture

    def _init_factors(self, layer: _Layer) -> None:
        """K = C = I (and zero momenta) in the layer's weight state, then bind the structures."""
        group = self._group(layer)
        state = self._state_of(layer.weight)
        for key, spec, side, dtype in self._factor_layout(layer, group):
            if dtype not in KERNEL_DTYPES and use_triton(layer.weight.device):
                raise ValueError(f"preconditioner_dtype: layer {layer.name!r} would keep {key} in {dtype}, but on "
                                 f"{layer.weight.device} the kernels take float32, bfloat16 or float16 (float64 "
                                 "runs on the PyTorch path only)")
            for name, t in spec.eye(side, dtype, layer.weight.device).named_tensors().items():
                state[f"{key}.{name}"] = t
        self._bind(layer)

    def _factor_layout(self, layer: _Layer, group: dict) -> list[tuple[str, StructureSpec, int, torch.dtype]]:
        specs = _structure_specs(group["structures"])
        dtypes = [d if d is not None else layer.weight.dtype for d in group["preconditioner_dtype"]]
        return [("K", specs[0], layer.sides[0], dtypes[0]), ("C", specs[1], layer.sides[1], dtypes[1])]

    def _bind(self, layer: _Layer) -> None:
        """Structures over the tensors in the weight's state (momenta only where present)."""
        state = self._state_of(layer.weight)
        for key, spec, side, _ in self._factor_layout(layer, self._group(layer)):
            names = spec.cls.names
            setattr(layer, key, spec.from_tensors(side, [state[f"{key}.{n}"] for n in names]))
            momentum_keys = [f"m_{key}.{n}" for n in names]
            setattr(layer, f"m_{key}", spec.from_tensors(side, [state[k] for k in momentum_keys])
                    if all(k in state for k in momentum_keys) else None)

    # -- statistics -----------------------------------------------------------------------------

    def _due(self, layer: _Layer) -> bool:
        return self.steps % self._group(layer)["T"] == 0

    def _arm(self) -> None:
        self.capture.armed = any(self._due(layer) for layer in self._layers)

    def _reduced(self, layer: _Layer, call: CallInfo, rows: torch.Tensor, mean: bool) -> torch.Tensor:
        """``rows`` as the statistic needs them: as they are ("expand"), or one row per example ("reduce":
        the mean (inputs) or sum (output gradients) over the call's positions)."""
        if self._group(layer)["kfac_approx"] == "expand":
            return rows
        per_example = rows.to(torch.promote_types(rows.dtype, torch.float32)).reshape(
            call.batch_size, call.positions, rows.shape[1])
        return per_example.mean(1) if mean else per_example.sum(1)

    def _input_stat(self, captured: CapturedLayer, call: CallInfo, a: torch.Tensor) -> None:
        """Adds ``Proj(K^T a^T a K) / R`` of this call to the layer's pending ``H_K``."""
        layer = self._by_name[captured.name]
        if not self._due(layer) or a.shape[0] == 0:
            return None
        a = self._reduced(layer, call, a, mean=True)
        stat = layer.K.from_inner(a, ones_column=captured.has_bias, scale=1.0 / a.shape[0])
        layer.H_K = stat if layer.H_K is None else layer.H_K.add_(stat)
        return None

    def _grad_output_stat(self, captured: CapturedLayer, call: CallInfo, g: torch.Tensor) -> None:
        """Adds ``n Proj(C^T g^T g C)`` of this call to the layer's pending ``H_C``."""
        layer = self._by_name[captured.name]
        if not self._due(layer) or g.shape[0] == 0:
            return None
        g = self._reduced(layer, call, g, mean=False)
        terms = loss_term_count(call, self._group(layer)["loss_average"])
        stat = layer.C.from_inner(g, scale=float(terms))
        layer.H_C = stat if layer.H_C is None else layer.H_C.add_(stat)
        return None

    def discard_step(self) -> None:
        """Drop the statistics captured since the last step."""
        self.capture.clear()
        for layer in self._layers:
            layer.clear_statistics()

    def average_statistics(self, layers: list[_Layer]) -> None:
        """Average (H_K, H_C) over the ranks in structured form; H_C summed for a summed loss."""
        tensors = []
        for layer in layers:
            d_k, d_c = layer.sides
            device = layer.weight.device
            if layer.H_K is None:
                layer.H_K = layer.K.spec.zeros(d_k, torch.promote_types(layer.K.dtype, torch.float32), device)
            if layer.H_C is None:
                layer.H_C = layer.C.spec.zeros(d_c, torch.promote_types(layer.C.dtype, torch.float32), device)
            tensors += layer.H_K.tensors + layer.H_C.tensors
        self.distributor.average(tensors).wait()
        world = self.distributor.world
        for layer in layers:
            if self._group(layer)["loss_average"] is None:
                layer.H_C.mul_(float(world))

    def finish_step(self) -> None:
        """Drop the statistics, count the step and arm the capture for the next one."""
        self.discard_step()
        self.steps += 1
        self._arm()

    def update_factors(self, layer: _Layer, correction: float | torch.Tensor
                        ) -> tuple[_Commits, tuple[Structure, Structure]]:
        """The momentum and factor updates of the module docstring, in fp32 (float64): ``(targets, new
        values)`` pairs for the caller to commit (only where the step is finite), and the new (K, C)."""
        pending, factors = [], []
        group = self._group(layer)
        damping, alpha1 = group["damping"], group["alpha1"]
        scale = 0.5 * ((1.0 - alpha1) if group["normalize_lr_cov"] else 1.0)
        lr_cov = group["lr_cov"](self.steps) if callable(group["lr_cov"]) else group["lr_cov"]
        h_k, h_c = layer.H_K, layer.H_C
        k_tk, c_tc = layer.K.from_inner(), layer.C.from_inner()
        if group["kfac_like"]:
            coefficients = ((1.0, damping), (correction, damping))
        else:
            coefficients = ((correction * h_c.average_trace(), damping * c_tc.average_trace()),
                            (correction * h_k.average_trace(), damping * k_tk.average_trace()))
        for key, h, inner, (coef_h, coef_inner) in (("K", h_k, k_tk, coefficients[0]),
                                                    ("C", h_c, c_tc, coefficients[1])):
            new_m = h.mul_(coef_h).add_(inner, coef_inner).diag_add_(-1.0).mul_(scale)
            if alpha1 != 0:
                m = getattr(layer, f"m_{key}")
                if m is None:
                    m = self._new_momentum(layer, key)
                new_m.add_(m, alpha1)
                pending.append((m.tensors, new_m.tensors))
            step_size = lr_cov
            if group["normalize_lr_cov"]:
                step_size = lr_cov / new_m.abs_max().clamp(min=1.0)
            factor = getattr(layer, key)
            new = factor.clone().add_(factor.compose(new_m),
                                      -step_size if isinstance(step_size, torch.Tensor) else -float(step_size))
            pending.append((factor.tensors, new.tensors))
            factors.append(new)
        return pending, (factors[0], factors[1])

    def _new_momentum(self, layer: _Layer, key: str) -> Structure:
        factor = getattr(layer, key)
        state = self._state_of(layer.weight)
        for name, t in factor.spec.zeros(factor.dim, factor.dtype, factor.device).named_tensors().items():
            state[f"m_{key}.{name}"] = t
        self._bind(layer)
        return getattr(layer, f"m_{key}")

    def natural_gradients(self, factors: dict[str, tuple[Structure, Structure]]
                          ) -> list[tuple[dict, torch.Tensor, torch.Tensor]]:
        """``N = C C^T G K K^T`` of every layer whose weight has a gradient, as ``(group, param, this rank's
        part of N)`` for its weight and bias, with ``(K, C) = factors[name]`` (default: the layer's own);
        ``G`` the ``[dW | db]`` matrix of their gradients (with grafting "adam": of Adam's first moments,
        which ``kfopt.composed`` puts into ``.grad``). Through the distributor: the rank that computes a
        layer's ``N`` gets its whole ``G`` (FSDP2: gathered from the row shards to the layer's owner), and
        every rank gets its rows of ``N`` (fp32; float64 for float64 factors or gradients)."""
        distributor = self.distributor
        captured = [layer.captured for layer in self._layers]
        active = [i for i, layer in enumerate(self._layers) if layer.weight.grad is not None]
        matrices = distributor.gradients(captured, active)
        pairs = {i: factors.get(self._layers[i].name, (self._layers[i].K, self._layers[i].C)) for i in active}
        with distributor.agreement(preconditioning=True):  # each layer's N on the ranks that compute it
            natural = {}
            for i in active:
                if distributor.preconditions(i):
                    K, C = pairs[i]
                    y = K.matmul(matrices[i], right=True)
                    y = K.matmul(y, transpose=True, right=True)
                    natural[i] = C.matmul(C.matmul(y, transpose=True))
        rows = distributor.local_rows(natural, {i: result_dtype(pairs[i][0].tensors[0], pairs[i][1].tensors[0],
                                                                self._layers[i].weight.grad) for i in active})
        parts = []
        for i in active:
            layer, n = self._layers[i], rows[i]
            d_in, group = layer.captured.in_features, self._group(layer)
            parts.append((group, layer.weight, n[:, :d_in].reshape(local(layer.weight).shape)))
            if layer.bias is not None:
                parts.append((group, layer.bias, n[:, d_in]))
        return parts

    # -- inspection -----------------------------------------------------------------------------

    @property
    def layers(self) -> list[str]:
        """Names of the preconditioned layers (as in ``model.named_modules()``, no DDP prefix)."""
        return [layer.name for layer in self._layers]

    def factors(self, name: str) -> tuple[Structure, Structure]:
        """``(K, C)`` of layer ``name``: live structures over the state tensors."""
        layer = self._by_name[name]
        return layer.K, layer.C

    def momenta(self, name: str) -> tuple[Structure | None, Structure | None]:
        """``(m_K, m_C)`` of layer ``name`` (None where alpha1 was always 0)."""
        layer = self._by_name[name]
        return layer.m_K, layer.m_C


class SINGD(PreconditionerAttributes, ComposedOptimizer):
    """Structured inverse-free natural gradient descent (module docstring for the math and contracts): a
    ``kfopt.composed.ComposedOptimizer``, its :class:`SINGDPreconditioner` in front of ``base``.

    Args:
        model: the model (or a ``DistributedDataParallel`` wrapping it) whose ``nn.Linear``/``nn.Conv2d``
            layers are preconditioned.
        params: parameters or param groups to train; None: every parameter of ``model`` that requires
            grad. Group entries override the defaults below.
        lr: learning rate of the parameter update (beta_2 in the paper).
        momentum: heavy-ball momentum of the parameter update (alpha_2).
        damping: damping of the factor updates (lambda).
        alpha1: Riemannian momentum of the factor updates, in [0, 1).
        weight_decay: added to the natural gradient as ``weight_decay * w`` (gamma).
        T: factors are updated every ``T`` steps (statistics captured in those steps only).
        loss_average: None (summed loss), ``"batch"`` or ``"batch+sequence"`` (mean loss over those terms).
        lr_cov: learning rate of the factor updates (beta_1): a float, or a callable of the step count.
        structures: structure names of (K, C) (``kfopt.structures.STRUCTURE_NAMES``).
        kfac_approx: ``"expand"`` or ``"reduce"`` for layers with shared dimensions.
        kfac_like: the IKFAC update (forces alpha1 = 0).
        preconditioner_dtype: storage dtypes of (K and m_K, C and m_C); None: the weight's dtype.
        normalize_lr_cov: normalized gradient descent on the factors. True by default, unlike ``singd``'s
            False (module docstring, Defaults): the one default that differs from the reference.
        skip_layers: module names or types not to precondition (their parameters get the first-order rule).
        grad_scaler: the ``torch.amp.GradScaler`` in use, to unscale output gradients as they arrive
            (needed when ``scaler.unscale_`` is called before ``scaler.step``); keyword only.
        graft, graft_betas, graft_eps: grafting (module docstring; "none": the update above).
        base: the base optimizer (module docstring, Base optimizer): ``"heavy_ball"`` (SINGD's update,
            ``kfopt.heavy_ball``), ``"sgd"``, ``"adamw"``, ``"lamb"`` or a callable, as for ``kfopt.KFAC``.

    A step with a NaN/inf gradient or statistic (with or without a GradScaler) changes no parameter,
    buffer, factor or momentum: it is skipped on the device, without a host sync, and counted in
    ``skipped_steps`` (module docstring, Non-finite gradients and statistics).
    """

    state_key = "singd"
    scaled_statistic = "H_C"
    _step_supports_amp_scaling = True
    _blowup_advice = ("the factor step is too large for this problem: use normalize_lr_cov=True, a smaller lr_cov "
                      "or a larger damping")
    _rescales_statistics = True
    global_hyperparameters = ("graft",)

    def __init__(self, model: nn.Module, params: Iterable | None = None, lr: float = 1e-3, momentum: float = 0.9,
                 damping: float = 1e-3, alpha1: float = 0.5, weight_decay: float = 0.0, T: int = 10,
                 loss_average: str | None = "batch", lr_cov: float | Callable[[int], float] = 1e-2,
                 structures: tuple[str, str] = ("dense", "dense"), kfac_approx: str = "expand",
                 kfac_like: bool = False, preconditioner_dtype: tuple = (None, None), normalize_lr_cov: bool = True,
                 skip_layers: Iterable[str | type] = (), *, grad_scaler: torch.amp.GradScaler | None = None,
                 graft: str = "none", graft_betas: tuple[float, float] = GRAFT_BETAS, graft_eps: float = GRAFT_EPS,
                 base: BaseOptimizer = "heavy_ball"):
        check_base(base)
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        if params is None:
            params = [p for p in inner.parameters() if p.requires_grad]
        defaults = dict(lr=lr, momentum=momentum, damping=damping, alpha1=alpha1, weight_decay=weight_decay, T=T,
                        loss_average=loss_average, lr_cov=lr_cov, structures=structures, kfac_approx=kfac_approx,
                        kfac_like=kfac_like, preconditioner_dtype=preconditioner_dtype,
                        normalize_lr_cov=normalize_lr_cov, **graft_defaults(graft, graft_betas, graft_eps))
        check_graft_group(defaults)
        #: a tensor lr is read on the device by the grafting kernel and by the default base
        self._takes_device_lr = graft != "none" or base == "heavy_ball"
        self._model = inner  # the model the parameters come from (``params``: a subset of them or others)
        self._base_choice = base
        super().__init__(params, defaults)
        self._grad_scaler = grad_scaler
        #: without grad_scaler=: the grad scale of the last scaler.step, which the capture divides by
        self._last_grad_scale: torch.Tensor | None = None
        self._correction: float | torch.Tensor = 1.0  # this step's u (module docstring, AMP)
        #: this step's natural gradients by id(param) (fp32), and the factor commits a grafted step decides
        self._directions: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pending: _Commits = []
        self._factor_state: dict[torch.Tensor, dict] = defaultdict(dict)
        self._build_base(base)
        self.preconditioner = SINGDPreconditioner._over(model, lambda: self.param_groups, self._factors_of,
                                                        tuple(skip_layers), grad_scaler)

    def _factors_of(self, weight: torch.Tensor) -> dict:
        """Where a layer's factors and momenta live: its weight's per-parameter state with the default base
        (which keeps ``momentum_buffer`` beside them), a dict of SINGD's own with any other base (whose
        per-parameter state must start empty)."""
        return (self.state if isinstance(self.base, HeavyBall) else self._factor_state)[weight]

    def add_param_group(self, param_group: dict) -> None:
        """A group added after construction gets the first-order rule (layers are selected at construction),
        stepped by the base optimizer, which shares the group list; the base's defaults fill what the group
        lacks (``ComposedOptimizer`` refuses groups: its optimizers' parameters come from the model)."""
        KfoptOptimizer.add_param_group(self, param_group)
        if hasattr(self, "base"):
            for key, value in self.base.defaults.items():
                self.param_groups[-1].setdefault(key, value)

    # -- the preconditioner's, for convenience -----------------------------------------------------

    def factors(self, name: str) -> tuple[Structure, Structure]:
        """``(K, C)`` of layer ``name``: live structures over the optimizer's state tensors."""
        return self.preconditioner.factors(name)

    def momenta(self, name: str) -> tuple[Structure | None, Structure | None]:
        """``(m_K, m_C)`` of layer ``name`` (None where alpha1 was always 0)."""
        return self.preconditioner.momenta(name)

    # -- validation -----------------------------------------------------------------------------

    @property
    def device_lr(self) -> bool:
        """A tensor ``lr`` is taken with grafting and with the default base (both read it on the device: a
        NaN, negative or infinite one skips the step and counts it); torch's bases take numbers."""
        return self._takes_device_lr

    def _check_group(self, group: dict) -> None:
        self._check_lr(group)
        for name in ("momentum", "weight_decay"):
            check_nonnegative(name, group[name])
        _check_factor_group(group, stacklevel=4)
        check_graft_group(group)

    # -- the step (kfopt.composed: _second_order_step, then the base's or the grafted step) ----------

    def _grad_scaler_skips_step(self, statistic: str) -> bool:
        self._correction = self._statistics_correction()  # also on a skipped step: it records the scale
        return super()._grad_scaler_skips_step(statistic)

    def _discard_step(self) -> None:
        """A GradScaler skip: the statistics dropped and the step counted in ``steps`` (as the reference)."""
        self.preconditioner.finish_step()

    def _second_order_step(self) -> torch.Tensor | None:
        """New factors, momenta and the natural gradients computed with them; the verdict, a 0-d device
        bool agreed over the ranks: every gradient, statistic and tensor lr finite (else counted in
        ``skipped_steps``) and every new factor, momentum and ``N`` finite (else a blow-up, counted in
        ``skipped_steps`` and ``blown_up_steps``). Factors and momenta are committed where it holds (with
        grafting: where the grafted step is taken, ``_keep_or_restore``); ``N`` waits for the base step
        (``_base_step``, ``_direction``). None when nothing has a gradient or a statistic."""
        pre = self.preconditioner
        found = self._params_with_grads()
        updated = pre.updated_layers()
        inputs = [local(p.grad) for _, p in found] + statistics(updated)
        verdict, self._directions, self._pending = None, {}, []
        if inputs:
            with pre.distributor.agreement():  # every rank updates the same factors and weights
                finite = self._finite(inputs)
                pending, directions = pre.propose(updated, self._correction)
                verdict = self._blew_up(finite, [t for _, new in pending for t in new] + [d for _, _, d in directions])
            self._directions = {id(p): (p, d) for _, p, d in directions}
            if self.defaults["graft"] != "none" and found:
                self._pending = pending
            else:
                for targets, new in pending:
                    _commit(verdict, targets, new)
        pre.finish_step()
        return verdict

    def _base_step(self, verdict: torch.Tensor | None) -> None:
        """The default base steps on the fp32 natural gradients where the verdict holds; any other base gets
        them in ``.grad`` (rounded to its dtype; ``ComposedOptimizer._base_step``)."""
        directions, self._directions = self._directions, {}  # not kept beyond the step
        if isinstance(self.base, HeavyBall) and verdict is not None:
            self.base.step(verdict=verdict, directions={i: d for i, (_, d) in directions.items()})
            return
        for p, d in directions.values():
            if p.grad is not None:
                local(p.grad).copy_(d)
        super()._base_step(verdict)

    def _direction(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 natural gradient of ``p`` (the grafted step's direction)."""
        return self._directions[id(p)][1] if id(p) in self._directions else p.grad

    def _graft_momentum(self, group: dict) -> float:
        return group["momentum"]

    def _snapshot(self) -> None:
        """Nothing: a grafted step's new factors and momenta wait in ``_pending`` (``_second_order_step``)."""
        return None

    def _keep_or_restore(self, ok: torch.Tensor, snapshot: None) -> None:
        """Commit the grafted step's new factors and momenta where it was taken (``ok``)."""
        for targets, new in self._pending:
            _commit(ok, targets, new)
        self._pending, self._directions = [], {}

    def _holds_scaled_statistics(self) -> bool:
        return any(layer.H_C is not None for layer in self.preconditioner._layers)

    def _statistics_correction(self) -> float | torch.Tensor:
        """``u`` for this step's H_C (module docstring, AMP): 1, or under a GradScaler without
        ``grad_scaler=``, ``(divisor / grad_scale)^2`` for output gradients captured divided by ``divisor``
        (1 before the first scaler step, then the previous step's scale); records this step's scale as the
        capture's next divisor (device tensors only: no host synchronisation)."""
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is None or self._grad_scaler is not None:
            return 1.0
        scale = grad_scale.detach().reshape(()).float()
        previous = self._last_grad_scale
        correction = (previous.double() / scale.double() if previous is not None
                      else scale.double().reciprocal()).square().float()
        if previous is None:
            self._last_grad_scale = scale.clone()
            self.capture.set_grad_scale(self._last_grad_scale)  # read when each backward runs
        else:
            previous.copy_(scale)
        return correction

    def _finite(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """Whether every gradient and statistic of the step is finite and every tensor lr is finite and
        >= 0 (``_finite_inputs``); a step where it is False counts in ``skipped_steps`` and changes no state."""
        finite = self.preconditioner.distributor.all_finite(self._finite_inputs(inputs))
        self._skip_counter(finite.device).add_((~finite).to(torch.int32))
        return finite

    def _blew_up(self, finite: torch.Tensor, new: list[torch.Tensor]) -> torch.Tensor:
        """``finite`` and every tensor of ``new`` (factors, momenta, natural gradients computed from finite
        inputs) finite: a 0-d bool on the device. Where ``finite`` holds but the result does not, this step's
        own update blew up: it is skipped (counted in ``skipped_steps`` and ``blown_up_steps``)."""
        healthy = finite
        if new:  # a rank's own shards of the update (FSDP2): agreed over the ranks
            healthy = healthy & self.preconditioner.distributor.all_finite(
                torch.stack([torch.isfinite(t).all() for t in new]).all())
        self._skip_counter(finite.device).add_((finite & ~healthy).to(torch.int32))
        self._count_blowup(finite, healthy)
        return healthy

    # -- checkpoints ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """SINGD's checkpoint (module docstring, Checkpoints). Under ``torch.distributed.checkpoint``'s
        ``get_optimizer_state_dict``: the base's per-parameter state alone (the factors go in the
        preconditioner's part of ``distributed_state_dict()``)."""
        state = self.base.state_dict()
        if self._distributed_checkpoint:
            state["state"] = {pid: {k: v for k, v in values.items() if not _is_factor_key(k)}
                              for pid, values in state["state"].items()}
            return state
        base_skipped = state.pop("skipped_steps", None)
        for key in (KIND_KEY, "blown_up_steps"):
            state.pop(key, None)
        if not isinstance(self.base, HeavyBall):  # the factors go in their weights' state, as with the default
            pid_of = {id(p): pid for saved, group in zip(state["param_groups"], self.param_groups)
                      for pid, p in zip(saved["params"], group["params"])}
            for layer in self.preconditioner._layers:
                state["state"].setdefault(pid_of[id(layer.weight)], {}).update(self._factors_of(layer.weight))
        for group in state["param_groups"]:
            if callable(group["lr_cov"]):
                group["lr_cov"] = None
        state[KIND_KEY] = type(self).__name__
        if not isinstance(self.base, HeavyBall):  # the default base's checkpoint is SINGD's of before `base`
            state["base_optimizer"] = type(self.base).__name__
            if base_skipped is not None:
                state["base_skipped_steps"] = base_skipped
        state["skipped_steps"] = self._skip_count().detach().clone()
        state.update(self._blowup_state())
        state["steps"] = self.steps
        last = self._last_grad_scale
        state["last_grad_scale"] = None if last is None else last.detach().clone()
        return state

    def _state_spec(self, p: torch.Tensor, group: dict) -> dict | None:
        """The base's (or the graft's) per-parameter state (``ComposedOptimizer._state_spec``; None: not
        checked) and, outside ``torch.distributed.checkpoint``'s part, a preconditioned layer's weight's
        factors (required) and momenta (optional) by free-parameter tensor, of its structures' shapes and
        dtypes."""
        spec = super()._state_spec(p, group)
        layer = next((layer for layer in self.preconditioner._layers if layer.weight is p), None)
        if spec is None or layer is None or self._distributed_checkpoint:
            return spec
        spec = dict(spec)
        for key, structure_spec, side, dtype in self.preconditioner._factor_layout(layer, group):
            for name, t in structure_spec.zeros(side, dtype, torch.device("meta")).named_tensors().items():
                spec[f"{key}.{name}"] = (tuple(t.shape), (dtype,), True)
                spec[f"m_{key}.{name}"] = (tuple(t.shape), (dtype,), False)
        return spec

    def _loadable_groups(self, groups) -> list:
        """The saved param groups with a callable ``lr_cov`` (saved as None) taken from the optimizer."""
        if not isinstance(groups, (list, tuple)):
            return groups
        return [{**saved, "lr_cov": current["lr_cov"]} if isinstance(saved, dict) and saved.get("lr_cov", 0) is None
                else saved for saved, current in zip(groups, self.param_groups)] + list(groups[len(self.param_groups):])

    def check_state_dict(self, state_dict: dict) -> None:
        """ValueError saying what does not fit unless ``state_dict`` is a checkpoint of this SINGD (module
        docstring, Checkpoints: kind, base optimizer, keys, param groups with the same structures and
        preconditioner dtypes, every state tensor, ``steps``, ``last_grad_scale``, counters); changes
        nothing. ``torch.distributed.checkpoint``'s part: ``ComposedOptimizer.check_state_dict``."""
        if _base_part(state_dict):
            super().check_state_dict(state_dict)
            return
        check_keys(state_dict, ("param_groups", "steps", "last_grad_scale"), "state_dict")
        steps = state_dict["steps"]
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise ValueError(f"state_dict: expected 'steps' an int >= 0, got {steps!r}")
        _check_last_grad_scale("state_dict['last_grad_scale']", state_dict["last_grad_scale"])
        base = state_dict.get("base_optimizer", HeavyBall.__name__)  # absent: the default base's
        if base != type(self.base).__name__:
            raise ValueError(f"state_dict: its base optimizer is {base!r}, this SINGD's is "
                             f"{type(self.base).__name__!r}")
        if isinstance(self.base, KfoptOptimizer) and not isinstance(self.base, HeavyBall):
            check_keys(state_dict, ("base_skipped_steps",), "state_dict")
            check_counter("state_dict['base_skipped_steps']", state_dict["base_skipped_steps"])
        groups = state_dict["param_groups"]
        for i, (saved, current) in enumerate(zip(groups if isinstance(groups, (list, tuple)) else (),
                                                  self.param_groups)):
            check_keys(saved, ("structures", "preconditioner_dtype"), f"state_dict: param group {i}")
            for name in ("structures", "preconditioner_dtype"):
                if not isinstance(saved[name], (list, tuple)) or tuple(saved[name]) != tuple(current[name]):
                    raise ValueError(f"state_dict has {name}={saved[name]!r} in a param group where the optimizer "
                                     f"has {current[name]!r}: factors cannot be loaded into other structures")
        KfoptOptimizer.check_state_dict(self, {**state_dict, "param_groups": self._loadable_groups(groups)})
        ids = {id(p): pid for saved, group in zip(groups, self.param_groups)
               for pid, p in zip(saved["params"], group["params"])}
        for layer in self.preconditioner._layers:
            saved = state_dict["state"].get(ids.get(id(layer.weight)), {})
            momenta = [key for key in self._state_spec(layer.weight, self.param_groups[layer.group]) or {}
                       if key.startswith("m_")]
            present = [key for key in momenta if key in saved]
            if present and len(present) != len(momenta):
                raise ValueError(f"state_dict: layer {layer.name!r} holds momenta {present} but not "
                                 f"{sorted(set(momenta) - set(present))}: its momenta are all saved or none")

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a ``state_dict()`` (module docstring, Checkpoints); pending statistics are dropped.
        Everything is checked first: a checkpoint that does not fit raises ValueError and changes nothing."""
        if _base_part(state_dict):  # torch.distributed.checkpoint's part (load_distributed_state_dict)
            super().load_state_dict(state_dict)
            return
        self.check_state_dict(state_dict)
        groups = self._loadable_groups(state_dict["param_groups"])
        part = {"state": {pid: {k: v for k, v in values.items() if not _is_factor_key(k)}
                          for pid, values in state_dict["state"].items()}, "param_groups": groups}
        if isinstance(self.base, KfoptOptimizer):
            part[KIND_KEY] = type(self.base).__name__
            part["skipped_steps"] = state_dict.get("base_skipped_steps", torch.zeros((), dtype=torch.int32))
        self._load_base_part(part)
        pre = self.preconditioner
        param_of = {pid: p for saved, group in zip(groups, self.param_groups)
                    for pid, p in zip(saved["params"], group["params"])}
        weights = {id(p): pid for pid, p in param_of.items()}
        for layer in pre._layers:
            pre._load_factors(layer, state_dict["state"].get(weights[id(layer.weight)], {}))
        pre.steps = int(state_dict["steps"])
        self._skipped = state_dict["skipped_steps"].detach().clone()
        self._load_blowup_state(state_dict)
        self._load_last_grad_scale(state_dict["last_grad_scale"])
        pre.discard_step()
        pre._arm()

    def _load_last_grad_scale(self, last: torch.Tensor | None) -> None:
        """The capture's divisor (module docstring, AMP) from a checked checkpoint; ignored with
        ``grad_scaler=``."""
        if self._grad_scaler is None:
            device = next(p.device for group in self.param_groups for p in group["params"])
            self._last_grad_scale = None if last is None else last.detach().to(device, copy=True)
            self.capture.set_grad_scale(self._last_grad_scale)

    # -- torch.distributed.checkpoint -------------------------------------------------------------

    def distributed_state_dict(self) -> dict:
        """``ComposedOptimizer.distributed_state_dict`` (the base's per-parameter state keyed by parameter
        name, momentum buffers as DTensors under FSDP2, resharded on load; ``"singd"``, the
        preconditioner's factors and momenta as the plain tensors every rank holds; the counts) plus
        ``"last_grad_scale"`` (a 0-d fp32 tensor, 0 for None). The default base's missing momentum
        buffers are created as zeros first (they step as missing ones), so that a fresh optimizer holds
        what a checkpoint fills. A collective: every rank calls it."""
        if self.defaults["graft"] == "none" and isinstance(self.base, HeavyBall):
            self.base.init_state()
        last = self._last_grad_scale
        return {**super().distributed_state_dict(),
                "last_grad_scale": torch.zeros((), dtype=torch.float32) if last is None else last.cpu()}

    def load_distributed_state_dict(self, state_dict: dict) -> None:
        """``ComposedOptimizer.load_distributed_state_dict`` and the ``"last_grad_scale"``, checked first. A
        collective: every rank calls it."""
        check_keys(state_dict, ("last_grad_scale",), "state_dict")
        last = state_dict["last_grad_scale"]
        check_tensor("state_dict['last_grad_scale']", last, (), torch.float32)
        last = None if last.item() == 0 else last
        _check_last_grad_scale("state_dict['last_grad_scale']", last)
        super().load_distributed_state_dict(state_dict)
        self._load_last_grad_scale(last)


def _check_last_grad_scale(where: str, last) -> None:
    """ValueError unless ``last`` is None or a finite 0-d fp32 scale > 0."""
    if last is not None:
        check_tensor(where, last, (), torch.float32)
        if not (torch.isfinite(last) & (last > 0)).item():  # loading may synchronise
            raise ValueError(f"{where}: expected None or a finite scale > 0, got {last}")
