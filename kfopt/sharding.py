"""Parameters sharded by FSDP2 / HSDP (``torch.distributed.fsdp.fully_shard``): placement checks and the
shard-group reduction the element-wise optimizers use.

A parameter is either a plain tensor or a ``DTensor``. The element-wise optimizers (LAMB, LARS, SONew)
accept DTensors whose placements are ``Replicate()`` on every mesh dimension except at most one
``Shard(0)``: FSDP2 gives ``(Shard(0),)``, HSDP on a (replicate, shard) mesh ``(Replicate(), Shard(0))``.
They step on the local shards (``to_local()``) and keep their state as DTensors with the parameter's
placements (so ``torch.distributed.checkpoint`` saves and reshards it; SONew's ``offdiag``, ``(b,
*p.shape)``, is sharded on dim 1). Every quantity defined over a whole tensor (the per-tensor norms of the
trust and graft ratios, the global gradient norm and its non-finite verdict) is the sum of the ranks'
partial sums, all-reduced over the process group of the ``Shard(0)`` mesh dimension only (replicas of HSDP
hold the same shards); SONew's relative damping takes the maximum of the ranks' row maxima, and its band
reads the rows next to the shard from the neighbouring shards (``kfopt.halos``). Other placements
(``Shard(d)`` with d != 0, ``Partial``, two sharded dimensions) and optimizers mixing sharded parameters
with plain ones or with another shard group raise ValueError at construction, naming the parameter and its
placement.

Tuned kernel configs (``kfopt.autotune``) change the order of the partial sums, not their all-reduced
total: ranks of the shard group may tune for themselves (``configs_per_rank``), while HSDP's replicas,
which apply the same update to the same shard, agree on them over the replicate dimension
(``agree_on_configs``). With more than one replicate dimension every kernel launches its default
config. While candidates are timed the all-reduce is skipped (``kfopt.autotune.timing_candidates``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.distributed as dist

from kfopt.autotune import agree_on_configs, configs_per_rank, default_configs, timing_candidates

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch without DTensor: nothing can be sharded
    DTensor = Replicate = Shard = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (a DTensor's local tensor, which the in-place kernels update), or ``t``."""
    return t.to_local() if is_dtensor(t) else t


#: ``ShardLayout.replicas`` when HSDP's replicas span more than one mesh dimension
SEVERAL_DIMENSIONS = "several mesh dimensions"


@dataclass(frozen=True)
class ShardLayout:
    """How an optimizer's parameters are sharded: ``group`` is the process group to sum partial sums
    over (None: no parameter is sharded, or the shard dimension has one rank); ``replicas`` the process
    group of the ranks that hold the same shards (HSDP's replicate dimension; None: there are none,
    ``SEVERAL_DIMENSIONS``: they span several mesh dimensions)."""

    group: object | None
    replicas: object | None = None

    @property
    def reduce(self) -> Callable[[torch.Tensor], None] | None:
        """In-place SUM all-reduce of a small fp32 tensor over the shard group (None when unsharded); a
        no-op while kernel configs are timed (module docstring)."""
        if self.group is None:
            return None
        group = self.group

        def all_reduce_sum(t: torch.Tensor) -> None:
            if not timing_candidates():
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)

        return all_reduce_sum

    @property
    def reduce_max(self) -> Callable[[torch.Tensor], None] | None:
        """In-place MAX all-reduce over the shard group, like :attr:`reduce` (SONew's relative damping)."""
        if self.group is None:
            return None
        group = self.group

        def all_reduce_max(t: torch.Tensor) -> None:
            if not timing_candidates():
                dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)

        return all_reduce_max

    def all_true(self, flag: torch.Tensor) -> torch.Tensor:
        """Whether the 0-d bool ``flag`` (a rank's verdict on its shards) holds on every rank of the shard
        group: one SUM all-reduce of one fp32 value (``flag`` itself when unsharded)."""
        if self.group is None:
            return flag
        bad = (~flag).to(torch.float32).reshape(1)
        self.reduce(bad)
        return bad[0] == 0

    def tuning(self) -> ContextManager[None]:
        """The ``kfopt.autotune`` context of a step's launches (module docstring); unsharded: none (the
        enclosing one applies)."""
        if self.group is None:
            return contextlib.nullcontext()
        if self.replicas is None:
            return configs_per_rank()
        if self.replicas is SEVERAL_DIMENSIONS:
            return default_configs()
        return agree_on_configs(self.replicas)


def shard_dim_group(name: str, p) -> tuple[str, object | None, object | None]:
    """``(kind, group, replicas)`` of parameter ``p``: kind "plain" (a tensor), "replicated" (a DTensor
    replicated on every mesh dimension) or "sharded" (exactly one ``Shard(0)``; ``group`` its mesh
    dimension's process group, ``replicas`` that of the other mesh dimensions with more than one rank:
    None, a group, or ``SEVERAL_DIMENSIONS``). ValueError naming ``name`` and the placement for anything
    else."""
    if not is_dtensor(p):
        return "plain", None, None
    placements = tuple(p.placements)
    shard_dims = [i for i, pl in enumerate(placements) if isinstance(pl, Shard)]
    others = [pl for pl in placements if not isinstance(pl, (Shard, Replicate))]
    if others or len(shard_dims) > 1 or any(placements[i].dim != 0 for i in shard_dims):
        raise ValueError(
            f"{name}: a DTensor with placements {placements} is not supported; kfopt steps on parameters "
            "sharded on dim 0 along at most one mesh dimension (FSDP2: (Shard(dim=0),), HSDP: "
            "(Replicate(), Shard(dim=0))) or replicated (Replicate() on every mesh dimension)")
    if not shard_dims:
        return "replicated", None, None
    mesh = p.device_mesh
    group = mesh.get_group(shard_dims[0]) if mesh.ndim > 1 else mesh.get_group()
    replicate_dims = [d for d in range(mesh.ndim) if d != shard_dims[0] and mesh.size(d) > 1]
    replicas = (None if not replicate_dims else mesh.get_group(replicate_dims[0]) if len(replicate_dims) == 1
                else SEVERAL_DIMENSIONS)
    return "sharded", group, replicas


def shard_layout(named_params) -> ShardLayout:
    """The :class:`ShardLayout` of ``named_params`` (``(name, param)`` pairs); ValueError naming a
    parameter whose placement is not supported or whose sharding differs from the others'."""
    kinds, group, replicas, first = set(), None, None, None
    for name, p in named_params:
        kind, g, replicas_of_p = shard_dim_group(name, p)
        if kind == "sharded":
            if group is not None and g is not group:
                raise ValueError(f"{name} is sharded over another process group than {first}: one optimizer "
                                 "steps parameters sharded over one mesh dimension")
            group, replicas, first = g, replicas_of_p, first or name
        kinds.add((kind, name))
    found = {k for k, _ in kinds}
    if "sharded" in found and len(found) > 1:
        odd = next(name for kind, name in sorted(kinds) if kind != "sharded")
        raise ValueError(f"{odd} is not sharded like {first} (placement (Shard(dim=0),) on the shard mesh "
                         "dimension): one optimizer cannot mix sharded and unsharded parameters (their "
                         "whole-tensor norms are reduced over the shard group)")
    if group is not None and dist.get_world_size(group) == 1:
        group = None
    return ShardLayout(group, replicas if group is not None else None)


def state_placements(p, lead: int = 0) -> list:
    """The placements of a state tensor of DTensor ``p`` with ``lead`` leading dimensions before ``p``'s
    (``Shard(d)`` becomes ``Shard(d + lead)``; SONew's ``offdiag``, ``(b, *p.shape)``, has one)."""
    return [Shard(pl.dim + lead) if isinstance(pl, Shard) else pl for pl in p.placements]


def like_param(state: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A loaded state tensor laid out like parameter ``p``: a full (plain) tensor of ``p``'s shape, or of
    ``(k, *p.shape)``, is cut into ``p``'s local shard when ``p`` is a DTensor (no communication), a
    DTensor is gathered when ``p`` is plain."""
    fits = state.dim() > 0 and tuple(state.shape[state.dim() - p.dim():]) == tuple(p.shape)
    if is_dtensor(p) and not is_dtensor(state) and fits:
        from torch.distributed.tensor import distribute_tensor

        lead = state.dim() - p.dim()
        if lead in (0, 1):
            return distribute_tensor(state.to(p.device), p.device_mesh, state_placements(p, lead),
                                     src_data_rank=None)
    if is_dtensor(state) and not is_dtensor(p):
        return state.full_tensor()
    return state
