"""The distributor of FSDP2-sharded layers (``fully_shard``; HSDP: a (replicate, shard) mesh), the
sharded implementation of :class:`kfopt.distribution.Distributor`.

Each rank holds a block of whole rows of every layer's gradient matrix ``V = [dW | db]``
(``kfopt.row_shards``: FSDP2's row chunks). The three moments of a step:

1. Statistics are averaged over every data-parallel rank (the whole mesh; HSDP's replicas included), as
   under DDP: the factors are those of the global batch whatever the world size, identical on all ranks.
2. Each layer has one owner in the shard group (``RowShardPlan.balanced``: KAISA's LPT assignment of
   the decomposition cost); only the owner computes and stores the layer's second-order data (the
   memory point of FSDP). Under HSDP every replicate group has the same owners and computes the same.
3. ``gradients`` gathers each active layer's rows to its owner (one ``all_to_all_single`` over the
   shard group, ``kfopt.row_shards.gather_to_owners``), the owner computes ``P``, and
   ``write_gradients`` scatters ``P``'s rows back into the local ``.grad`` shards (one more;
   ``local_rows`` returns them instead: SINGD's natural gradient). A rank sees ``P`` of its own layers
   only: a scalar of all layers (K-FAC's KL clip) is summed over the shard group
   (``sum_over_preconditioners``), and a non-finite verdict on a rank's shards is agreed over every
   rank (``all_finite``).

SINGD keeps its factors on every rank (``decomposes``/``holds`` are K-FAC's) and uses the owners for
step 3 alone.

Per step each rank sends and receives ``RowShardPlan.volume(rank).exchange`` bytes over the shard
group (docs/sharding.md), besides the statistic averages that DDP sends as well.

KAISA's ``grad_worker_fraction`` under FSDP2: a layer has one owner per shard group, i.e.
``world / shard_size`` grad workers (one per replicate group); the only accepted fraction is the one
that gives that count (``1 / shard_size``, K-FAC's default ``grad_worker_fraction=None``), any other raises
ValueError.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist

from kfopt.autotune import agree_on_configs, configs_per_rank

from . import collectives
from .capture import CapturedLayer
from .distribution import average_over_every_rank
from .kaisa import Strategy, grad_worker_count
from .row_shards import RowShardPlan, gather_to_owners, scatter_from_owners


def is_sharded(layers: Sequence[CapturedLayer]) -> bool:
    """Whether the layers' weights are DTensors (FSDP2; ``kfopt.capture`` checked their placements)."""
    return any(hasattr(layer.weight, "device_mesh") for layer in layers)


class Sharded:
    """The distributor of FSDP2/HSDP row-sharded layers (module docstring). ``layers``: the captured
    layers in the preconditioner's order; ``strategy``: what the owners balance (``kfopt.kaisa``)."""

    distributed = True  # as Replicated's: torch.distributed is initialised

    def __init__(self, layers: Sequence[CapturedLayer], strategy: Strategy = "compute"):
        meshes = {getattr(layer.weight, "device_mesh", None) for layer in layers}
        if len(meshes) != 1 or None in meshes:
            plain = [layer.name for layer in layers if getattr(layer.weight, "device_mesh", None) is None]
            raise ValueError("model: the preconditioned layers must all be sharded (fully_shard) over one "
                             + (f"device mesh; layer {plain[0]!r} is not sharded" if plain else
                                f"device mesh; got {len(meshes)} meshes"))
        mesh = meshes.pop()
        self.group = mesh.get_group(mesh.ndim - 1)  # the shard dimension (HSDP: the last one)
        # HSDP: the replicas of this rank's shard precondition the same layers on the same data
        self.replicas = mesh.get_group(0) if mesh.ndim == 2 and mesh.size(0) > 1 else None
        self.ranks, self.me = collectives.world_size(self.group), collectives.rank(self.group)
        self.world = collectives.world_size()
        shapes = [(layer.out_features, layer.in_features + layer.has_bias) for layer in layers]  # K-FAC's sides
        self.owners = RowShardPlan.balanced(shapes, torch.float32, self.ranks, strategy).owners
        self._exchange: tuple[RowShardPlan, list[int]] | None = None

    @classmethod
    def kaisa(cls, layers: Sequence[CapturedLayer], grad_worker_fraction: float | None,
              strategy: Strategy) -> "Sharded":
        """With the owners of K-FAC's layers; ValueError unless ``grad_worker_fraction`` gives one grad
        worker per replicate group (module docstring; None: that fraction)."""
        distributor = cls(layers, strategy)
        if grad_worker_fraction is None:
            return distributor
        replicas = distributor.world // distributor.ranks
        if grad_worker_count(distributor.world, grad_worker_fraction) != replicas:
            raise ValueError(f"grad_worker_fraction: under FSDP2 each layer is preconditioned by one owner in "
                             f"its shard group of {distributor.ranks} ranks ({replicas} grad workers of "
                             f"{distributor.world} ranks): expected 1/{distributor.ranks}, "
                             f"got {grad_worker_fraction!r}")
        return distributor

    @property
    def rank(self) -> int:
        return collectives.rank()

    # -- statistics: over every data-parallel rank ---------------------------------------------------

    average = staticmethod(average_over_every_rank)

    # -- second-order data: the owner's alone ---------------------------------------------------------

    def decomposes(self, layer: int) -> bool:
        return self.owners[layer] == self.me

    def holds(self, layer: int) -> bool:
        return self.owners[layer] == self.me

    def share_second_order(self, data: Sequence[list[torch.Tensor] | None]) -> None:
        """Nothing to share: the owner computes and keeps it."""

    # -- preconditioning ------------------------------------------------------------------------------

    def preconditions(self, layer: int) -> bool:
        return self.owners[layer] == self.me

    def gradients(self, layers: Sequence[CapturedLayer], active: Sequence[int], *,
                  with_bias: bool = True) -> dict[int, torch.Tensor]:
        """The whole gradient matrix of every active layer this rank owns, gathered from the shards (every
        rank must pass the same ``active``); :meth:`write_gradients` scatters the results back."""
        blocks = [layers[i].grad_matrix(with_bias) for i in active]
        if not blocks:
            self._exchange = None
            return {}
        shapes = [(layers[i].out_features, block.shape[1]) for i, block in zip(active, blocks)]
        plan = RowShardPlan(shapes, [b.dtype for b in blocks], self.ranks, [self.owners[i] for i in active],
                            blocks[0].device)
        self._exchange = (plan, list(active))
        gathered = gather_to_owners(plan, blocks, self.group)
        return {i: m for i, m in zip(active, gathered) if m is not None}

    def share_preconditioned(self, preconditioned: dict[int, torch.Tensor], active: Sequence[int],
                             like: dict[int, torch.Tensor], dtypes: Sequence[torch.dtype]) -> dict[int, torch.Tensor]:
        """This rank's own ``P`` only (the others reach their shards in :meth:`write_gradients`)."""
        return preconditioned

    def sum_over_preconditioners(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of ``value`` (a rank's term over the layers it preconditions) over the shard group."""
        if self.ranks == 1:
            return value
        value = value.clone()
        dist.all_reduce(value, group=self.group)
        return value

    def local_rows(self, results: dict[int, torch.Tensor],
                   dtypes: dict[int, torch.dtype] | None = None) -> dict[int, torch.Tensor]:
        """This rank's rows of each owned layer's ``results[l]`` (the last :meth:`gradients`' layers),
        scattered from the owners, in ``dtypes[l]`` (every rank passes the same; None: the gradients'
        dtypes)."""
        if self._exchange is None:
            return {}
        plan, active = self._exchange
        self._exchange = None
        if dtypes is not None:
            plan = dataclasses.replace(plan, dtypes=tuple(dtypes[i] for i in active))
        owned = [results[i].to(dtype) if plan.owners[k] == self.me else None
                 for k, (i, dtype) in enumerate(zip(active, plan.dtypes))]
        return dict(zip(active, scatter_from_owners(plan, owned, self.group)))

    def write_gradients(self, layers: Sequence[CapturedLayer], results: dict[int, torch.Tensor]) -> None:
        """Scatter each owned layer's ``results[l]`` (:meth:`local_rows`, in the gradient dtype) and write
        every rank's rows into its ``.grad``."""
        for i, rows in self.local_rows(results).items():
            layers[i].write_grad(rows)

    def all_finite(self, finite: torch.Tensor) -> torch.Tensor:
        """Whether ``finite`` (a 0-d bool, this rank's verdict on its shards) holds on every rank: one
        all-reduce of one element over every rank, on the device (no host synchronisation)."""
        flag = finite.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return flag.bool()

    def agreement(self, *, preconditioning: bool = False) -> AbstractContextManager:
        """Every rank for a replicated update; when preconditioning, each owner for itself, or under HSDP
        with the replicas of its shard (they compute the same layers' ``P``, bit for bit)."""
        if not preconditioning:
            return agree_on_configs()
        return configs_per_rank() if self.replicas is None else agree_on_configs(self.replicas)
