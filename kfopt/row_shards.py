"""Whole-row shards of layers' gradient matrices under FSDP2/HSDP, and the exchange that brings each
layer's matrix to one owner rank and its result back to the shards.

Row chunks
    FSDP2 (``fully_shard``) shards a parameter on dim 0 as ``torch.chunk`` does: ``R`` rows over the
    ``W`` ranks of the shard group give ``c = ceil(R / W)`` and rank ``r`` holds rows
    ``[min(r c, R), min((r + 1) c, R))``; the last ranks' chunks are shorter or empty (33 rows on 4
    ranks: 9, 9, 9, 6; 3 rows on 4 ranks: 1, 1, 1, 0). A Linear or Conv2d weight ``(out, ...)`` and its
    bias ``(out,)`` are chunked alike, so a rank's part of the layer's gradient matrix ``[dW | db]``
    (``R = out`` rows, ``C = in kh kw [+ 1]`` columns) is a block of whole rows.

Owners
    Preconditioning ``G^-1 [dW | db] A^-1`` mixes all rows, so each layer gets one owner rank in the
    shard group, which holds the layer's second-order data and preconditions its whole matrix. Owners
    are KAISA's longest-processing-time assignment (``kfopt.kaisa.lpt_assignment``, one group of all
    ranks of the shard group) over ``kfopt.kaisa.layer_cost((C, R), strategy)``: the factor sides are
    ``dA = C`` and ``dG = R``, so ``"compute"`` balances the decomposition flops ``C^3 + R^3`` and
    ``"memory"`` the second-order data ``C^2 + R^2`` each owner keeps. Owners are ranks *within* the
    shard group; under HSDP every replicate group computes the same assignment.

Exchange
    ``gather_to_owners`` sends every rank's row block of every layer to the layer's owner and
    ``scatter_from_owners`` sends each owner's ``(R, C)`` result back as the row blocks of the ranks
    holding them: each is one ``all_to_all_single`` over the shard group for all layers (gloo and NCCL
    both have it, with uneven and empty splits). The blocks travel as bytes (``uint8`` views), so layers
    of different dtypes share the collective and a result arrives bit-identical. A send buffer is laid
    out destination-major, the layers of one destination in layer order; a rank's own rows go through
    the same buffer (a local copy, no network traffic). The split sizes follow from the plan alone: no
    host synchronisation besides the collective itself. On a one-rank group no collective runs.

Volume per step (per rank ``r`` of the shard group; ``e`` bytes per element, ``o_l`` the owner)
    gather: sends ``sum_{l: o_l != r} |rows_l(r)| C_l e_l`` and receives
    ``sum_{l: o_l = r} (R_l - |rows_l(r)|) C_l e_l``; the scatter sends what the gather received and
    receives what it sent. Summed over the ranks the round trip moves ``2 sum_l (R_l - |rows_l(o_l)|)
    C_l e_l``, about ``2 (W - 1) / W`` of the gradients. FSDP2's own reduce-scatter of the same
    gradients pads each to ``W ceil(R_l / W)`` rows and sends, per rank, ``(W - 1) ceil(R_l / W) C_l
    e_l`` summed over the layers (the ring algorithm's count, the lower bound of any reduce-scatter),
    about ``(W - 1) / W`` of the gradients per rank: averaged over the ranks the exchange is about
    ``2 / W`` of it, while an owner sends (and receives) about its owned matrices whatever ``W``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from . import collectives
from .kaisa import Strategy, layer_cost, lpt_assignment


def row_range(rows: int, ranks: int, rank: int) -> range:
    """The rows ``[min(rank c, rows), min((rank + 1) c, rows))``, ``c = ceil(rows / ranks)``, that
    ``rank`` of ``ranks`` holds of a dim-0 shard of ``rows`` rows (module docstring)."""
    chunk = -(-rows // ranks)
    return range(min(rank * chunk, rows), min((rank + 1) * chunk, rows))


def row_ranges(rows: int, ranks: int) -> list[range]:
    """``[row_range(rows, ranks, r) for r in range(ranks)]``: every rank's rows, in rank order."""
    return [row_range(rows, ranks, r) for r in range(ranks)]


@dataclass(frozen=True)
class StepVolume:
    """Bytes one rank of the shard group moves per step (module docstring): ``gather_sent`` and
    ``gather_received`` over the network by the gather (the scatter sends what the gather received and
    receives what it sent), ``reduce_scatter`` sent (and received) by FSDP2's reduce-scatter of the same
    gradients."""

    gather_sent: int
    gather_received: int
    reduce_scatter: int

    @property
    def exchange(self) -> int:
        """Bytes the rank sends (= receives) in the gather and the scatter together."""
        return self.gather_sent + self.gather_received


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class RowShardPlan:
    """Which rows of which layer each rank holds, and which rank owns each layer: layer ``l``'s gradient
    matrix has ``shapes[l] = (R, C)`` and ``dtypes[l]``, lives on ``device``, is row-chunked over the
    ``ranks`` ranks of the shard group and owned by group rank ``owners[l]``. Every rank of the group
    must use an equal plan. Build one with :meth:`balanced` (KAISA's assignment) or give the owners."""

    shapes: tuple[tuple[int, int], ...]
    dtypes: tuple[torch.dtype, ...]
    ranks: int
    owners: tuple[int, ...]
    device: torch.device = torch.device("cpu")

    def __post_init__(self):
        """Normalises the fields (``dtypes`` may be one dtype for all layers, ``device`` a string);
        ValueError naming the argument when a shape is not two ints >= 1, a dtype is not a
        ``torch.dtype``, the counts differ or an owner is not a rank in ``[0, ranks)``."""
        shapes = tuple(self.shapes)
        for i, shape in enumerate(shapes):
            if (not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2
                    or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape)):
                raise ValueError(f"shapes[{i}]: expected (rows, cols), two ints >= 1, got {shape!r}")
        dtypes = (self.dtypes,) * len(shapes) if isinstance(self.dtypes, torch.dtype) else tuple(self.dtypes)
        if len(dtypes) != len(shapes) or not all(isinstance(d, torch.dtype) for d in dtypes):
            raise ValueError(f"dtypes: expected a torch.dtype or one per layer ({len(shapes)}), got {self.dtypes!r}")
        ranks = _positive_int("ranks", self.ranks)
        owners = tuple(self.owners)
        if len(owners) != len(shapes):
            raise ValueError(f"owners: expected one per layer ({len(shapes)}), got {len(owners)}")
        for i, o in enumerate(owners):
            if isinstance(o, bool) or not isinstance(o, int) or not 0 <= o < ranks:
                raise ValueError(f"owners[{i}]: expected a rank in [0, {ranks}), got {o!r}")
        object.__setattr__(self, "shapes", tuple((r, c) for r, c in shapes))
        object.__setattr__(self, "dtypes", dtypes)
        object.__setattr__(self, "owners", owners)
        object.__setattr__(self, "device", torch.device(self.device))

    @classmethod
    def balanced(cls, shapes: Sequence[tuple[int, int]], dtypes: torch.dtype | Sequence[torch.dtype], ranks: int,
                 strategy: Strategy = "compute", device: torch.device | str = "cpu") -> "RowShardPlan":
        """The plan whose owners are KAISA's LPT assignment over ``layer_cost((C, R), strategy)``
        (module docstring)."""
        shapes = tuple(shapes)
        plan = cls(shapes, dtypes, ranks, (0,) * len(shapes), device)  # checks the arguments
        costs = [layer_cost((cols, rows), strategy) for rows, cols in plan.shapes]
        return dataclasses.replace(plan, owners=tuple(lpt_assignment(costs, [list(range(ranks))])))

    def rows(self, layer: int, rank: int) -> range:
        """The rows of ``layer`` that group rank ``rank`` holds."""
        return row_range(self.shapes[layer][0], self.ranks, rank)

    def _row_bytes(self, layer: int) -> int:
        return self.shapes[layer][1] * self.dtypes[layer].itemsize

    @functools.cached_property
    def _held_bytes(self) -> tuple[tuple[int, ...], ...]:
        """``[layer][rank]``: the bytes of ``layer``'s rows that ``rank`` holds (computed once: the
        exchanges of every step read it)."""
        return tuple(tuple(len(self.rows(layer, rank)) * self._row_bytes(layer) for rank in range(self.ranks))
                     for layer in range(len(self.shapes)))

    @functools.cached_property
    def _owned(self) -> tuple[tuple[int, ...], ...]:
        """``[rank]``: the layers ``rank`` owns, in layer order."""
        return tuple(tuple(layer for layer, owner in enumerate(self.owners) if owner == rank)
                     for rank in range(self.ranks))

    def gather_splits(self, rank: int) -> tuple[list[int], list[int]]:
        """``(sent, received)``: the bytes group rank ``rank`` sends to and receives from each group rank
        in the gather (its own entry: the local copy). The scatter's are ``(received, sent)``."""
        sent = [0] * self.ranks
        for layer, owner in enumerate(self.owners):
            sent[owner] += self._held_bytes[layer][rank]
        received = [sum(self._held_bytes[layer][source] for layer in self._owned[rank])
                    for source in range(self.ranks)]
        return sent, received

    def volume(self, rank: int) -> StepVolume:
        """Bytes group rank ``rank`` moves per step (module docstring)."""
        sent, received = self.gather_splits(rank)
        padded_rows = sum(-(-rows // self.ranks) * self._row_bytes(layer)
                          for layer, (rows, _) in enumerate(self.shapes))
        return StepVolume(sum(sent) - sent[rank], sum(received) - received[rank], (self.ranks - 1) * padded_rows)


class PendingExchange:
    """An exchange in flight (``async_op=True``): ``wait()`` returns its result (the list the blocking
    call returns). The call copied its inputs into the send buffer, so they may be reused at once."""

    def __init__(self, work, finish: Callable[[], list]):
        self._work, self._finish, self._result = work, finish, None

    def wait(self) -> list:
        if self._finish is not None:
            if self._work is not None:
                self._work.wait()
            self._result, self._finish = self._finish(), None
        return self._result


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat ``uint8`` view of ``t``'s elements in row-major order (a copy if ``t`` is not contiguous)."""
    return t.contiguous().view(-1).view(torch.uint8)


def _group_rank(plan: RowShardPlan, group) -> int:
    if not isinstance(plan, RowShardPlan):
        raise ValueError(f"plan: expected a RowShardPlan, got {type(plan).__name__}")
    me, size = collectives.rank(group), collectives.world_size(group)
    if me < 0:
        raise ValueError("group: this rank is not a member of the process group")
    if size != plan.ranks:
        raise ValueError(f"group: has {size} ranks, the plan was built for {plan.ranks}")
    return me


def _all_to_all(plan: RowShardPlan, send: torch.Tensor, sent: list[int], received: list[int], group,
                async_op: bool) -> tuple[torch.Tensor, object]:
    """The receive buffer and the collective's work (None when no collective runs: one rank)."""
    if plan.ranks == 1:
        return send, None
    recv = torch.empty(sum(received), dtype=torch.uint8, device=plan.device)
    work = dist.all_to_all_single(recv, send, received, sent, group=group, async_op=async_op)
    return recv, work


def _check_tensor(name: str, t, shape: tuple[int, int], plan: RowShardPlan, layer: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape or t.dtype != plan.dtypes[layer] or t.device != plan.device:
        raise ValueError(f"{name}: expected shape {shape}, {plan.dtypes[layer]} on {plan.device} for layer "
                         f"{layer}, got {tuple(t.shape)}, {t.dtype} on {t.device}")


def gather_to_owners(plan: RowShardPlan, blocks: Sequence[torch.Tensor], group: dist.ProcessGroup | None = None,
                     async_op: bool = False) -> list[torch.Tensor | None] | PendingExchange:
    """Each layer's whole ``(R, C)`` matrix on its owner, None on the other ranks, from ``blocks[l]``:
    this rank's rows ``plan.rows(l, rank)`` of layer ``l`` (shape ``(len(rows), C)``, possibly empty).
    One ``all_to_all_single`` over ``group`` (None: the world) for all layers; the matrices are new
    tensors, bit-identical to the blocks they are made of. With ``async_op`` a :class:`PendingExchange`
    whose ``wait()`` returns the list. ValueError naming the argument before any communication."""
    me = _group_rank(plan, group)
    blocks = list(blocks)
    if len(blocks) != len(plan.shapes):
        raise ValueError(f"blocks: expected one per layer ({len(plan.shapes)}), got {len(blocks)}")
    for layer, block in enumerate(blocks):
        _check_tensor(f"blocks[{layer}]", block, (len(plan.rows(layer, me)), plan.shapes[layer][1]), plan, layer)
    sent, received = plan.gather_splits(me)
    order = sorted(range(len(blocks)), key=lambda layer: plan.owners[layer])  # destination-major, stable
    send = torch.cat([_as_bytes(blocks[layer]) for layer in order]) if blocks else \
        torch.empty(0, dtype=torch.uint8, device=plan.device)
    recv, work = _all_to_all(plan, send, sent, received, group, async_op)

    def assemble() -> list[torch.Tensor | None]:
        mine = plan._owned[me]
        pieces = {layer: [] for layer in mine}
        offset = 0
        for source in range(plan.ranks):  # the receive buffer is source-major, layers in order
            for layer in mine:
                n = plan._held_bytes[layer][source]
                pieces[layer].append(recv[offset:offset + n])
                offset += n
        out: list[torch.Tensor | None] = [None] * len(blocks)
        for layer in mine:
            out[layer] = torch.cat(pieces[layer]).view(plan.dtypes[layer]).view(plan.shapes[layer])
        return out

    pending = PendingExchange(work, assemble)
    return pending if async_op else pending.wait()


def scatter_from_owners(plan: RowShardPlan, results: Sequence[torch.Tensor | None],
                        group: dist.ProcessGroup | None = None,
                        async_op: bool = False) -> list[torch.Tensor] | PendingExchange:
    """The inverse of :func:`gather_to_owners`: ``results[l]`` is layer ``l``'s ``(R, C)`` matrix on its
    owner and None on the other ranks; returns, for every layer, this rank's rows ``plan.rows(l, rank)``
    of it (new tensors, bit-identical). One ``all_to_all_single`` over ``group`` for all layers; with
    ``async_op`` a :class:`PendingExchange`. ValueError naming the argument before any communication."""
    me = _group_rank(plan, group)
    results = list(results)
    if len(results) != len(plan.shapes):
        raise ValueError(f"results: expected one per layer ({len(plan.shapes)}), got {len(results)}")
    mine = plan._owned[me]
    for layer, (result, owner) in enumerate(zip(results, plan.owners)):
        if owner == me:
            _check_tensor(f"results[{layer}]", result, plan.shapes[layer], plan, layer)
        elif result is not None:
            raise ValueError(f"results[{layer}]: layer {layer} is owned by group rank {owner}, not this rank "
                             f"({me}): expected None")
    received, sent = plan.gather_splits(me)
    flat = {layer: _as_bytes(results[layer]) for layer in mine}
    pieces = []
    for dest in range(plan.ranks):  # destination-major, layers in order
        for layer in mine:
            rows, row_bytes = plan.rows(layer, dest), plan._row_bytes(layer)
            pieces.append(flat[layer][rows.start * row_bytes:rows.stop * row_bytes])
    send = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.uint8, device=plan.device)
    recv, work = _all_to_all(plan, send, sent, received, group, async_op)

    def unpack() -> list[torch.Tensor]:
        out: list[torch.Tensor] = [None] * len(results)
        offset = 0
        for source in range(plan.ranks):  # source-major, the source's layers in order
            for layer in plan._owned[source]:
                n = plan._held_bytes[layer][me]
                shape = (len(plan.rows(layer, me)), plan.shapes[layer][1])
                out[layer] = recv[offset:offset + n].clone().view(plan.dtypes[layer]).view(shape)
                offset += n
        return out

    pending = PendingExchange(work, unpack)
    return pending if async_op else pending.wait()
