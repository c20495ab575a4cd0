"""The halo rows SONew's band needs from the neighbouring shards of a sharded parameter (FSDP2, HSDP).

A parameter sharded on dim 0 holds, on each rank of the shard group, the rows ``[o, o + n)`` of its
row-major flattened tensor of ``N`` entries. SONew's lag-``j`` statistics couple entries ``i`` and
``i + j`` (``j <= b``), so the direction of the rows ``[o, o + n)`` depends on the gradient and the old
statistics of the ``b`` rows on each side: ``o - b .. o - 1`` and ``o + n .. o + n + b - 1`` (those that
exist). A shard may be shorter than ``b`` (or empty, FSDP2 pads the last ranks), so these rows may come
from several ranks.

One all-gather per step over the shard group carries them for every tensor: each rank contributes,
per tensor, its offset ``o``, its length ``n`` and the first and last ``min(b, n)`` entries of the
gradient, ``mu``, ``nu_d`` and the ``b`` lag statistics (float64, so that offsets and every fp32 or
16-bit value are exact); every rank then picks the entries of its halo by global index, on the device
(no host synchronisation). Any entry within ``b`` of a shard's ends is within ``b`` of that shard's
first or last ``b`` entries, so the halo is complete.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kfopt.kernels.multi_tensor import to_device


@dataclass(frozen=True)
class HaloRequest:
    """One tensor's part of the exchange: its band ``b`` (>= 1), the offset ``o`` of its local rows in the
    flattened whole tensor of ``total`` entries, and its local rows of the ``3 + b`` quantities (flat,
    length ``n`` each): the stored gradient, ``mu``, ``nu_d``, the lag-1..b statistics."""

    band: int
    offset: int
    total: int
    rows: tuple[torch.Tensor, ...]

    @property
    def left(self) -> int:
        """How many halo rows exist before the local ones."""
        return min(self.band, self.offset)

    @property
    def right(self) -> int:
        """How many halo rows exist after the local ones."""
        n = self.rows[0].numel()
        return max(0, min(self.band, self.total - self.offset - n))


def _contribution(req: HaloRequest, head: torch.Tensor) -> torch.Tensor:
    """``[o, n, first (3 + b, b), last (3 + b, b)]`` flat, float64 (``head``: ``[o, n]`` on the device):
    the first ``min(b, n)`` entries left-aligned, the last ``min(b, n)`` right-aligned, zeros elsewhere."""
    b, rows = req.band, torch.stack([r.reshape(-1).to(torch.float64) for r in req.rows])
    n, k = rows.shape[1], min(req.band, rows.shape[1])
    first = rows.new_zeros((rows.shape[0], b))
    last = rows.new_zeros((rows.shape[0], b))
    first[:, :k] = rows[:, :k]
    last[:, b - k:] = rows[:, n - k:]
    return torch.cat([head, first.reshape(-1), last.reshape(-1)])


def _pick(segment: torch.Tensor, req: HaloRequest) -> torch.Tensor:
    """This rank's halo of ``req`` (``(3 + b, 2 b)``, fp32; columns ``0..b-1`` the rows ``o - b .. o - 1``,
    ``b..2b-1`` the rows ``o + n .. o + n + b - 1``, zero where a row does not exist) from every rank's
    contribution (``segment``: ``(world, 2 + 2 (3 + b) b)``)."""
    b, q = req.band, 3 + req.band
    world = segment.shape[0]
    offsets, lengths = segment[:, :1], segment[:, 1:2]
    values = torch.cat([segment[:, 2:2 + q * b].reshape(world, q, b),
                        segment[:, 2 + q * b:].reshape(world, q, b)], dim=2)  # (world, q, 2b)
    s = torch.arange(b, dtype=torch.float64, device=segment.device)[None, :]
    keys = torch.cat([offsets + s, offsets + lengths - b + s], dim=1)  # global index of each entry
    # every index once: the first block's entries that exist, then the last block's not already in it
    valid = torch.cat([s < lengths, lengths - b + s >= b], dim=1)
    n = req.rows[0].numel()
    h = torch.arange(2 * b, dtype=torch.float64, device=segment.device)
    targets = torch.where(h < b, req.offset - b + h, req.offset + n - b + h)  # the halo's global indices
    match = valid[None] & (keys[None] == targets[:, None, None])  # (2b, world, 2b)
    match = match.reshape(2 * b, -1)
    source = match.to(torch.uint8).argmax(dim=1)
    halo = values.permute(1, 0, 2).reshape(q, -1)[:, source]
    return torch.where(match.any(dim=1)[None, :], halo, 0).to(torch.float32)


def exchange_halos(requests: list[HaloRequest], group) -> list[torch.Tensor]:
    """Every request's halo (``(3 + b, 2 b)`` fp32, see :func:`_pick`) through one all-gather over
    ``group`` (every rank of it must make the same requests, in the same order, with its own rows)."""
    if not requests:
        return []
    heads = torch.tensor([[r.offset, r.rows[0].numel()] for r in requests], dtype=torch.float64)
    heads = to_device(heads, requests[0].rows[0].device)  # no host synchronisation
    mine = torch.cat([_contribution(r, head) for r, head in zip(requests, heads)])
    world = dist.get_world_size(group)
    gathered = torch.empty(world * mine.numel(), dtype=mine.dtype, device=mine.device)
    dist.all_gather_single(gathered, mine, group=group)
    gathered = gathered.view(world, -1)
    halos, at = [], 0
    for req in requests:
        width = 2 + 2 * (3 + req.band) * req.band
        halos.append(_pick(gathered[:, at:at + width], req))
        at += width
    return halos


def flat_offset(p) -> int:
    """The index of the first local entry of DTensor ``p`` in its flattened whole tensor (sharded on
    dim 0, so the local entries are contiguous there)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return offset[0] * math.prod(p.shape[1:]) if p.dim() else 0
