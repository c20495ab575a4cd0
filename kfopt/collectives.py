"""Typed helpers over ``torch.distributed`` used by kfopt's optimizers.

Every function here is a no-op when ``torch.distributed`` is unavailable or not initialized (a
single-process run): the returned handle's ``wait()`` returns at once and the tensors are left as
they are. With an initialized process group, all ranks of ``group`` must call the same functions
with the same tensor shapes and dtypes in the same order (as for any collective).

Conventions:

* ``group=None`` means the default (world) group. ``src`` of a broadcast is a *global* rank, as in
  ``torch.distributed.broadcast``; it must belong to ``group``.
* Asynchronous functions return a :class:`CollectiveHandle`. Results are written *in place* into the
  tensors that were passed, when ``wait()`` returns (not before: until then the tensors hold their old
  values and must not be modified). ``wait()`` may be called more than once.
* Bucketing: tensors are grouped by (device, dtype), keeping their order, and each group is cut into
  buckets of at most ``bucket_bytes`` bytes (a tensor larger than that gets a bucket of its own). A
  bucket is one flat copy of its tensors and one asynchronous collective; ``wait()`` copies the flat
  result back. Tensors of any layout are accepted (the copies go through ``reshape``/``copy_``).
* Averaging is a SUM all-reduce followed by a division by the group size (gloo has no AVG op), in the
  tensors' own dtype. Only floating-point tensors can be averaged.
* Packed symmetric transfer sends the upper triangle of each (..., d, d) matrix, diagonal included, in
  row-major order (``torch.triu_indices``): d (d + 1) / 2 instead of d^2 elements. The lower triangle
  of the input is not read; the result is exactly symmetric.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.distributed as dist

#: default bucket size of the bucketed collectives (the size DDP uses)
DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024


class _Waitable(Protocol):
    def wait(self) -> object: ...


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of ranks in ``group`` (the world when None); 1 when not distributed."""
    return dist.get_world_size(group) if is_distributed() else 1


def rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank within ``group`` (the world when None); 0 when not distributed, -1 when
    this process is not a member of ``group`` (torch.distributed's convention)."""
    return dist.get_rank(group) if is_distributed() else 0


class CollectiveHandle:
    """Collectives in flight. ``wait()`` waits for each one, then runs its finishing step (division,
    copy back into the caller's tensors); a handle with nothing in flight (no-op) returns at once."""

    def __init__(self, pending: Sequence[tuple[_Waitable, Callable[[], None]]] = ()):
        self._pending = list(pending)

    def wait(self) -> None:
        """Block until every collective finished and its results are in the caller's tensors."""
        pending, self._pending = self._pending, []
        for work, finish in pending:
            work.wait()
            finish()


def _check_tensors(name: str, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor) or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError(f"{name}: expected a sequence of tensors, got {type(tensors).__name__}")
    return list(tensors)


def _check_bucket_bytes(bucket_bytes: int) -> None:
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes: expected an int > 0, got {bucket_bytes!r}")


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Tensors grouped by (device, dtype) in their order, each group cut into buckets of at most
    ``bucket_bytes`` bytes (one oversized tensor forms a bucket alone)."""
    groups: dict[tuple[torch.device, torch.dtype], list[list[torch.Tensor]]] = {}
    filled: dict[tuple[torch.device, torch.dtype], int] = {}
    for t in tensors:
        key, size = (t.device, t.dtype), t.numel() * t.element_size()
        buckets = groups.setdefault(key, [[]])
        if buckets[-1] and filled[key] + size > bucket_bytes:
            buckets.append([])
            filled[key] = 0
        buckets[-1].append(t)
        filled[key] = filled.get(key, 0) + size
    return [bucket for buckets in groups.values() for bucket in buckets]


def _check_member(group: dist.ProcessGroup | None) -> None:
    if rank(group) < 0:
        raise ValueError("this rank is not a member of the process group it was asked to communicate in")


def _flatten(bucket: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in bucket])


def _copy_back(flat: torch.Tensor, bucket: list[torch.Tensor]) -> None:
    offset = 0
    for t in bucket:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view(t.shape))
        offset += n


def all_reduce_average_async(tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None = None,
                             bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> CollectiveHandle:
    """Start averaging ``tensors`` over the ranks of ``group``; after ``handle.wait()`` each tensor
    holds the mean of its values on all ranks. Bucketed (module docstring); floating dtypes only.
    No-op when not distributed or when the group has one rank."""
    tensors = _check_tensors("tensors", tensors)
    _check_bucket_bytes(bucket_bytes)
    for i, t in enumerate(tensors):
        if not t.is_floating_point():
            raise TypeError(f"tensors[{i}]: only floating-point tensors can be averaged, got {t.dtype}")
    _check_member(group)
    size = world_size(group)
    if size == 1 or not tensors:
        return CollectiveHandle()
    pending = []
    for bucket in _buckets(tensors, bucket_bytes):
        flat = _flatten(bucket)
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=True)

        def finish(flat: torch.Tensor = flat, bucket: list[torch.Tensor] = bucket) -> None:
            _copy_back(flat.div_(size), bucket)

        pending.append((work, finish))
    return CollectiveHandle(pending)


def broadcast_async(tensors: Sequence[torch.Tensor], src: int, group: dist.ProcessGroup | None = None,
                    bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> CollectiveHandle:
    """Start sending ``tensors`` from global rank ``src`` to every rank of ``group``; after
    ``handle.wait()`` they hold ``src``'s values on every rank. Any dtype. Bucketed. No-op when not
    distributed."""
    tensors = _check_tensors("tensors", tensors)
    _check_bucket_bytes(bucket_bytes)
    if not is_distributed():
        return CollectiveHandle()
    _check_member(group)
    members = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    if src not in members:
        raise ValueError(f"src={src} is not a rank of the group (its global ranks are {members})")
    if not tensors:
        return CollectiveHandle()
    pending = []
    for bucket in _buckets(tensors, bucket_bytes):
        flat = _flatten(bucket)
        work = dist.broadcast(flat, src=src, group=group, async_op=True)
        if dist.get_rank() == src:
            pending.append((work, lambda: None))
        else:
            pending.append((work, lambda flat=flat, bucket=bucket: _copy_back(flat, bucket)))
    return CollectiveHandle(pending)


def broadcast(tensors: Sequence[torch.Tensor], src: int, group: dist.ProcessGroup | None = None,
              bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """Blocking :func:`broadcast_async`: on return ``tensors`` hold global rank ``src``'s values."""
    broadcast_async(tensors, src, group, bucket_bytes).wait()


def _check_square(name: str, t: torch.Tensor) -> int:
    if t.dim() < 2 or t.shape[-1] != t.shape[-2]:
        raise ValueError(f"{name}: expected (..., d, d) matrices, got shape {tuple(t.shape)}")
    return t.shape[-1]


def pack_upper(sym: torch.Tensor) -> torch.Tensor:
    """Upper triangle (diagonal included, row-major) of each (d, d) matrix of ``sym`` (..., d, d):
    a new tensor (..., d (d + 1) / 2) of the same dtype. The lower triangle is not read."""
    d = _check_square("sym", sym)
    rows, cols = torch.triu_indices(d, d, device=sym.device)
    return sym[..., rows, cols]


def unpack_upper(packed: torch.Tensor, d: int) -> torch.Tensor:
    """The symmetric (..., d, d) matrices whose upper triangles are ``packed`` (..., d (d + 1) / 2),
    as produced by :func:`pack_upper`; a new tensor of ``packed``'s dtype."""
    if packed.dim() < 1 or packed.shape[-1] != d * (d + 1) // 2:
        raise ValueError(f"packed: expected last dimension d (d + 1) / 2 = {d * (d + 1) // 2} for d={d}, "
                         f"got shape {tuple(packed.shape)}")
    rows, cols = torch.triu_indices(d, d, device=packed.device)
    out = packed.new_empty(*packed.shape[:-1], d, d)
    out[..., rows, cols] = packed
    out[..., cols, rows] = packed
    return out


def all_reduce_symmetric_average_async(matrices: Sequence[torch.Tensor], group: dist.ProcessGroup | None = None,
                                       bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> CollectiveHandle:
    """Average symmetric matrices (each (..., d, d), floating) over ``group`` sending only their packed
    upper triangles; after ``handle.wait()`` each matrix holds the symmetric average (upper triangle
    averaged, mirrored to the lower one). ``bucket_bytes`` applies to the packed data. No-op when not
    distributed or when the group has one rank."""
    matrices = _check_tensors("matrices", matrices)
    for i, m in enumerate(matrices):
        _check_square(f"matrices[{i}]", m)
    _check_member(group)
    if world_size(group) == 1:
        return CollectiveHandle()
    packed = [pack_upper(m) for m in matrices]
    inner = all_reduce_average_async(packed, group, bucket_bytes)

    def unpack() -> None:
        for m, p in zip(matrices, packed):
            m.copy_(unpack_upper(p, m.shape[-1]))

    return CollectiveHandle([(inner, unpack)])


def new_groups(rank_lists: Sequence[Sequence[int]]) -> list[dist.ProcessGroup | None]:
    """Create one process group per list of global ranks (e.g. KAISA's grad-worker and receiver
    groups); every rank must call this with the same lists. Returns the groups in order (a rank that
    is not a member gets torch.distributed's non-member placeholder for that group); all None when not
    distributed, which every function here treats as a no-op."""
    size = world_size()
    lists = [list(ranks) for ranks in rank_lists]
    for i, ranks in enumerate(lists):
        if not ranks or len(set(ranks)) != len(ranks) or not all(
                isinstance(r, int) and 0 <= r < size for r in ranks):
            raise ValueError(f"rank_lists[{i}]: expected distinct ranks in [0, {size}), got {ranks!r}")
    if not is_distributed():
        return [None] * len(lists)
    return [dist.new_group(ranks) for ranks in lists]
