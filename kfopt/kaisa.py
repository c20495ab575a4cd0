"""KAISA's distribution of K-FAC work (Pauloski et al., SC21): the process grid and the layer assignment.

Process grid, for ``world`` ranks and ``grad_worker_fraction`` f in (0, 1]
    ``grad_workers = max(1, round(world * f))`` ranks precondition each layer; ``world % grad_workers``
    must be 0. With ``n = world // grad_workers``:

    * grad-worker groups ``j = 0 .. n-1``: ``{j, j + n, j + 2n, ...}`` (``grad_workers`` ranks each);
    * receiver groups ``i = 0 .. grad_workers-1``: ``{i n, i n + 1, ..., i n + n - 1}`` (``n`` ranks each).

    Every rank is in exactly one group of each kind, and every receiver group meets every grad-worker
    group in exactly one rank. f = 1 (COMM-OPT): one grad-worker group holding all ranks, receiver
    groups of one rank (no gradient broadcast). f = 1/world (MEM-OPT): grad-worker groups of one rank,
    one receiver group holding all ranks (no eigen-data broadcast). In between (HYBRID-OPT) both.

Assignment (greedy longest-processing-time)
    Each layer gets one *inverse worker*, the rank that decomposes both of its factors (A and G on
    one rank). Layers are taken in order of decreasing cost (ties: layer order); each goes to the
    grad-worker group with the least total cost so far, then to the rank of that group with the least
    cost so far (ties: lowest index). Cost: ``dA^3 + dG^3`` ("compute": eigendecomposition flops) or
    ``dA^2 + dG^2`` ("memory": the eigen data stored). Integer costs and fixed tie-breaks: every rank
    computes the identical assignment.

    The layer's *grad workers* are the ranks of its inverse worker's grad-worker group: they receive
    its eigen data and precondition its gradient. Each other rank receives the preconditioned gradient
    from the one grad worker of the layer in its own receiver group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch.distributed as dist

from . import collectives

Strategy = Literal["compute", "memory"]


def grad_worker_count(world: int, fraction: float) -> int:
    """``max(1, round(world * fraction))`` after checking ``fraction`` in (0, 1] and that it divides
    ``world`` (ValueError naming ``grad_worker_fraction``)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"grad_worker_fraction: expected a number in (0, 1], got {fraction!r}")
    workers = max(1, round(world * fraction))
    if world % workers:
        raise ValueError(f"grad_worker_fraction={fraction} gives {workers} grad workers per layer, which does "
                         f"not divide the world size {world}")
    return workers


def worker_groups(world: int, grad_workers: int) -> list[list[int]]:
    """The grad-worker groups ``{j, j + n, ...}``, j = 0 .. n-1, n = world // grad_workers."""
    n = world // grad_workers
    return [[j + i * n for i in range(grad_workers)] for j in range(n)]


def receiver_groups(world: int, grad_workers: int) -> list[list[int]]:
    """The receiver groups ``{i n, ..., i n + n - 1}``, i = 0 .. grad_workers-1, n = world // grad_workers."""
    n = world // grad_workers
    return [[i * n + j for j in range(n)] for i in range(grad_workers)]


def layer_cost(dims: tuple[int, int], strategy: Strategy) -> int:
    """Cost of a layer with factor sides ``dims = (dA, dG)`` under ``strategy`` (module docstring)."""
    if strategy == "compute":
        return sum(d ** 3 for d in dims)
    if strategy == "memory":
        return sum(d ** 2 for d in dims)
    raise ValueError(f"assignment_strategy: expected 'compute' or 'memory', got {strategy!r}")


def lpt_assignment(costs: Sequence[int], groups: Sequence[Sequence[int]]) -> list[int]:
    """The inverse worker (a global rank) of each layer, given the grad-worker ``groups``: greedy LPT
    (module docstring)."""
    group_load = [0] * len(groups)
    rank_load = {r: 0 for group in groups for r in group}
    owner = [-1] * len(costs)
    for layer in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        g = min(range(len(groups)), key=lambda k: (group_load[k], k))
        r = min(groups[g], key=lambda r: (rank_load[r], r))
        owner[layer] = r
        group_load[g] += costs[layer]
        rank_load[r] += costs[layer]
    return owner


@dataclass(frozen=True)
class KAISAPlan:
    """Who does what, for one rank. ``inverse_workers[l]`` is layer l's inverse worker."""

    world: int
    rank: int
    grad_workers: int
    inverse_workers: tuple[int, ...]

    @classmethod
    def build(cls, dims: Sequence[tuple[int, int]], world: int, rank: int, fraction: float,
              strategy: Strategy = "compute") -> "KAISAPlan":
        """The plan for layers with factor sides ``dims[l] = (dA, dG)``."""
        workers = grad_worker_count(world, fraction)
        costs = [layer_cost(d, strategy) for d in dims]
        return cls(world, rank, workers, tuple(lpt_assignment(costs, worker_groups(world, workers))))

    @property
    def groups(self) -> int:
        """Number of grad-worker groups (= the size of a receiver group)."""
        return self.world // self.grad_workers

    @property
    def worker_groups(self) -> list[list[int]]:
        return worker_groups(self.world, self.grad_workers)

    @property
    def receiver_groups(self) -> list[list[int]]:
        return receiver_groups(self.world, self.grad_workers)

    def is_grad_worker(self, layer: int) -> bool:
        """Whether this rank preconditions (and stores the eigen data of) ``layer``."""
        return self.inverse_workers[layer] % self.groups == self.rank % self.groups

    def gradient_source(self, layer: int) -> int:
        """The grad worker of ``layer`` in this rank's receiver group (this rank itself if it is one)."""
        return (self.rank // self.groups) * self.groups + self.inverse_workers[layer] % self.groups


@dataclass
class KAISAGroups:
    """This rank's process groups for a plan: ``worker`` (its grad-worker group) is used when
    ``grad_workers > 1``, ``receiver`` (its receiver group) when ``grad_workers < world``; None is the
    world group (collectives' convention) or, for a one-rank group, a group that is never used."""

    worker: dist.ProcessGroup | None
    receiver: dist.ProcessGroup | None

    @classmethod
    def create(cls, plan: KAISAPlan) -> "KAISAGroups":
        """Create the groups; a collective call: every rank must call it with an equal plan."""
        return cls(cls._mine(plan.worker_groups, plan.rank % plan.groups, plan.world),
                   cls._mine(plan.receiver_groups, plan.rank // plan.groups, plan.world))

    @staticmethod
    def _mine(rank_lists: list[list[int]], index: int, world: int) -> dist.ProcessGroup | None:
        if len(rank_lists[0]) in (1, world):
            return None
        return collectives.new_groups(rank_lists)[index]
