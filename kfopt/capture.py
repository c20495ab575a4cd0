"""Layer capture: which layers a Kronecker-factored optimizer preconditions, and hooks that hand each
such layer's inputs and output gradients to the optimizer on the steps that need them.

One implementation for K-FAC/KAISA, MKOR and SINGD. An optimizer builds a :class:`LayerCapture` with
two functions: ``input_fn(layer, call, a)`` and ``grad_output_fn(layer, call, g)``. Each is called once
per captured call of a layer, with that call's rows; what it returns (a tensor, or None) is summed
over the calls of the step into ``layer.input_stat`` / ``layer.grad_output_stat``. So K-FAC returns
``a^T a`` (and ``g^T g``), MKOR ``a.sum(0)``, SINGD its projected ``K^T a^T a K``; the capture keeps the
sums, counts and row counts until :meth:`LayerCapture.clear`. Nothing else is held: rows are
transient (see Memory). The optimizers combine these statistics across ranks before using them, so
the two functions run under ``kfopt.autotune.configs_per_rank()`` (each rank tunes its kernels).

Selection
    Modules that are instances of ``layer_types`` (default ``nn.Linear`` and ``nn.Conv2d``, subclasses
    included; only subclasses of those two are supported), in ``model.named_modules()`` order, minus
    ``skip_layers``: a module name skips that module and everything under it; a type skips its
    instances. Never selected: the projections inside ``nn.MultiheadAttention`` (its ``out_proj`` is an
    ``nn.Linear``, but the module uses its weights without calling it, so no hook would see its rows)
    and Conv2d layers with ``groups != 1`` (depthwise and grouped convolutions: their weight gradient is
    not one ``d_out x d_in`` matrix), nor layers whose weight has no elements (``in_features=0`` or
    ``out_features=0``: nothing to precondition). Parameters of other modules, of those layers (and any extra
    parameter of a selected subclass) are listed by :meth:`LayerCapture.other_params`: the optimizer
    gives them its base optimizer's first-order update on their raw gradients; nothing is left
    untrained. Construction raises for a lazy layer not yet initialized and for a selected layer whose
    weight or bias is also registered in another module (tied weights): skip such layers.

When a call is captured
    A forward call of a selected layer is captured when the capture is armed (:meth:`LayerCapture.arm`),
    the layer is in training mode and its output requires grad. So nothing is captured under
    ``torch.no_grad()``/``torch.inference_mode()``, in eval mode, or while disarmed; a disarmed forward
    costs one Python check per layer and holds no tensor. A layer called several times in one forward
    (or in several micro-batches before the optimizer step) is captured once per call: ``layer.calls``
    counts the captured forward calls since :meth:`LayerCapture.clear`, ``layer.grad_calls`` the output
    gradients received for them (a call whose output gets no gradient is not in ``grad_calls``).
    Activation checkpointing with ``use_reentrant=False`` recomputes forwards inside the backward; such a
    recomputation is captured as one more call that never gets a gradient (``calls > grad_calls``,
    inputs counted twice): not supported.

Rows handed over (``a``: input rows, ``g``: output-gradient rows; row ``r`` of ``g`` belongs to row ``r``
of ``a`` of the same call; ``call`` is a :class:`CallInfo`)
    * Linear: ``a = input.reshape(-1, in_features)`` (all leading dimensions, e.g. batch x sequence,
      flattened row-major), ``g = grad_output.reshape(-1, out_features)``.
    * Conv2d: ``a`` = the patches the convolution multiplies, ``(batch * oh * ow, C_in * kh * kw)``: the
      layer's padding applied as the layer applies it (``padding_mode``, ``'same'`` included), then
      ``F.unfold`` with its kernel size, dilation and stride; rows ordered (batch, oh, ow), columns
      (C_in, kh, kw) like ``weight.reshape(out_channels, -1)``. ``g`` = grad_output permuted to
      ``(batch * oh * ow, out_channels)``. An unbatched (C, H, W) call counts as batch 1.
    * No bias column is appended: ``layer.has_bias`` says whether the statistic needs one (kfopt's
      covariance kernel appends it logically).
    * ``a`` and ``g`` are detached and may be views of the layer's input or output gradient: the
      functions must not modify them in place. They may be non-contiguous. They keep their dtype (under
      ``torch.autocast`` the input as passed to the layer, possibly fp32, and the output gradient in
      the autocast dtype), except that ``g`` is float32 (float64 for a float64 model) when a grad scale is
      set (below).
    * The functions run with autocast and autograd disabled, so their math is in the dtypes they choose.

    Identity the tests check: over the calls of a step, ``sum_c g_c^T a_c`` equals the weight gradient
    accumulated by those backward passes (``weight.grad.reshape(out, -1)``), and ``sum_c g_c.sum(0)``
    the bias gradient.

Scaling (``loss_average``)
    ``g`` is exactly ``d loss / d output`` of the scalar the caller backpropagated (divided by the grad
    scale, below): for a loss that is the mean of ``n`` terms, ``g`` is ``1/n`` times the output
    gradient of their sum. :func:`loss_term_count` gives ``n`` for a call under the usual conventions
    (``None``: a sum; ``"batch"``: a mean over the leading dimension of the layer's input, which is the
    batch only for batch-first layouts; ``"batch+sequence"``: a mean over all rows of a Linear call);
    ``n * g`` are per-example output gradients (gradients of the summed loss).
    Under gradient accumulation where each micro-batch's mean loss is divided by the number of
    micro-batches ``M``, per-example gradients are ``M * n * g``. Under ``DistributedDataParallel`` each
    rank backpropagates its local loss: ``g`` is the gradient of the *local* mean loss, ``world`` times
    that of the global mean loss over all ranks (world-size-invariant statistics divide by ``world``;
    see docs/kfac.md). The capture applies none of these factors itself.

Accumulation
    Statistics are summed over every captured call between two :meth:`LayerCapture.clear` calls:
    several calls per forward, several forward/backward micro-batches, or both. Sums of per-call
    statistics over micro-batches equal the statistic of the concatenated batch when the micro-batch
    losses add up to the big-batch loss. ``input_row_count``/``grad_output_row_count`` add up the rows.
    ``clear()`` also invalidates output-gradient hooks of forwards done before it (their gradients
    are ignored if they arrive later).

In-place operations after the layer
    Inputs are handed over inside the forward hook, before anything after the layer can modify them:
    no copy of them is kept. Output gradients come from a tensor hook registered on the layer's output
    in the forward hook (not from ``register_full_backward_hook``, which raises when the output is
    modified in place, e.g. by ``nn.ReLU(inplace=True)``). A tensor hook registered before an in-place
    operation receives the gradient with respect to the value the layer produced, which is the one the
    statistics need.

Memory
    Besides the summed statistics (held until ``clear()``), the capture holds no tensor: between a
    forward and its backward only a small closure (layer, call, step generation) sits on the output's
    autograd graph. Rows, Conv2d patches and unscaled gradients exist only while the functions run.

AMP
    ``torch.autocast``: see Rows. ``torch.amp.GradScaler``: :meth:`LayerCapture.set_grad_scale` takes the
    scaler (or a float or tensor scale); each output gradient is converted to float32 (float64 stays) and
    divided by the scale in effect when its backward runs, read without a host synchronization (from the
    scaler's scale tensor). Data captured in a step that the scaler skips (inf/NaN gradients) must be dropped with
    ``clear()``: a kfopt optimizer sets ``_step_supports_amp_scaling = True`` so that ``scaler.step``
    always calls its ``step()`` with ``self.found_inf``, leaves its factors unchanged where
    ``found_inf`` is set and clears the capture. With an optimizer that ``scaler.step`` does not call on
    a skipped step, the caller must ``clear()`` after a skipped step.

Distributed
    ``model`` may be wrapped in ``DistributedDataParallel`` (any launcher, ``torchrun`` included): layer
    and parameter names are those of the wrapped module (no ``module.`` prefix) and ``skip_layers``
    accepts names with or without the prefix. Each rank captures its local micro-batches; averaging
    statistics over ranks is the optimizer's job (kfopt.collectives). A model sharded with FSDP2's
    ``fully_shard`` (HSDP included) is accepted when its DTensor parameters are row shards; the codec
    then reads and writes this rank's rows of ``[dW | db]`` and the optimizer gathers whole matrices
    (``kfopt.sharded_distribution``). Other placements (tensor parallelism's ``Shard(1)``) raise
    ValueError naming the layer; ``FullyShardedDataParallel`` (FSDP1) and DTensor parameters without
    ``fully_shard`` raise ``NotImplementedError`` at construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kfopt.autotune import configs_per_rank

from .validation import check_loss_average

#: how the backpropagated loss averaged its terms (see :func:`loss_term_count`)
LossAverage = Literal["batch", "batch+sequence"] | None


class CallInfo(NamedTuple):
    """One captured call of a layer: ``index`` counts the layer's captured calls since the last
    ``clear()`` from 0; ``batch_size`` is the input's leading dimension (1 for an unbatched input);
    ``positions`` = rows / batch_size (sequence positions of a Linear call, output pixels oh * ow of a
    Conv2d call)."""

    index: int
    batch_size: int
    positions: int


def loss_term_count(call: CallInfo, loss_average: LossAverage) -> int:
    """Number of loss terms ``n`` a mean loss averaged over, for the rows of ``call``: 1 for a summed
    loss (None), ``batch_size`` for ``"batch"``, ``batch_size * positions`` for ``"batch+sequence"``.
    ``n * g`` are the per-example output gradients of that call (module docstring, Scaling)."""
    if loss_average is None:
        return 1
    if loss_average == "batch":
        return call.batch_size
    if loss_average == "batch+sequence":
        return call.batch_size * call.positions
    raise ValueError(f"loss_average: expected None, 'batch' or 'batch+sequence', got {loss_average!r}")


#: ``fn(layer, call, rows) -> statistic or None``, called once per captured call (module docstring)
RowsFn = Callable[["CapturedLayer", CallInfo, torch.Tensor], torch.Tensor | None]


@dataclass(eq=False)
class CapturedLayer:
    """A selected layer and what was captured for it since the last ``clear()``.

    ``kind`` is ``"linear"`` or ``"conv2d"``; ``in_features``/``out_features`` are the widths of the
    rows handed over (Conv2d: ``C_in * kh * kw`` and ``out_channels``), so the weight gradient viewed
    as a matrix is ``(out_features, in_features)``; a Conv2d's geometry (kernel_size, stride, padding,
    dilation, padding_mode) is read from ``module``. The per-step fields are described in the module
    docstring; ``input_stat``/``grad_output_stat`` are None until a function returned a tensor, and
    ``loss_terms`` is ``N`` of the received output gradients (``loss_average``, module docstring,
    Scaling). The layer's gradient codec (:meth:`grad_matrix`, :meth:`write_grad`) reads and writes
    its ``[dW | db]`` matrix, whatever the gradient's memory format.
    """

    name: str
    module: nn.Module
    kind: Literal["linear", "conv2d"]
    has_bias: bool
    in_features: int
    out_features: int
    loss_average: LossAverage = "batch"
    calls: int = 0
    grad_calls: int = 0
    input_row_count: int = 0
    grad_output_row_count: int = 0
    loss_term_sum: int = 0
    input_stat: torch.Tensor | None = field(default=None, repr=False)
    grad_output_stat: torch.Tensor | None = field(default=None, repr=False)

    def _reset(self) -> None:
        self.calls = self.grad_calls = self.input_row_count = self.grad_output_row_count = self.loss_term_sum = 0
        self.input_stat = self.grad_output_stat = None

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.module.bias

    @property
    def loss_terms(self) -> int:
        """``N``, the loss terms behind the output gradients received since ``clear()``: the sum of
        :func:`loss_term_count` over those calls, or for a summed loss (``loss_average=None``) 1 once
        any gradient arrived (0 before)."""
        return self.loss_term_sum if self.loss_average is not None else int(self.grad_calls > 0)

    # -- the gradient codec: [dW | db] as one matrix -------------------------------------------------

    def grad_matrix(self, with_bias: bool = True) -> torch.Tensor:
        """The layer's gradient as the matrix ``V = [dW | db]``, (out_features, in_features [+ 1]): the
        weight gradient viewed as (out_features, in_features) (Conv2d: columns (C_in, kh, kw)), and with
        ``with_bias`` and a bias, the bias gradient as the last column (zeros when it has none). Without
        a bias column it is a view of the weight gradient where the gradient's layout allows one (a
        contiguous gradient), else a copy (e.g. a channels-last Conv2d gradient); with one, a copy.
        Under FSDP2 (a row-sharded DTensor gradient) it is this rank's block of whole rows of ``V``
        (possibly none). :meth:`write_grad` stores a matrix of this shape back."""
        grad = _local(self.weight.grad)
        weight_part = grad.reshape(grad.shape[0], math.prod(grad.shape[1:]))  # rows may be 0
        if not (with_bias and self.has_bias):
            return weight_part
        bias_grad = self.bias.grad
        bias_part = _local(bias_grad) if bias_grad is not None else torch.zeros_like(_local(self.bias))
        return torch.cat([weight_part, bias_part.reshape(-1, 1).to(weight_part.dtype)], dim=1)

    def write_grad(self, matrix: torch.Tensor) -> None:
        """Store ``matrix`` (shaped as :meth:`grad_matrix`'s, with or without the bias column) into the
        weight's (and bias's) ``.grad`` (their local rows under FSDP2), in their dtypes; a weight part
        that is the view :meth:`grad_matrix` returned is already in place and not copied."""
        grad = _local(self.weight.grad)
        weight_part = matrix[:, :self.in_features]
        if weight_part.data_ptr() != grad.data_ptr():
            grad.copy_(weight_part.reshape(grad.shape))
        if matrix.shape[1] > self.in_features:
            _local(self.bias.grad).copy_(matrix[:, self.in_features])


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (``to_local()``, a view sharing its storage), any other tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _sum_into(total: torch.Tensor | None, value: torch.Tensor | None) -> torch.Tensor | None:
    """``total + value`` without writing into either (a returned statistic is never modified)."""
    if value is None:
        return total
    return value if total is None else total + value


def _conv_pads(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding that ``conv`` applies (F.pad order)."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        pads = []
        for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def _input_rows(layer: CapturedLayer, x: torch.Tensor) -> torch.Tensor:
    """A call's input as rows (module docstring, Rows)."""
    if layer.kind == "linear":
        if x.shape[-1] != layer.in_features:
            raise ValueError(f"layer {layer.name!r}: input's last dimension is {x.shape[-1]}, expected "
                             f"in_features={layer.in_features} (a subclass whose forward changes its input "
                             "cannot be captured; skip it)")
        return x.reshape(-1, layer.in_features)
    conv = layer.module
    if x.dim() == 3:
        x = x.unsqueeze(0)
    pads = _conv_pads(conv)
    if any(pads):
        x = F.pad(x, pads, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
    patches = F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)  # (B, C k k, L)
    return patches.transpose(1, 2).reshape(-1, layer.in_features)


def _call_info(layer: CapturedLayer, index: int, output: torch.Tensor) -> CallInfo:
    """The call's shape, read from its output: (batch, ..., out_features) or (batch, C_out, oh, ow)."""
    rows = output.numel() // layer.out_features
    batched = output.dim() > (1 if layer.kind == "linear" else 3)
    batch_size = output.shape[0] if batched else 1
    return CallInfo(index, batch_size, rows // batch_size if batch_size else 0)


def _grad_output_rows(layer: CapturedLayer, g: torch.Tensor) -> torch.Tensor:
    if layer.kind == "linear":
        return g.reshape(-1, layer.out_features)
    if g.dim() == 3:
        g = g.unsqueeze(0)
    return g.permute(0, 2, 3, 1).reshape(-1, layer.out_features)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _check_sharding(model: nn.Module) -> None:
    """FSDP2 (``fully_shard``, HSDP included) is accepted when every DTensor parameter is row-sharded
    (placements ``(Shard(0),)``, or HSDP's ``(Replicate(), Shard(0))``): ValueError naming the layer
    otherwise (e.g. tensor parallelism's ``Shard(1)`` inside a fully_shard model). FSDP1 and DTensor
    parameters without ``fully_shard`` (tensor parallelism alone) raise NotImplementedError."""
    if not dist.is_available():
        return
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor, Replicate, Shard

    fsdp2 = False
    for name, module in model.named_modules():
        if isinstance(module, FullyShardedDataParallel):
            raise NotImplementedError(
                f"module {name or '<root>'!r} is sharded by FSDP ({type(module).__name__}): kfopt's "
                "Kronecker-factored optimizers support FSDP2 (fully_shard) and DistributedDataParallel, "
                "not FSDP1")
        fsdp2 = fsdp2 or isinstance(module, FSDPModule)
    for name, p in model.named_parameters():
        if not isinstance(p, DTensor):
            continue
        if not fsdp2:
            raise NotImplementedError(
                f"parameter {name!r} is a DTensor (tensor parallelism) in a model without fully_shard: "
                "kfopt's Kronecker-factored optimizers precondition whole weight gradients and support "
                "FSDP2 (fully_shard) or DistributedDataParallel")
        if tuple(p.placements) not in ((Shard(0),), (Replicate(), Shard(0))):
            layer = name.rpartition(".")[0] or "<root>"
            raise ValueError(
                f"layer {layer!r}: parameter {name!r} has placements {tuple(p.placements)}; kfopt's "
                "Kronecker-factored optimizers accept FSDP2 row shards only, (Shard(0),) or HSDP's "
                "(Replicate(), Shard(0))")


def _has_empty_weight(module: nn.Module) -> bool:
    """Whether the layer's weight has no elements (a lazy layer's uninitialized weight has some)."""
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.Tensor) and not isinstance(weight, nn.parameter.UninitializedParameter)
            and weight.numel() == 0)


class LayerCapture:
    """Selects the layers of ``model`` to precondition and captures their rows (module docstring).

    Args:
        model: the model, or a ``DistributedDataParallel`` wrapping it.
        skip_layers: module names (as in ``model.named_modules()``, with or without DDP's ``module.``
            prefix; a name skips the module and everything under it) and module types not to select.
        layer_types: the types to select; each a subclass of ``nn.Linear`` or ``nn.Conv2d``.
        input_fn: called with ``(layer, call, a)`` for each captured forward call; a returned tensor is
            summed into ``layer.input_stat``. None: inputs are not looked at (no unfold).
        grad_output_fn: called with ``(layer, call, g)`` for each output gradient of a captured call; a
            returned tensor is summed into ``layer.grad_output_stat``.
        loss_average: how the backpropagated loss averages its terms (:func:`loss_term_count`): each
            layer's ``loss_terms`` counts the terms behind the output gradients it received.

    ``layers`` maps names to :class:`CapturedLayer` in module order. The capture starts disarmed.
    """

    def __init__(self, model: nn.Module, skip_layers: Iterable[str | type] = (),
                 layer_types: tuple[type, ...] = (nn.Linear, nn.Conv2d), *,
                 input_fn: RowsFn | None = None, grad_output_fn: RowsFn | None = None,
                 loss_average: LossAverage = "batch"):
        check_loss_average("loss_average", loss_average)
        inner = _unwrap(model)
        _check_sharding(inner)
        for t in layer_types:
            if not (isinstance(t, type) and issubclass(t, (nn.Linear, nn.Conv2d))):
                raise ValueError(f"layer_types: {t!r} is not a subclass of nn.Linear or nn.Conv2d")
        skip_names, skip_types = self._split_skip(inner, model is not inner, skip_layers)

        self.model = inner
        self.input_fn = input_fn
        self.grad_output_fn = grad_output_fn
        self._armed = False
        self._generation = 0
        self._scale: float | torch.Tensor | torch.amp.GradScaler | None = None
        self.layers: dict[str, CapturedLayer] = {}
        skip_names += [name for name, module in inner.named_modules() if isinstance(module, nn.MultiheadAttention)]
        for name, module in inner.named_modules():
            if (isinstance(module, tuple(layer_types)) and not isinstance(module, skip_types)
                    and not (isinstance(module, nn.Conv2d) and module.groups != 1)
                    and not _has_empty_weight(module)
                    and not any(name == s or name.startswith(s + ".") or s == "" for s in skip_names)):
                self.layers[name] = self._describe(name, module, loss_average)
        self._check_not_shared(inner)
        self._handles = [layer.module.register_forward_hook(self._forward_hook(layer), with_kwargs=True)
                         for layer in self.layers.values()]

    # -- construction ---------------------------------------------------------------------------

    @staticmethod
    def _split_skip(inner: nn.Module, wrapped: bool,
                    skip_layers: Iterable[str | type]) -> tuple[list[str], tuple[type, ...]]:
        names = {name for name, _ in inner.named_modules()}
        skip_names, skip_types = [], []
        for entry in skip_layers:
            if isinstance(entry, type) and issubclass(entry, nn.Module):
                skip_types.append(entry)
            elif isinstance(entry, str):
                name = entry
                if wrapped and name not in names and (name == "module" or name.startswith("module.")):
                    name = name[len("module."):]
                if name not in names:
                    raise ValueError(f"skip_layers: the model has no module named {entry!r} "
                                     "(names are as in model.named_modules())")
                skip_names.append(name)
            else:
                raise TypeError(f"skip_layers: expected module names or nn.Module types, got {entry!r}")
        return skip_names, tuple(skip_types)

    @staticmethod
    def _describe(name: str, module: nn.Module, loss_average: LossAverage) -> CapturedLayer:
        if isinstance(module.weight, nn.parameter.UninitializedParameter):
            raise ValueError(f"layer {name!r} is a lazy module not initialized yet: run one forward pass "
                             "before building the optimizer")
        has_bias = module.bias is not None
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            return CapturedLayer(name, module, "conv2d", has_bias, module.in_channels * kh * kw,
                                 module.out_channels, loss_average)
        return CapturedLayer(name, module, "linear", has_bias, module.in_features, module.out_features, loss_average)

    def _check_not_shared(self, inner: nn.Module) -> None:
        owners: dict[int, set[int]] = {}
        for module in inner.modules():
            for p in module.parameters(recurse=False):
                owners.setdefault(id(p), set()).add(id(module))
        for layer in self.layers.values():
            for p in (layer.module.weight, layer.module.bias):
                if p is not None and len(owners[id(p)]) > 1:
                    raise ValueError(f"layer {layer.name!r}: its parameters are shared with another module "
                                     "(tied weights); add it to skip_layers")

    # -- public API -----------------------------------------------------------------------------

    @property
    def armed(self) -> bool:
        """Whether forward calls are captured (module docstring, When a call is captured); setting it
        arms (True) or disarms (False)."""
        return self._armed

    @armed.setter
    def armed(self, value: bool) -> None:
        if value:
            self.arm()
        else:
            self.disarm()

    def arm(self) -> None:
        """Capture the following forward calls (and their output gradients)."""
        self._armed = True

    def disarm(self) -> None:
        """Stop capturing forward calls; output gradients of calls already captured still arrive, and
        the statistics gathered so far stay until ``clear()``."""
        self._armed = False

    def clear(self) -> None:
        """Drop every layer's statistics and counts (after consuming them, or to discard a step the
        GradScaler skipped); output gradients of forwards done before this call are ignored."""
        self._generation += 1
        for layer in self.layers.values():
            layer._reset()

    def set_grad_scale(self, scale: float | torch.Tensor | torch.amp.GradScaler | None) -> None:
        """Divide output gradients by ``scale`` before handing them over (as float32): a number, a 0-d
        tensor (read when each backward runs, so in-place updates are seen), or a GradScaler (its
        current scale tensor, without a host synchronization; nothing when it is disabled). None:
        gradients are handed over as they are."""
        if isinstance(scale, bool) or not (scale is None or isinstance(scale, (int, float, torch.Tensor,
                                                                              torch.amp.GradScaler))):
            raise TypeError(f"scale: expected a number, a tensor, a GradScaler or None, got {scale!r}")
        if isinstance(scale, (int, float)) and not scale > 0:
            raise ValueError(f"scale: expected a number > 0, got {scale!r}")
        self._scale = scale

    def other_params(self) -> dict[str, nn.Parameter]:
        """Parameters of the model that no selected layer's weight or bias is, by name (no DDP prefix),
        in ``named_parameters()`` order: they get the base optimizer's first-order update."""
        captured = {id(p) for layer in self.layers.values()
                    for p in (layer.module.weight, layer.module.bias) if p is not None}
        return {name: p for name, p in self.model.named_parameters() if id(p) not in captured}

    @classmethod
    def trainable(cls, model: nn.Module, skip_layers: Iterable[str | type] = (), **kwargs) -> "LayerCapture":
        """A capture of the selected layers whose weight is trained (frozen ones are skipped).

        Raises ValueError for a layer whose weight is trained but whose bias is frozen: a Kronecker
        factor with a bias column cannot precondition half of a layer.
        """
        skip_layers = tuple(skip_layers)
        capture = cls(model, skip_layers, **kwargs)
        frozen = [name for name, layer in capture.layers.items() if not layer.module.weight.requires_grad]
        if frozen:
            capture.remove()
            capture = cls(model, skip_layers + tuple(frozen), **kwargs)
        for name, layer in capture.layers.items():
            if layer.has_bias and not layer.module.bias.requires_grad:
                capture.remove()
                raise ValueError(f"layer {name!r}: the weight is trained but the bias is frozen; "
                                 "add the layer to skip_layers")
        return capture

    def remove(self) -> None:
        """Remove the hooks from the model (the capture captures nothing afterwards)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- hooks ----------------------------------------------------------------------------------

    def _forward_hook(self, layer: CapturedLayer):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            if not (self._armed and module.training and torch.is_grad_enabled()):
                return
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"layer {layer.name!r} returned {type(output).__name__}; captured layers "
                                "must return one tensor (skip it)")
            if not output.requires_grad:
                return
            call = _call_info(layer, layer.calls, output)
            layer.calls += 1
            layer.input_row_count += call.batch_size * call.positions
            if self.input_fn is not None:
                x = args[0] if args else kwargs["input"]
                with torch.no_grad(), torch.autocast(x.device.type, enabled=False), configs_per_rank():
                    stat = self.input_fn(layer, call, _input_rows(layer, x.detach()))
                layer.input_stat = _sum_into(layer.input_stat, stat)
            output.register_hook(self._grad_hook(layer, call, self._generation))
        return hook

    def _current_scale(self) -> float | torch.Tensor | None:
        scale = self._scale
        if isinstance(scale, torch.amp.GradScaler):
            # the scale tensor itself (GradScaler.get_scale() would synchronize with the device)
            return scale._get_scale_async() if scale.is_enabled() else None
        return scale

    def _grad_hook(self, layer: CapturedLayer, call: CallInfo, generation: int):
        def hook(grad: torch.Tensor) -> None:
            if generation != self._generation:
                return
            layer.grad_calls += 1
            layer.grad_output_row_count += call.batch_size * call.positions
            if layer.loss_average is not None:
                layer.loss_term_sum += loss_term_count(call, layer.loss_average)
            if self.grad_output_fn is None:
                return
            with torch.no_grad(), torch.autocast(grad.device.type, enabled=False), configs_per_rank():
                rows = _grad_output_rows(layer, grad.detach())
                scale = self._current_scale()
                if scale is not None:
                    rows = rows.to(torch.promote_types(rows.dtype, torch.float32)) / scale
                stat = self.grad_output_fn(layer, call, rows)
            layer.grad_output_stat = _sum_into(layer.grad_output_stat, stat)
        return hook
