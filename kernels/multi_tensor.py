"""Multi-tensor machinery: tensor tables, the global gradient norm, and per-tensor norm reductions.

A multi-tensor kernel updates many tensors in one launch. The launcher packs a *table* per call
(``TensorTable``): for tensor ``i`` the addresses of its columns (param, grad, state...), its element
count, and per-tensor hyperparameters; every tensor is cut into chunks of ``CHUNK`` elements and a
program handles one chunk, looking up its tensor in the chunk table. Tensors whose storage dtypes
differ go to separate launches over consecutive ranges of the same tables.

Global gradient norm (one pass over every gradient of the call, then one reduction program)::

    n = ||g_all||_2,   coef = min(1, max_norm / n)  (1 when clipping is off),
    ok = every g is finite and sum(g^2) does not overflow fp32.

Under a GradScaler (``grad_scale``: the scale the stored gradients carry, ``found_inf``: the scaler's
verdict, both device tensors) ``g`` above is the *unscaled* gradient ``g_stored / grad_scale`` (formed
in fp32 on load, so fp16 gradients lose nothing), ``coef`` also carries ``1 / grad_scale`` (the kernels
multiply the stored gradients by ``coef``) and ``ok`` is also 0 when ``found_inf`` is nonzero.

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
the host in float64 (``op_declaration.log_decay``), because ``1 - b^t`` cancels: for b = 0.999 at t = 1 an
approximate ``exp2(t log2 b)`` has ~1e-4 relative error in ``1 - b^t`` (0.9999: ~1e-3), and even the
exact power of the fp32-rounded b has up to ~3e-8 / (1 - b) (float64 ``exp`` and division compile to
FMA sequences and ``div.rn.f64``, no approximate instruction). The result is within ~1 fp32 ulp of
``1 / (1 - b^t)``, set by the fp32 rounding of ln b. ``tests/test_trust_ratio_kernels.py`` checks the
kernels' sm_90 PTX for approximate instructions.

**Aliasing.** The kernels update their tensors in place from many programs at once: two list
entries sharing memory would lose updates on a GPU. Every launcher rejects that on the host with
:func:`kfopt.kernels.aliasing.check_no_overlap`.
"""

from __future__ import annotations

import functools
import itertools
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
        hyper: Sequence[Sequence[float]] | torch.Tensor,
        chunk: int,
        device: torch.device,
        dtype_columns: Sequence[int],
    ) -> "TensorTable":
        """Pack ``columns[c][i]`` (all dense, equal shape per ``i``) and ``hyper[i]`` (numbers, or an fp32
        tensor on ``device``) for a launch.

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
            hyper=hyper if isinstance(hyper, torch.Tensor) else
            to_device(torch.tensor(hyper, dtype=torch.float32).reshape(n, -1), device),
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
    never used -- count as 1) and ``ln_b = ln b`` (``op_declaration.log_decay``; ``-inf`` gives 1). Computed in
    float64 (``exp`` and the division compile to exact FMA sequences and ``div.rn.f64`` on sm_90, numpy
    under the interpreter): ``1 - exp(t ln b)`` has an absolute error ~1e-16, so the result is within
    ~1 fp32 ulp, the fp32 rounding of ``ln b`` included."""
    x = tl.maximum(t, 1.0).to(tl.float64) * ln_b.to(tl.float64)
    return (1.0 / (1.0 - tl.exp(x))).to(tl.float32)


@triton.jit
def _grad_sumsq_kernel(
    addr_ptr, addr_stride, g_col, numel_ptr, chunk_tensor_ptr, chunk_start_ptr, partial_ptr, inv_scale_ptr,
    G_DT: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    """partial[k] = (sum of g^2 over the finite elements of chunk k, count of non-finite elements);
    ``g`` unscaled by ``inv_scale`` when HAS_SCALE."""
    pid, tid, start, n = program_chunk(chunk_tensor_ptr, chunk_start_ptr, numel_ptr)
    g_ptr = tl.load(addr_ptr + tid * addr_stride + g_col).to(tl.pointer_type(G_DT))
    inv_scale = 1.0
    if HAS_SCALE:
        inv_scale = tl.load(inv_scale_ptr)
    sq = tl.zeros([BLOCK], tl.float32)
    bad = tl.zeros([BLOCK], tl.float32)
    for off in range(0, CHUNK, BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        if HAS_SCALE:
            g = g * inv_scale
        finite = tl.abs(g) <= FP32_MAX
        sq += tl.where(finite, g * g, 0.0)
        bad += tl.where(finite, 0.0, 1.0)
    tl.store(partial_ptr + pid * 2, tl.sum(sq, axis=0))
    tl.store(partial_ptr + pid * 2 + 1, tl.sum(bad, axis=0))


@triton.jit
def _clip_coef_kernel(
    partial_ptr, n_chunks, max_norm, clip_ptr, skipped_ptr, inv_scale_ptr, found_inf_ptr,
    HAS_CLIP: tl.constexpr, HAS_SKIPPED: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    RBLOCK: tl.constexpr,
):
    """clip = (||g_all||, min(1, max_norm / ||g_all||) [* inv_scale], ok [and not found_inf]);
    skipped += 1 - ok."""
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
    if HAS_SCALE:
        coef = coef * tl.load(inv_scale_ptr)
    if HAS_FOUND_INF:
        ok = ok & (tl.load(found_inf_ptr) == 0)
    tl.store(clip_ptr, norm)
    tl.store(clip_ptr + 1, coef)
    tl.store(clip_ptr + 2, ok.to(tl.float32))
    if HAS_SKIPPED:
        tl.store(skipped_ptr, tl.load(skipped_ptr) + 1 - ok.to(tl.int32))


@triton.jit
def _segment_norms_kernel(
    partial_ptr, bounds_ptr, norms_ptr, addr_ptr, addr_stride, step_col, clip_ptr,
    INCREMENT_STEP: tl.constexpr, SQRT: tl.constexpr, RBLOCK: tl.constexpr,
):
    """norms[i] = sqrt of the summed 2-column partials of tensor i's chunks (correctly rounded, no flush
    to zero: a tiny norm stays > 0); without ``SQRT`` the sums themselves (a shard's part of the squared
    norms, before the all-reduce); step_i += ok if asked."""
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
    sa = tl.sum(a, axis=0)
    sb = tl.sum(b, axis=0)
    if SQRT:
        sa = tl.sqrt_rn(sa)
        sb = tl.sqrt_rn(sb)
    tl.store(norms_ptr + tid * 2, sa)
    tl.store(norms_ptr + tid * 2 + 1, sb)
    if INCREMENT_STEP:
        step_ptr = tl.load(addr_ptr + tid * addr_stride + step_col).to(tl.pointer_type(tl.float32))
        tl.store(step_ptr, tl.load(step_ptr) + tl.load(clip_ptr + 2))


# ----------------------------------------------------------------------------- launchers


def launch_global_norm(
    table: TensorTable, g_col: int, g_dtype_pos: int, max_norm: float | None,
    skipped: torch.Tensor | None, config, device: torch.device,
    grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run the gradient-norm pass and its reduction; returns ``clip = [norm, coef, ok]`` (fp32, device).
    ``grad_scale``/``found_inf``: a GradScaler's (module docstring), as from :func:`amp_tensors`.
    ``reduce``: sharded tensors (module docstring): sums this rank's ``[sum g^2, non-finite count]``
    with the other shards' in place before the coefficient is formed."""
    partial = torch.empty((max(table.n_chunks, 1), 2), dtype=torch.float32, device=device)
    clip = torch.empty(3, dtype=torch.float32, device=device)
    inv_scale = grad_scale.double().reciprocal().float() if grad_scale is not None else clip
    for lo, hi, dtypes in table.launches:
        if hi > lo:
            _grad_sumsq_kernel[(hi - lo,)](
                table.addr, table.addr.stride(0), int(g_col), table.numel,
                table.chunk_tensor[lo:hi], table.chunk_start[lo:hi], partial[lo:hi], inv_scale,
                G_DT=tl_dtype(dtypes[g_dtype_pos]), HAS_SCALE=grad_scale is not None, BLOCK=config["BLOCK"],
                CHUNK=config["CHUNK"], num_warps=config.num_warps,
            )
    has_clip = max_norm is not None and max_norm > 0
    n_partials = table.n_chunks
    if reduce is not None:
        partial = partial[:table.n_chunks].sum(0, keepdim=True)
        reduce(partial)
        n_partials = 1
    _clip_coef_kernel[(1,)](
        partial, n_partials, float(max_norm) if has_clip else 0.0, clip,
        skipped if skipped is not None else clip, inv_scale, found_inf if found_inf is not None else clip,
        HAS_CLIP=has_clip, HAS_SKIPPED=skipped is not None, HAS_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None, RBLOCK=REDUCE_BLOCK,
    )
    return clip


def amp_tensors(grad_scale, found_inf, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A GradScaler's ``grad_scale`` and ``found_inf`` (None: absent) checked as 0-d floating tensors and
    moved to ``device`` as fp32 (without a host synchronisation)."""
    checked = []
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None:
            if not isinstance(t, torch.Tensor) or t.numel() != 1 or not t.is_floating_point():
                raise TypeError(f"{name}: expected a one-element floating tensor (a GradScaler's), got {t!r}")
            t = t.reshape(()).to(device=device, dtype=torch.float32, non_blocking=True)
        checked.append(t)
    return checked[0], checked[1]


def launch_segment_norms(
    table: TensorTable, partial: torch.Tensor, clip: torch.Tensor, step_col: int | None,
    reduce: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Per-tensor ``[norm of column 0, norm of column 1]`` from chunk partials (and step += ok).
    ``reduce``: sharded tensors: the per-tensor sums of squares of this rank are summed with the other
    shards' in place (one collective for all tensors) before the square roots."""
    norms = torch.empty((max(table.n, 1), 2), dtype=torch.float32, device=partial.device)
    if table.n:
        _segment_norms_kernel[(table.n,)](
            partial, table.bounds, norms, table.addr, table.addr.stride(0),
            int(step_col) if step_col is not None else 0, clip,
            INCREMENT_STEP=step_col is not None, SQRT=reduce is None, RBLOCK=REDUCE_BLOCK,
        )
    if reduce is not None:
        reduce(norms)
        norms = norms.sqrt()
    return norms


def launch_chunks(kernel, table: TensorTable, config, args: Callable[[int, int], tuple], **constexprs) -> None:
    """Run a chunked kernel (one program per chunk) over every launch range ``[lo, hi)`` of ``table``::

        kernel[(hi - lo,)](addr, numel, chunk_tensor[lo:hi], chunk_start[lo:hi], hyper, *args(lo, hi),
                           P_DT=, G_DT=, [D_DT=,] BLOCK=, CHUNK=, **constexprs, num_warps=)

    ``P_DT``/``G_DT``/``D_DT`` (the element types of the range's dtype columns: params, grads, and a
    third where the table has one, e.g. the graft's directions) only where the kernel takes them."""
    for lo, hi, dtypes in table.launches:
        if hi > lo:
            dts = {name: tl_dtype(d) for name, d in zip(("P_DT", "G_DT", "D_DT"), dtypes) if name in kernel.arg_names}
            kernel[(hi - lo,)](table.addr, table.numel, table.chunk_tensor[lo:hi], table.chunk_start[lo:hi],
                               table.hyper, *args(lo, hi), **dts, BLOCK=config["BLOCK"], CHUNK=config["CHUNK"],
                               **constexprs, num_warps=config.num_warps)


# ----------------------------------------------------------------------------- reference


def global_norm_reference(
    grads: Sequence[torch.Tensor], max_norm: float | None, skipped: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """PyTorch reference of the gradient-norm pass: ``[norm, coef, ok]`` in the grads' math dtype
    (``reduce``: as for :func:`launch_global_norm`)."""
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    device = grads[0].device if grads else torch.device("cpu")
    inv_scale = grad_scale.double().reciprocal().float().to(dtype) if grad_scale is not None else None
    total = torch.zeros((), dtype=dtype, device=device)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    for g in grads:
        g = g.to(dtype) if inv_scale is None else g.to(dtype) * inv_scale
        finite = torch.isfinite(g)
        total = total + torch.where(finite, g * g, 0).sum()
        bad = bad | ~finite.all()
    if reduce is not None:
        sums = torch.stack([total, bad.to(dtype)])
        reduce(sums)
        total, bad = sums[0], sums[1] != 0
    ok = ~bad & torch.isfinite(total)
    norm = total.sqrt()
    coef = torch.ones((), dtype=dtype, device=device)
    if max_norm is not None and max_norm > 0:
        coef = torch.clamp(max_norm / norm, max=1.0)
    if inv_scale is not None:
        coef = coef * inv_scale
    if found_inf is not None:
        ok = ok & (found_inf == 0)
    if skipped is not None:
        skipped.add_((~ok).to(skipped.dtype))
    return torch.stack([norm, coef, ok.to(dtype)])


def tensor_norms_reference(pairs, reduce: Callable[[torch.Tensor], None] | None = None) -> list:
    """``[(||a||, ||b||)]`` for each pair of tensors; with ``reduce`` (sharded tensors) the sums of squares
    of all pairs are summed over the shard group in one collective before the square roots."""
    if reduce is None:
        return [(a.norm(), b.norm()) for a, b in pairs]
    if not pairs:
        return []
    sums = torch.stack([torch.stack([a.square().sum(), b.square().sum()]) for a, b in pairs])
    reduce(sums)
    return list(sums.sqrt().unbind(0))


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
