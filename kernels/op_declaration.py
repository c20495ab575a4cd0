"""Declarations of the multi-tensor element-wise ops (LAMB, LARS, SONew, grafting): one
:class:`ElementwiseOp` per op, from which its launcher, its reference, its argument checks, its tables
and its traffic model all derive.

An op declares

* **its hyperparameters**: a frozen dataclass whose fields, in order, are the columns of the kernels'
  hyperparameter table (one row per tensor). Fields with ``init=True`` are the public keyword
  arguments of the kernel function and of its reference, with their defaults; fields with
  ``init=False`` are derived columns that ``__post_init__`` forms in float64 (e.g. ``ln b``; on the
  host, or on the device for a tensor value). A field with ``metadata={"from_tensors": True}`` is read off the tensors by the launcher
  (SONew's band), never passed by a caller. ``__post_init__`` raises :class:`HyperparameterError`
  for a bad value; every field ends up a number, or a 0-d float64 tensor on the call's device.
  **Tensor hyperparameters** (one-element floating tensors, e.g. a tensor ``lr``) are used without a
  host synchronisation: the table is assembled on the device, and a value outside its field's
  ``metadata={"range": "[0, inf)"}`` (or NaN) sets the call's ``found_inf``, so the kernels skip the
  whole step and count it in ``skipped``, as for a non-finite gradient. Flags (``bool`` fields) and
  choices must be Python values.
* **its tensors**: :class:`TensorArg` per list argument, in the launcher's order (params first, then
  grads): whether the op writes it, whether it is fp32 state, its shape relative to the param, and
  the layout the Triton kernels need. The address table's columns follow that order, then the
  launcher's scratch buffers.
* **its traffic model**: bytes and flops of one call as a function of the shapes and dtype, which
  ``perf/`` uses for its floors.

The kernels name table columns through :class:`TableColumns`: ``H.beta1`` is the column of ``beta1``
in the hyperparameter table, ``A.exp_avgs`` the column of ``exp_avgs`` in the address table. Adding a
hyperparameter to an op is one field in its record, the kernel line that uses it, and a test.
"""

from __future__ import annotations

import collections
import copy
import math
from dataclasses import MISSING, dataclass, fields
from typing import Callable, Sequence

import torch
import triton.language as tl

from .aliasing import check_no_overlap
from .checks import (
    check_contiguous,
    check_count,
    check_dense,
    check_dtype,
    check_kernel_dtype,
    check_number,
    check_same_device,
    check_strides_like,
)
from .dispatch import use_triton
from .multi_tensor import TensorTable, amp_tensors, per_tensor, to_device


class TableColumns(tl.constexpr):
    """The column ids of a table, as one Triton constexpr: in a kernel ``C.name`` is the column of
    ``name`` and ``C.width`` the number of columns. As a constexpr global its value is part of the
    cache key of every kernel that uses it: a change of layout recompiles them."""

    def __init__(self, names: Sequence[str]):
        if "width" in names or len(set(names)) != len(names):
            raise ValueError(f"column names must be unique and not 'width': {list(names)}")
        layout = collections.namedtuple("Columns", [*names, "width"])
        super().__init__(layout(*range(len(names)), len(names)))

    def __getattr__(self, name: str):
        if name.startswith("_") or name == "value":
            raise AttributeError(name)
        return tl.constexpr(getattr(self.value, name))

    def __iter__(self):
        return iter(self.value._fields[:-1])


class HyperparameterError(ValueError):
    """A bad hyperparameter value, raised by a record's ``__post_init__``; the launcher names the entry."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def number(name: str, value) -> float | torch.Tensor:
    """``value`` as a float (a real Python number; bools count: 0 and 1), or a one-element floating
    tensor as a 0-d float64 tensor on its device; TypeError otherwise."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise TypeError(f"{name}: expected a number or a one-element floating tensor, got a tensor of shape "
                            f"{tuple(value.shape)} and dtype {value.dtype}")
        return value.detach().reshape(()).to(torch.float64)
    check_number(name, value)
    return float(value)


@dataclass(frozen=True)
class Hyperparameters:
    """Base of the ops' hyperparameter records: every init field becomes a float, or a 0-d float64
    tensor for a tensor value (TypeError for anything else, and for a tensor flag; a field with
    ``metadata={"choices": {name: number}}`` takes one of those names, HyperparameterError otherwise),
    then :meth:`derive` fills the derived fields (float64, on the host or on the tensors' device)."""

    def __post_init__(self):
        for f in fields(self):
            if f.init:
                value = getattr(self, f.name)
                choices = f.metadata.get("choices")
                if choices is not None:
                    if not isinstance(value, str) or value not in choices:
                        raise HyperparameterError(f.name, f"expected one of {sorted(choices)}, got {value!r}")
                    value = choices[value]
                if f.type in ("bool", bool) and isinstance(value, torch.Tensor):
                    raise TypeError(f"{f.name}: expected True or False, got a tensor")
                object.__setattr__(self, f.name, number(f.name, value))
        for name, value in self.derive().items():
            object.__setattr__(self, name, value)

    def derive(self) -> dict:
        """The derived fields' values from the init fields."""
        return {}

    def on_host(self):
        """This record with tensor values read into Python numbers, for the PyTorch references (whose
        arithmetic then matches that of the same numbers given as floats; on a GPU this synchronises)."""
        host = copy.copy(self)
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                object.__setattr__(host, f.name, value.item())
        return host

    def out_of_range(self) -> list[torch.Tensor]:
        """For each tensor-valued field with a ``range``: a device bool, True when the value lies outside
        it (NaN included)."""
        flags = []
        for f in fields(self):
            value, interval = getattr(self, f.name), f.metadata.get("range")
            if isinstance(value, torch.Tensor) and interval is not None:
                flags.append(~_inside(value, interval))
        return flags

    def check_ranges(self) -> None:
        """HyperparameterError for a number outside its field's ``range`` (NaN included); tensor values
        are checked on the device (:meth:`out_of_range`). For records whose ranges hold on the host too."""
        for f in fields(self):
            interval = f.metadata.get("range")
            value = getattr(self, f.name) if interval is not None else None
            if interval is not None and not isinstance(value, torch.Tensor) and not _inside(value, interval):
                raise HyperparameterError(f.name, f"expected a number in {interval}, got {value!r}")


def _inside(value, interval: str):
    """Whether ``value`` (a number, or a tensor: elementwise) lies in ``interval`` (False for NaN)."""
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = value > low if interval[0] == "(" else value >= low
    below = value < high if interval[-1] == ")" else value <= high
    return above & below


def within(interval: str) -> dict:
    """Field metadata: the interval a tensor hyperparameter must lie in, e.g. "[0, 1)" or "[0, inf]"."""
    if interval[0] not in "[(" or interval[-1] not in "])" or interval.count(",") != 1:
        raise ValueError(f"expected an interval like '[0, 1)', got {interval!r}")
    return {"range": interval}


def log_decay(name: str, beta: float, enabled: bool = True) -> float:
    """``ln(beta)`` in float64 for ``inv_bias_correction`` (``1 - beta^t = -expm1(t ln beta)``): ``-inf``
    where ``beta = 0`` or bias correction is off (both give ``1 - beta^t = 1``). HyperparameterError
    unless ``0 <= beta < 1`` (else ``1 - beta^t`` is 0 or negative); a tensor ``beta`` is checked on the
    device by its field's range."""
    if not enabled:
        return -math.inf
    if isinstance(beta, torch.Tensor):
        return beta.log()
    if not 0.0 <= beta < 1.0:
        raise HyperparameterError(name, f"bias correction needs a decay rate in [0, 1), got {beta!r}")
    return math.log(beta) if beta > 0.0 else -math.inf


@dataclass(frozen=True)
class TensorArg:
    """A list argument of an op: one tensor per parameter.

    ``shape(t, p)``: what ``t`` should be when it does not fit param ``p`` ("expected ..."; None: it
    fits); ``state``: fp32 on
    the Triton path (float64 also on the reference path); ``layout``: what the Triton kernels need --
    "any" (the launcher copies or reads through a dense copy), "dense", "param_strides" (the strides of
    the param, so one offset addresses both), "contiguous"; ``optional``: an entry may be None (no
    tensor: the checks skip it, the launcher puts a placeholder in its table column)."""

    name: str
    written: bool
    state: bool = False
    shape: Callable[[torch.Tensor, torch.Tensor], str | None] | None = None
    layout: str = "any"
    optional: bool = False


def like_param(t: torch.Tensor, p: torch.Tensor) -> str | None:
    """Shape rule: the shape of the param."""
    return None if t.shape == p.shape else f"expected shape {tuple(p.shape)}, got {tuple(t.shape)}"


def flat_like_param(t: torch.Tensor, p: torch.Tensor) -> str | None:
    """Shape rule: one entry per element of the param, ``(numel,)``."""
    return None if tuple(t.shape) == (p.numel(),) else f"expected shape {(p.numel(),)}, got {tuple(t.shape)}"


def one_element(t: torch.Tensor, p: torch.Tensor) -> str | None:
    """Shape rule: a one-element tensor (a per-tensor counter)."""
    return None if t.numel() == 1 else f"expected a one-element tensor, got shape {tuple(t.shape)}"


@dataclass(frozen=True)
class Traffic:
    """What one call moves and computes: ``bytes`` (each pass's compulsory reads and writes) and
    ``flops`` (arithmetic of the equations per element, summed)."""

    bytes: float
    flops: float


@dataclass(frozen=True)
class Call:
    """One checked call: the tensors by argument name, one hyperparameter record per tensor, the device
    (None without tensors), the skip counter and the GradScaler's tensors (fp32, on the device)."""

    tensors: dict[str, list[torch.Tensor]]
    records: list
    device: torch.device | None
    skipped: torch.Tensor | None
    grad_scale: torch.Tensor | None
    found_inf: torch.Tensor | None


@dataclass(frozen=True)
class ElementwiseOp:
    """The declaration of a multi-tensor element-wise op (module docstring)."""

    name: str
    hyperparameters: type
    tensors: tuple[TensorArg, ...]
    traffic: Callable[..., Traffic]
    scratch: tuple[str, ...] = ()
    dtype_columns: int = 2  # the leading tensor arguments whose dtypes group the launches (params, grads, ...)

    @property
    def hyper(self) -> TableColumns:
        """The hyperparameter table's columns (the record's fields, in order)."""
        return TableColumns([f.name for f in fields(self.hyperparameters)])

    @property
    def addr(self) -> TableColumns:
        """The address table's columns: the tensor arguments, then the scratch buffers."""
        return TableColumns([*(a.name for a in self.tensors), *self.scratch])

    @property
    def public_hyperparameters(self) -> tuple[str, ...]:
        """The keyword arguments a caller passes (the record's init fields not read off the tensors)."""
        return tuple(f.name for f in fields(self.hyperparameters) if f.init and not f.metadata.get("from_tensors"))

    def defaults(self) -> dict:
        """The public hyperparameters' defaults (those that have one)."""
        return {f.name: f.default for f in fields(self.hyperparameters)
                if f.name in self.public_hyperparameters and f.default is not MISSING}

    def records(self, n: int, values: dict, from_tensors: dict | None = None,
                device: torch.device | None = None) -> list:
        """One hyperparameter record per tensor from the caller's ``values`` (a scalar, or one value per
        tensor; tensor values are moved to ``device``) and the launcher's ``from_tensors`` (one value per
        tensor). TypeError for an unknown or missing hyperparameter, ValueError naming the entry
        (``name[i]`` for a list, or for an error a record names after something other than a public
        hyperparameter, e.g. a tensor argument) for a bad value."""
        public = self.public_hyperparameters
        unknown = sorted(set(values) - set(public))
        if unknown:
            raise TypeError(f"{self.name}: unexpected hyperparameter {unknown[0]!r} (expected {', '.join(public)})")
        given = {**self.defaults(), **values}
        missing = [name for name in public if name not in given]
        if missing:
            raise TypeError(f"{self.name}: missing hyperparameter {missing[0]!r}")
        columns = {name: [v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and device is not None else v
                          for v in per_tensor(name, given[name], n)] for name in public}
        columns.update(from_tensors or {})
        out = []
        for i in range(n):
            try:
                out.append(self.hyperparameters(**{name: col[i] for name, col in columns.items()}))
            except HyperparameterError as e:
                per_tensor_value = isinstance(values.get(e.field), (list, tuple)) or e.field not in public
                label = f"{e.field}[{i}]" if per_tensor_value else e.field
                raise ValueError(f"{label}: {e.message}") from None
        return out

    def bind(self, tensors: Sequence[Sequence[torch.Tensor]], values: dict, *, skipped=None, grad_scale=None,
             found_inf=None, from_tensors: Callable[[dict], dict] | None = None) -> Call:
        """Check a call (counts, shapes, hyperparameters, devices, memory shared by written tensors) before
        anything is written, and return it bound. ``tensors``: the list arguments in declared order;
        ``values``: the caller's hyperparameters; ``from_tensors(tensors by name)``: the record fields
        the launcher reads off the tensors."""
        args = {a.name: list(t) for a, t in zip(self.tensors, tensors, strict=True)}
        first = self.tensors[0].name
        params = args[first]
        n = len(params)
        for arg in self.tensors[1:]:
            check_count(arg.name, args[arg.name], n)
            if arg.shape is not None:
                for i, (t, p) in enumerate(zip(args[arg.name], params)):
                    if t is None and arg.optional:
                        continue
                    problem = "expected a tensor, got None" if t is None else arg.shape(t, p)
                    if problem:
                        raise ValueError(f"{arg.name}[{i}]: {problem}")
        device = params[0].device if n else None
        records = self.records(n, values, from_tensors(args) if from_tensors else None, device)
        if n == 0:
            return Call(args, records, None, skipped, None, None)
        check_same_device(device, **args, skipped=skipped)
        check_no_overlap([*((a.name, args[a.name]) for a in self.tensors if a.written), ("skipped", [skipped])],
                         [(a.name, args[a.name]) for a in self.tensors if not a.written])
        grad_scale, found_inf = amp_tensors(grad_scale, found_inf, device)
        out_of_range = [flag for r in records for flag in r.out_of_range()]
        if out_of_range:  # a tensor hyperparameter outside its range skips the step, like an inf gradient
            bad = torch.stack(out_of_range).any().to(torch.float32)
            found_inf = bad if found_inf is None else found_inf + bad
        return Call(args, records, device, skipped, grad_scale, found_inf)

    def run(self, call: Call, reference: Callable[[Call], torch.Tensor],
            launch: Callable[[Call], torch.Tensor] | None) -> torch.Tensor:
        """Route a bound call: ``[0, 0, 0]`` without tensors; ``reference(call)`` where the PyTorch path runs
        (``dispatch.use_triton``) or without ``launch`` (the public reference); else the Triton path's
        checks (:meth:`check_triton`) and ``launch(call)``."""
        if call.device is None:
            return torch.zeros(3)
        if launch is None or not use_triton(call.device):
            return reference(call)
        self.check_triton(call)
        return launch(call)

    def check_triton(self, call: Call) -> None:
        """The Triton path's dtypes and layouts (TypeError for a dtype, ValueError for a layout)."""
        first = self.tensors[0].name
        for arg in self.tensors:
            for i, (t, p) in enumerate(zip(call.tensors[arg.name], call.tensors[first])):
                if t is None:  # an optional entry
                    continue
                label = f"{arg.name}[{i}]"
                if arg.state:
                    check_dtype(label, t, (torch.float32,), "state")
                else:
                    check_kernel_dtype(label, t)
                if arg.layout == "dense":
                    check_dense(label, t)
                elif arg.layout == "param_strides":
                    check_strides_like(label, t, f"{first}[{i}]", p)
                elif arg.layout == "contiguous":
                    check_contiguous(label, t, "the state is flattened row-major")

    def table(self, columns: dict[str, Sequence[torch.Tensor]], records: Sequence, chunk: int,
              device: torch.device) -> TensorTable:
        """The tables of a launch: addresses of ``columns`` (every tensor argument and scratch buffer, by
        name; no None entries) and one hyperparameter row per record; launches grouped by the dtypes of
        the first ``dtype_columns`` tensor arguments (params and grads, and e.g. the graft's directions)."""
        addr = self.addr
        values = [[getattr(r, f.name) for f in fields(r)] for r in records]
        rows = [[0.0 if isinstance(v, torch.Tensor) else float(v) for v in row] for row in values]
        on_device = [(i, j, v) for i, row in enumerate(values) for j, v in enumerate(row)
                     if isinstance(v, torch.Tensor)]
        if on_device:  # the numbers go up in one copy, the tensor values are put in place on the device
            hyper = to_device(torch.tensor(rows, dtype=torch.float32).reshape(len(rows), -1), device)
            i, j, v = zip(*on_device)
            index = to_device(torch.tensor([i, j], dtype=torch.int64), device)
            rows = hyper.index_put_((index[0], index[1]), torch.stack(v).to(torch.float32))
        return TensorTable.build([columns[name] for name in addr], rows, chunk, device,
                                 dtype_columns=tuple(int(addr.value[k]) for k in range(self.dtype_columns)))

    def restore(self, columns: dict[str, Sequence[torch.Tensor]], skipped: torch.Tensor | None) -> list:
        """The buffers a launch writes (snapshotted while autotuning times candidates)."""
        written = [t for a in self.tensors if a.written for t in columns[a.name] if t is not None]
        return written + ([skipped] if skipped is not None else [])
