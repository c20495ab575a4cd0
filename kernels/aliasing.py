"""The aliasing check every kernel launcher shares: :func:`check_no_overlap`.

A kernel writes its outputs (tensors updated in place, ``out=`` arguments) from many programs at once
while other programs still read their inputs tile by tile. Two written tensors sharing memory (a
parameter passed twice, one step counter for several tensors, one ``out`` for two layers, a factor
passed twice) make programs read-modify-write the same addresses and lose updates; a written tensor
sharing memory with an input (``out=x``) makes programs read half-written values. On a GPU the result
is silently wrong in a run-dependent way; the sequential interpreter and the PyTorch references can
hide it. So every public kernel with an in-place or ``out=`` argument calls :func:`check_no_overlap`
before it dispatches (both paths reject the same calls), with a ``ValueError`` naming both arguments.
Disjoint views of one buffer (the layers of one flat gradient buffer, column blocks of one matrix)
are allowed; a kernel that supports a particular alias (``eigen_precondition(..., out=grads)``, which
reads every gradient before it writes any) leaves that pair out of the check.

Host work only (addresses, sizes, strides; no device synchronisation, works on any device).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .dispatch import is_dense

#: an argument: one tensor, a sequence of tensors (None entries are skipped), or None
Arguments = torch.Tensor | Sequence[torch.Tensor | None] | None


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
    written: Sequence[tuple[str, Arguments]],
    read: Sequence[tuple[str, Arguments]] = (),
    *,
    writer: str = "the step",
) -> None:
    """ValueError unless every tensor a kernel writes owns its memory (module docstring).

    ``written``/``read`` are ``(argument name, tensors)`` pairs: a sequence of tensors (entries are
    labelled ``name[i]``) or one tensor (labelled ``name``); ``None`` (an argument or an entry) and
    empty tensors are ignored. Rejected, with a message naming both entries (``"steps[3] is the same tensor as
    steps[0]"``, ``"exp_avgs[1] overlaps the memory of params[0]"``, ``"x overlaps the memory of out (out
    is written by the kernel)"``): two written entries sharing any byte -- within one list or across
    lists --, a read entry sharing memory with a written one, and a written tensor whose elements overlap
    each other (a stride-0, expanded dimension). Read entries may share memory with each other (one
    gradient passed for several tensors, one factor for several layers). ``writer`` names the caller in
    the message ("the step", "the kernel").

    Host work only (addresses, sizes, strides; no device synchronisation): each tensor's byte span
    ``[data_ptr, data_ptr + extent)``, one sort and a sweep -- about 0.5 us per tensor. Only when spans
    meet are the pairs examined: dense tensors fill their span, so meeting spans overlap; strided views
    with gaps are decided exactly -- two views of one layout (column blocks of one fused matrix) by
    address arithmetic, other pairs by comparing their element addresses (remembered per layout pair).
    """
    los, his, refs = [], [], []  # refs[k] = (tensor, label, writes, contiguous)
    for writes, groups in ((True, written), (False, read)):
        for name, seq in groups:
            if seq is None:
                continue
            single = isinstance(seq, torch.Tensor)
            for i, t in enumerate((seq,) if single else seq):
                if t is None:
                    continue
                nbytes = t.nbytes
                if not nbytes:
                    continue
                label = name if single else f"{name}[{i}]"
                lo = t.data_ptr()
                contiguous = t.is_contiguous()
                if contiguous:
                    hi = lo + nbytes
                else:
                    if writes and any(st == 0 and s > 1 for s, st in zip(t.shape, t.stride())):
                        raise ValueError(f"{label} has elements that share memory (an expanded view): {writer} "
                                         "writes it, so every element needs its own memory")
                    hi = lo + t.element_size() * (1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride())))
                los.append(lo)
                his.append(hi)
                refs.append((t, label, writes, contiguous))
    order = sorted(range(len(los)), key=los.__getitem__)
    end = -1
    for k in order:
        if los[k] < end:
            break
        end = max(end, his[k])
    else:
        return  # no two spans meet: the common case
    _report_overlap(los, his, refs, order, writer)


def _report_overlap(los, his, refs, order, writer: str) -> None:
    """The slow path of :func:`check_no_overlap`: sweep the spans (sorted by start, then argument order)
    and raise for the first pair that really shares memory and involves a written tensor."""
    order = sorted(order, key=lambda k: (los[k], k))
    seen_read = set()
    active: list[int] = []
    for k in order:
        t, label, writes, contiguous = refs[k]
        if not writes:  # one gradient passed for several tensors: a single entry
            key = (los[k], his[k], tuple(t.shape), t.stride(), t.dtype)
            if key in seen_read:
                continue
            seen_read.add(key)
        active = [a for a in active if his[a] > los[k]]
        for a in active:
            u, _, a_writes, a_contiguous = refs[a]
            if not (writes or a_writes):
                continue
            dense = (contiguous or is_dense(t)) and (a_contiguous or is_dense(u))
            if not dense and not _elements_overlap(u, t):
                continue
            first, second = refs[min(a, k)], refs[max(a, k)]  # in argument order
            f, s = first[0], second[0]
            same = (f.data_ptr() == s.data_ptr() and f.shape == s.shape and f.stride() == s.stride()
                    and f.dtype == s.dtype)
            role = "" if first[2] and second[2] else f" ({(first if first[2] else second)[1]} is written by {writer})"
            raise ValueError(
                f"{second[1]} {'is the same tensor as' if same else 'overlaps the memory of'} {first[1]}{role}: "
                f"{writer} writes its tensors from many programs at once while others read, so each tensor it "
                "writes needs memory of its own, shared with no other argument (a parameter or factor passed "
                "twice, a shared step counter, an out aliasing an input: silently wrong results on a GPU)"
            )
        active.append(k)
