"""Multi-tensor machinery: tensor tables, the global gradient norm, and per-tensor norm reductions.

A multi-tensor kernel updates many tensors in one launch. The launcher packs a *table* per call
(``TensorTable``): for tensor ``i`` the addresses of its columns (param, grad, state...), its element
count, and per-tensor hyperparameters; every tensor is cut into chunks of ``CHUNK`` elements and a
program handles one chunk, looking up its tensor in the chunk table. Tensors whose storage dtypes
differ go to separate launches over consecutive ranges of the same tables.

Global gradient norm (one pass over every gradient of the call, then one reduction program)::

    n = ||g_all||_2,   coef = min(1, max_norm / n)  (1 when clipping is off),
    ok = every g is finite and sum(g^2) does not overflow fp32.

When ``ok`` is 0 the optimizer kernels write nothing: the step is skipped for every tensor and a
skip counter is incremented, all on the device (no host synchronisation).

Per-tensor norms are reduced in two levels -- one partial sum per chunk, then one program per tensor
adds its chunks in a fixed order -- so results are bit-reproducible (no atomics) and identical on
every rank of a data-parallel job.

**Precision on the GPU.** On sm_90 (Triton 3.6 to 3.9) fp32 ``tl.sqrt`` compiles to
``sqrt.approx.ftz.f32``, fp32 ``/`` to ``div.full.f32`` (both ~2 ulp; ``ftz`` flushes denormals to 0),
``tl.exp``/``tl.exp2`` to ``ex2.approx`` (~2^-22 relative) and ``tl.rsqrt`` to ``rsqrt.approx.ftz``
(``tl.log``/``tl.log2`` are accurate libdevice code), while the interpreter computes all of them
exactly with numpy. Everything here whose error could move a result or flip a decision uses the
correctly rounded forms: the norms feeding trust ratios and clip coefficients are ``tl.sqrt_rn``
(``sqrt.rn.f32``), the ratios ``tl.div_rn`` (``div.rn.f32``). Adam-style bias corrections are formed
by :func:`inv_bias_correction`: ``1 / (1 - b^t)`` in float64 on the device from ``ln b`` computed on
the host in float64 (:func:`log_decays`), because ``1 - b^t`` cancels: for b = 0.999 at t = 1 an
approximate ``exp2(t log2 b)`` has ~1e-4 relative error in ``1 - b^t`` (0.9999: ~1e-3), and even the
exact power of the fp32-rounded b has up to ~3e-8 / (1 - b) (float64 ``exp`` and division compile to
FMA sequences and ``div.rn.f64``, no approximate instruction). The result is within ~1 fp32 ulp of
``1 / (1 - b^t)``, set by the fp32 rounding of ln b. ``tests/test_trust_ratio_kernels.py`` checks the
kernels' sm_90 PTX for approximate instructions.

**Aliasing.** The kernels update their tensors in place from many programs at once: two list
entries sharing memory (one ``steps`` scalar for several tensors, a parameter passed twice, state
tensors aliasing each other) would make programs read-modify-write the same addresses and lose
updates on a GPU (the sequential interpreter hides this). :func:`check_no_overlap` rejects that on
the host from the tensors' addresses and strides (no device synchronisation).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import triton
import triton.language as tl

from kfopt.autotune import Config, ConfigSpace

from .dispatch import is_dense, tl_dtype

FP32_MAX = tl.constexpr(3.4028234663852886e38)
REDUCE_BLOCK = 1024


def chunked_configs(kernel: str) -> ConfigSpace:
    """The config space of a chunked multi-tensor pipeline: elements per inner block, chunk, warps."""
    return ConfigSpace(
        kernel,
        [
            Config({"BLOCK": block, "CHUNK": block * iters}, num_warps=warps)
            for block in (512, 1024, 2048)
            for iters in (4, 8, 16)
            for warps in (4, 8)
        ],
        default=Config({"BLOCK": 1024, "CHUNK": 8192}, num_warps=4),
    )


@dataclass
class TensorTable:
    """Device-side description of one multi-tensor call (see the module docstring).

    ``addr[i, c]`` holds the address of column ``c`` of tensor ``i``; ``hyper[i]`` its
    hyperparameters; chunk ``k`` covers elements ``chunk_start[k] : chunk_start[k] + CHUNK`` of tensor
    ``chunk_tensor[k]``; tensor ``i`` owns chunks ``bounds[i, 0] : bounds[i, 1]``.
    ``launches`` lists ``(first chunk, end chunk, dtypes of the columns)`` per launch.
    """

    n: int
    n_chunks: int
    addr: torch.Tensor
    numel: torch.Tensor
    bounds: torch.Tensor
    chunk_start: torch.Tensor
    chunk_tensor: torch.Tensor
    hyper: torch.Tensor
    launches: list[tuple[int, int, tuple]]

    @classmethod
    def build(
        cls,
        columns: Sequence[Sequence[torch.Tensor]],
        hyper: Sequence[Sequence[float]],
        chunk: int,
        device: torch.device,
        dtype_columns: Sequence[int],
    ) -> "TensorTable":
        """Pack ``columns[c][i]`` (all dense, equal shape per ``i``) and ``hyper[i]`` for a launch.

        Tensors are grouped (stably) by the dtypes of ``dtype_columns``; callers address tensors by
        their position in ``columns``, which the table keeps.
        """
        n = len(columns[0])
        keys = tuple(tuple(columns[c][i].dtype for c in dtype_columns) for i in range(n))
        numels = tuple(columns[0][i].numel() for i in range(n))
        layout = _chunk_layout(numels, keys, chunk, device)
        addr = torch.tensor([t.data_ptr() for i in range(n) for t in (col[i] for col in columns)], dtype=torch.int64)
        return cls(
            n=n,
            addr=to_device(addr, device).reshape(n, len(columns)),
            hyper=to_device(torch.tensor(hyper, dtype=torch.float32).reshape(n, -1), device),
            **layout,
        )


@functools.lru_cache(maxsize=64)
def _chunk_layout(numels: tuple, keys: tuple, chunk: int, device: torch.device) -> dict:
    """The parts of a table that depend only on sizes and dtypes (cached: rebuilt only when they change)."""
    n = len(numels)
    order = sorted(range(n), key=lambda i: [str(d) for d in keys[i]])
    counts = torch.tensor([triton.cdiv(numels[i], chunk) for i in order], dtype=torch.int64)
    chunk_tensor = torch.repeat_interleave(torch.tensor(order, dtype=torch.int64), counts)
    first_in_order = torch.cumsum(counts, 0) - counts
    chunk_start = (torch.arange(len(chunk_tensor)) - torch.repeat_interleave(first_in_order, counts)) * chunk
    bounds = torch.empty((n, 2), dtype=torch.int64)
    bounds[torch.tensor(order, dtype=torch.int64)] = torch.stack([first_in_order, first_in_order + counts], 1)
    launches, pos = [], 0
    for key, group in itertools.groupby(order, key=lambda i: keys[i]):
        end = pos + sum(triton.cdiv(numels[i], chunk) for i in group)
        launches.append((pos, end, key))
        pos = end
    return dict(
        n_chunks=len(chunk_tensor),
        numel=to_device(torch.tensor(numels, dtype=torch.int64), device),
        bounds=to_device(bounds, device),
        chunk_start=to_device(chunk_start, device),
        chunk_tensor=to_device(chunk_tensor, device),
        launches=launches,
    )


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without a host synchronisation (pinned, non-blocking) on CUDA."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def dense_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is laid out exactly like ``like`` (dense, same strides); else a copy that is."""
    if t.stride() == like.stride() and is_dense(t):
        return t
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


def log_decays(name: str, beta, n: int, enabled: Sequence[bool] | None = None) -> list[float]:
    """``ln(beta_i)`` in float64 for each of ``n`` tensors (``beta`` a scalar or one per tensor, as for
    :func:`per_tensor`), for :func:`inv_bias_correction` (``1 - beta^t = -expm1(t ln beta)``).

    ``-inf`` where ``beta_i = 0`` or ``enabled[i]`` is False (bias correction off): both give
    ``1 - beta^t = 1``. ValueError naming ``name`` (``name[i]`` for a sequence) unless ``0 <= beta_i < 1``
    (else ``1 - beta^t`` is 0 or negative).
    """
    logs = []
    for i, (b, on) in enumerate(zip(per_tensor(name, beta, n), enabled if enabled is not None else [True] * n)):
        if not on:
            logs.append(-math.inf)
            continue
        b = float(b)
        if not 0.0 <= b < 1.0:
            label = f"{name}[{i}]" if isinstance(beta, (list, tuple)) else name
            raise ValueError(f"{label}: bias correction needs a decay rate in [0, 1), got {b!r}")
        logs.append(math.log(b) if b > 0.0 else -math.inf)
    return logs


def _element_addresses(t: torch.Tensor) -> torch.Tensor:
    """Sorted start addresses of the elements of ``t`` (host int64; the rare exact-overlap path)."""
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride
    return torch.sort(t.data_ptr() + offsets.reshape(-1) * t.element_size()).values


def _offset_representable(diff: int, dims: list[tuple[int, int]]) -> bool:
    """Whether ``diff = sum_k c_k stride_k`` with ``|c_k| <= size_k - 1``; ``dims`` = [(stride, size)] by
    decreasing stride, each stride above the span of the smaller ones (so c_k is floor or ceil of
    the quotient: at most two branches per dimension)."""
    if not dims:
        return diff == 0
    (stride, size), smaller = dims[0], dims[1:]
    rest = sum((sz - 1) * st for st, sz in smaller)
    q = diff // stride
    return any(abs(c) <= size - 1 and abs(diff - c * stride) <= rest and _offset_representable(diff - c * stride, smaller)
               for c in (q, q + 1))


def _lattice_overlap(a: torch.Tensor, b: torch.Tensor) -> bool | None:
    """Exact overlap of two views with one shape, strides and dtype (e.g. interleaved column blocks of
    one matrix), decided from the address difference alone; None where that does not apply."""
    if a.shape != b.shape or a.stride() != b.stride() or a.dtype != b.dtype:
        return None
    diff, size = b.data_ptr() - a.data_ptr(), a.element_size()
    if diff % size:
        return None
    dims = sorted(((st, sz) for sz, st in zip(a.shape, a.stride()) if sz > 1), reverse=True)
    span = 0
    for st, sz in reversed(dims):  # increasing strides: each must exceed the span below it
        if st <= span:
            return None
        span += (sz - 1) * st
    return _offset_representable(diff // size, dims)


#: verdicts of the exact element-by-element comparison, by the two layouts (a step repeats its tensors)
_OVERLAP_VERDICTS: dict[tuple, bool] = {}


def _elements_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether some element of ``a`` shares a byte with some element of ``b``: by address arithmetic for
    two views of one layout, else by comparing element addresses (O(numel log numel), remembered)."""
    lattice = _lattice_overlap(a, b)
    if lattice is not None:
        return lattice
    key = tuple((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype) for t in (a, b))
    if key not in _OVERLAP_VERDICTS:
        if len(_OVERLAP_VERDICTS) >= 4096:
            _OVERLAP_VERDICTS.clear()
        _OVERLAP_VERDICTS[key] = _element_addresses_overlap(a, b)
    return _OVERLAP_VERDICTS[key]


def _element_addresses_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The exact comparison: sorted element addresses of both, one search."""
    ea, eb = _element_addresses(a), _element_addresses(b)
    sa, sb = a.element_size(), b.element_size()
    k = torch.searchsorted(eb, ea - sb, right=True)  # the first b-element starting after x - sb ...
    hit = k < eb.numel()
    return bool((eb[k[hit]] < ea[hit] + sa).any())  # ... starts before x + sa


def check_no_overlap(
    written: Sequence[tuple[str, Sequence[torch.Tensor | None]]],
    read: Sequence[tuple[str, Sequence[torch.Tensor]]] = (),
) -> None:
    """ValueError unless every tensor the kernels write owns its memory.

    ``written``/``read`` are ``(argument name, tensors)`` pairs (``None`` entries and empty tensors are
    ignored). Rejected, with a message naming both entries (``"steps[3] is the same tensor as
    steps[0]"``, ``"exp_avgs[1] overlaps the memory of params[0]"``): two written entries sharing any
    byte -- within one list or across lists --, a read entry sharing memory with a written one, and a
    written tensor whose elements overlap each other (a stride-0, expanded dimension). Read entries may
    share memory with each other (one gradient passed for several tensors).

    Host work only (addresses, sizes, strides; no device synchronisation): each tensor's byte span
    ``[data_ptr, data_ptr + extent)``, one sort and a sweep -- about 0.5 us per tensor. Only when spans
    meet are the pairs examined: dense tensors fill their span, so meeting spans overlap; strided views
    with gaps are decided exactly -- two views of one layout (column blocks of one fused matrix) by
    address arithmetic, other pairs by comparing their element addresses (remembered per layout pair).
    """
    los, his, refs = [], [], []  # refs[k] = (tensor, name, index, writes, contiguous)
    for writes, groups in ((True, written), (False, read)):
        for name, seq in groups:
            for i, t in enumerate(seq):
                if t is None:
                    continue
                nbytes = t.nbytes
                if not nbytes:
                    continue
                lo = t.data_ptr()
                contiguous = t.is_contiguous()
                if contiguous:
                    hi = lo + nbytes
                else:
                    if writes and any(st == 0 and s > 1 for s, st in zip(t.shape, t.stride())):
                        raise ValueError(f"{name}[{i}] has elements that share memory (an expanded view): the "
                                         "step writes it in place, so every element needs its own memory")
                    hi = lo + t.element_size() * (1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride())))
                los.append(lo)
                his.append(hi)
                refs.append((t, name, i, writes, contiguous))
    order = sorted(range(len(los)), key=los.__getitem__)
    end = -1
    for k in order:
        if los[k] < end:
            break
        end = max(end, his[k])
    else:
        return  # no two spans meet: the common case
    _report_overlap(los, his, refs, order)


def _report_overlap(los, his, refs, order) -> None:
    """The slow path of :func:`check_no_overlap`: sweep the spans (sorted by start, then argument order)
    and raise for the first pair that really shares memory and involves a written tensor."""
    order = sorted(order, key=lambda k: (los[k], k))
    seen_read = set()
    active: list[int] = []
    for k in order:
        t, name, i, writes, contiguous = refs[k]
        if not writes:  # one gradient passed for several tensors: a single entry
            key = (los[k], his[k], tuple(t.shape), t.stride(), t.dtype)
            if key in seen_read:
                continue
            seen_read.add(key)
        active = [a for a in active if his[a] > los[k]]
        for a in active:
            u, a_name, a_i, a_writes, a_contiguous = refs[a]
            if not (writes or a_writes):
                continue
            dense = (contiguous or is_dense(t)) and (a_contiguous or is_dense(u))
            if not dense and not _elements_overlap(u, t):
                continue
            first, second = refs[min(a, k)], refs[max(a, k)]  # in argument order
            f, s = first[0], second[0]
            same = (f.data_ptr() == s.data_ptr() and f.shape == s.shape and f.stride() == s.stride()
                    and f.dtype == s.dtype)
            label = lambda ref: f"{ref[1]}[{ref[2]}]"  # noqa: E731
            role = "" if first[3] and second[3] else f" ({label(first if first[3] else second)} is written by the step)"
            raise ValueError(
                f"{label(second)} {'is the same tensor as' if same else 'overlaps the memory of'} {label(first)}"
                f"{role}: the step updates its tensors in place from many programs at once, so each written tensor "
                "needs memory of its own (a shared step counter, a parameter passed twice or aliased state would "
                "lose updates on a GPU)"
            )
        active.append(k)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def program_chunk(chunk_tensor_ptr, chunk_start_ptr, numel_ptr):
    """This program's chunk of a ``TensorTable`` launch (one program per chunk): ``(pid, tensor index,
    first element of the chunk, numel of the tensor)``."""
    pid = tl.program_id(0)
    tid = tl.load(chunk_tensor_ptr + pid)
    return pid, tid, tl.load(chunk_start_ptr + pid), tl.load(numel_ptr + tid)


@triton.jit
def trust_ratio(w_norm, u_norm, coef, lo, hi, adapt):
    """``clamp(coef * ||w|| / ||u||, lo, hi)``; 1 when either norm is 0 or adaptation is off.
    The division is correctly rounded (``div.rn.f32`` on the GPU, not the ~2 ulp ``div.full.f32``)."""
    ratio = tl.div_rn(coef * w_norm, tl.where(u_norm > 0, u_norm, 1.0))
    r = tl.where((w_norm > 0) & (u_norm > 0), tl.minimum(tl.maximum(ratio, lo), hi), 1.0)
    return tl.where(adapt != 0, r, 1.0)


@triton.jit
def inv_bias_correction(t, ln_b):
    """``1 / (1 - b^t)`` as fp32, for step ``t`` (fp32; values below 1 -- a skipped step whose result is
    never used -- count as 1) and ``ln_b = ln b`` (:func:`log_decays`; ``-inf`` gives 1). Computed in
    float64 (``exp`` and the division compile to exact FMA sequences and ``div.rn.f64`` on sm_90, numpy
    under the interpreter): ``1 - exp(t ln b)`` has an absolute error ~1e-16, so the result is within
    ~1 fp32 ulp, the fp32 rounding of ``ln b`` included."""
    x = tl.maximum(t, 1.0).to(tl.float64) * ln_b.to(tl.float64)
    return (1.0 / (1.0 - tl.exp(x))).to(tl.float32)


@triton.jit
def _grad_sumsq_kernel(
    addr_ptr, addr_stride, g_col, numel_ptr, chunk_tensor_ptr, chunk_start_ptr, partial_ptr,
    G_DT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    """partial[k] = (sum of g^2 over the finite elements of chunk k, count of non-finite elements)."""
    pid, tid, start, n = program_chunk(chunk_tensor_ptr, chunk_start_ptr, numel_ptr)
    g_ptr = tl.load(addr_ptr + tid * addr_stride + g_col).to(tl.pointer_type(G_DT))
    sq = tl.zeros([BLOCK], tl.float32)
    bad = tl.zeros([BLOCK], tl.float32)
    for off in range(0, CHUNK, BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        finite = tl.abs(g) <= FP32_MAX
        sq += tl.where(finite, g * g, 0.0)
        bad += tl.where(finite, 0.0, 1.0)
    tl.store(partial_ptr + pid * 2, tl.sum(sq, axis=0))
    tl.store(partial_ptr + pid * 2 + 1, tl.sum(bad, axis=0))


@triton.jit
def _clip_coef_kernel(
    partial_ptr, n_chunks, max_norm, clip_ptr, skipped_ptr,
    HAS_CLIP: tl.constexpr, HAS_SKIPPED: tl.constexpr, RBLOCK: tl.constexpr,
):
    """clip = (||g_all||, min(1, max_norm / ||g_all||), ok); skipped += 1 - ok."""
    sq = tl.zeros([RBLOCK], tl.float32)
    bad = tl.zeros([RBLOCK], tl.float32)
    for off in range(0, n_chunks, RBLOCK):
        idx = off + tl.arange(0, RBLOCK)
        mask = idx < n_chunks
        sq += tl.load(partial_ptr + idx * 2, mask=mask, other=0.0)
        bad += tl.load(partial_ptr + idx * 2 + 1, mask=mask, other=0.0)
    total = tl.sum(sq, axis=0)
    ok = (tl.sum(bad, axis=0) == 0) & (total <= FP32_MAX)
    norm = tl.sqrt_rn(total)
    coef = 1.0
    if HAS_CLIP:
        coef = tl.minimum(tl.div_rn(max_norm, norm), 1.0)
    tl.store(clip_ptr, norm)
    tl.store(clip_ptr + 1, coef)
    tl.store(clip_ptr + 2, ok.to(tl.float32))
    if HAS_SKIPPED:
        tl.store(skipped_ptr, tl.load(skipped_ptr) + 1 - ok.to(tl.int32))


@triton.jit
def _segment_norms_kernel(
    partial_ptr, bounds_ptr, norms_ptr, addr_ptr, addr_stride, step_col, clip_ptr,
    INCREMENT_STEP: tl.constexpr, RBLOCK: tl.constexpr,
):
    """norms[i] = sqrt of the summed 2-column partials of tensor i's chunks (correctly rounded, no flush
    to zero: a tiny norm stays > 0); step_i += ok if asked."""
    tid = tl.program_id(0)
    lo = tl.load(bounds_ptr + tid * 2)
    hi = tl.load(bounds_ptr + tid * 2 + 1)
    a = tl.zeros([RBLOCK], tl.float32)
    b = tl.zeros([RBLOCK], tl.float32)
    for off in range(lo, hi, RBLOCK):
        idx = off + tl.arange(0, RBLOCK)
        mask = idx < hi
        a += tl.load(partial_ptr + idx * 2, mask=mask, other=0.0)
        b += tl.load(partial_ptr + idx * 2 + 1, mask=mask, other=0.0)
    tl.store(norms_ptr + tid * 2, tl.sqrt_rn(tl.sum(a, axis=0)))
    tl.store(norms_ptr + tid * 2 + 1, tl.sqrt_rn(tl.sum(b, axis=0)))
    if INCREMENT_STEP:
        step_ptr = tl.load(addr_ptr + tid * addr_stride + step_col).to(tl.pointer_type(tl.float32))
        tl.store(step_ptr, tl.load(step_ptr) + tl.load(clip_ptr + 2))


# ----------------------------------------------------------------------------- launchers


def launch_global_norm(
    table: TensorTable, g_col: int, g_dtype_pos: int, max_norm: float | None,
    skipped: torch.Tensor | None, config, device: torch.device,
) -> torch.Tensor:
    """Run the gradient-norm pass and its reduction; returns ``clip = [norm, coef, ok]`` (fp32, device)."""
    partial = torch.empty((max(table.n_chunks, 1), 2), dtype=torch.float32, device=device)
    for lo, hi, dtypes in table.launches:
        if hi > lo:
            _grad_sumsq_kernel[(hi - lo,)](
                table.addr, table.addr.stride(0), int(g_col), table.numel,
                table.chunk_tensor[lo:hi], table.chunk_start[lo:hi], partial[lo:hi],
                G_DT=tl_dtype(dtypes[g_dtype_pos]), BLOCK=config["BLOCK"], CHUNK=config["CHUNK"],
                num_warps=config.num_warps,
            )
    clip = torch.empty(3, dtype=torch.float32, device=device)
    has_clip = max_norm is not None and max_norm > 0
    _clip_coef_kernel[(1,)](
        partial, table.n_chunks, float(max_norm) if has_clip else 0.0, clip,
        skipped if skipped is not None else clip,
        HAS_CLIP=has_clip, HAS_SKIPPED=skipped is not None, RBLOCK=REDUCE_BLOCK,
    )
    return clip


def launch_segment_norms(
    table: TensorTable, partial: torch.Tensor, clip: torch.Tensor, step_col: int | None,
) -> torch.Tensor:
    """Per-tensor ``[norm of column 0, norm of column 1]`` from chunk partials (and step += ok)."""
    norms = torch.empty((max(table.n, 1), 2), dtype=torch.float32, device=partial.device)
    if table.n:
        _segment_norms_kernel[(table.n,)](
            partial, table.bounds, norms, table.addr, table.addr.stride(0),
            int(step_col) if step_col is not None else 0, clip,
            INCREMENT_STEP=step_col is not None, RBLOCK=REDUCE_BLOCK,
        )
    return norms


def for_each_launch(table: TensorTable, launch: Callable[[int, int, tuple], None]) -> None:
    """Call ``launch(lo, hi, dtypes)`` for every non-empty launch range of the table."""
    for lo, hi, dtypes in table.launches:
        if hi > lo:
            launch(lo, hi, dtypes)


# ----------------------------------------------------------------------------- reference


def global_norm_reference(
    grads: Sequence[torch.Tensor], max_norm: float | None, skipped: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch reference of the gradient-norm pass: ``[norm, coef, ok]`` in the grads' math dtype."""
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=dtype, device=device)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    for g in grads:
        g = g.to(dtype)
        finite = torch.isfinite(g)
        total = total + torch.where(finite, g * g, 0).sum()
        bad = bad | ~finite.all()
    ok = ~bad & torch.isfinite(total)
    norm = total.sqrt()
    coef = torch.ones((), dtype=dtype, device=device)
    if max_norm is not None and max_norm > 0:
        coef = torch.clamp(max_norm / norm, max=1.0)
    if skipped is not None:
        skipped.add_((~ok).to(skipped.dtype))
    return torch.stack([norm, coef, ok.to(dtype)])


def trust_ratio_reference(w_norm, u_norm, coef: float, lo: float, hi: float, adapt: bool) -> torch.Tensor:
    """PyTorch twin of :func:`trust_ratio`."""
    if not adapt:
        return torch.ones_like(w_norm)
    r = torch.clamp(coef * w_norm / u_norm, lo, hi)
    return torch.where((w_norm > 0) & (u_norm > 0), r, torch.ones_like(r))


def per_tensor(name: str, value, n: int) -> list:
    """Broadcast a scalar hyperparameter to ``n`` tensors, or check a sequence has length ``n``."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: expected one value per tensor ({n}), got {len(value)}")
        return list(value)
    return [value] * n
