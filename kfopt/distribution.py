"""The distribution seam of the Kronecker-factored preconditioners (K-FAC, MKOR, SINGD): the one place
their steps talk to other ranks. A preconditioner calls no collective itself; it asks its
:class:`Distributor`, at three moments of a step (layers are indices into the preconditioner's list):

1. Statistics (every method): each rank's sums are averaged over the ranks, ``average(tensors)``
   (asynchronous; ``symmetric=True`` sends the upper triangles of symmetric matrices). With a mean
   loss the quotients of averaged sums and averaged counts are the statistics of the global batch.
2. Second-order data (K-FAC): layer ``l``'s data is computed where ``decomposes(l)`` and shared with
   the ranks where ``holds(l)`` (``share_second_order``); only those store it.
3. Preconditioning, per layer: ``gradients(layers, active)`` makes each active layer's whole gradient
   matrix ``V = [dW | db]`` available on the ranks that precondition it (``preconditions(l)``), they
   compute ``P`` from ``V``, ``share_preconditioned`` gives every rank the ``P`` of every active layer,
   and ``write_gradients`` stores each ``P`` into the layer's ``.grad``. Computations that several ranks
   repeat on the same data (the same layers' ``P``, replicated factor updates) run under
   ``agreement(...)``, so the ranks use the same kernel configs and get the same bits.

:class:`Replicated` is the implementation for replicated parameters (a single process, or
``DistributedDataParallel``: every rank holds every layer's whole, already averaged gradient): step 3
reads and writes the local ``.grad`` through the layer's codec (``kfopt.capture.CapturedLayer``), and
with a KAISA plan (``kfopt.kaisa``; K-FAC's ``grad_worker_fraction``) only a layer's grad workers hold
its second-order data and compute its ``P``, broadcast to their receiver groups. Without a plan (MKOR,
SINGD) every rank does everything on every layer. A sharded implementation (FSDP2: a layer's gradient
split in dim-0 row shards) plugs in at the same three places: ``gradients`` gathers the rows of each
layer to the rank that preconditions it, ``write_gradients`` scatters the rows of ``P`` back.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Protocol

import torch

from kfopt.autotune import agree_on_configs, configs_per_rank

from . import collectives
from .capture import CapturedLayer
from .kaisa import KAISAGroups, KAISAPlan


def average_over_every_rank(tensors: Sequence[torch.Tensor], *, symmetric: bool = False
                            ) -> collectives.CollectiveHandle:
    """``Distributor.average`` over every rank of the default process group (DDP's ranks; FSDP2's and
    HSDP's data-parallel ranks alike): ``symmetric`` sends the upper triangles of symmetric matrices."""
    average = (collectives.all_reduce_symmetric_average_async if symmetric
               else collectives.all_reduce_average_async)
    return average(tensors)


class Distributor(Protocol):
    """What a preconditioner asks of the ranks (module docstring); ``world``/``rank`` as in
    ``kfopt.collectives``."""

    world: int
    rank: int

    def average(self, tensors: Sequence[torch.Tensor], *, symmetric: bool = False
                ) -> collectives.CollectiveHandle:
        """Average ``tensors`` over the ranks, in place, when the handle's ``wait()`` returns."""

    def decomposes(self, layer: int) -> bool:
        """Whether this rank computes ``layer``'s second-order data."""

    def holds(self, layer: int) -> bool:
        """Whether this rank stores ``layer``'s second-order data (and preconditions it)."""

    def share_second_order(self, data: Sequence[list[torch.Tensor] | None]) -> None:
        """Send each layer's second-order data ``data[l]`` (held where ``holds(l)``) from the rank that
        computed it to the others that hold it, in place."""

    def preconditions(self, layer: int) -> bool:
        """Whether this rank computes ``layer``'s preconditioned gradient."""

    def gradients(self, layers: Sequence[CapturedLayer], active: Sequence[int], *,
                  with_bias: bool = True) -> dict[int, torch.Tensor]:
        """The whole gradient matrix (``CapturedLayer.grad_matrix``) of every active layer that this rank
        needs: those it preconditions, and any other one it reads (replicated: all of them)."""

    def share_preconditioned(self, preconditioned: dict[int, torch.Tensor], active: Sequence[int],
                             like: dict[int, torch.Tensor], dtypes: Sequence[torch.dtype]) -> dict[int, torch.Tensor]:
        """Every active layer's ``P`` on this rank, from the ``P`` this rank computed
        (``preconditioned``); ``like[l]``/``dtypes[l]``: the shape and dtype of layer l's ``P``."""

    def sum_over_preconditioners(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of ``value``, a term over the layers whose ``P`` this rank has after
        ``share_preconditioned`` (replicated: every active layer, so ``value`` itself)."""

    def local_rows(self, results: dict[int, torch.Tensor], dtypes: dict[int, torch.dtype]) -> dict[int, torch.Tensor]:
        """Instead of ``write_gradients``: this rank's rows (replicated: all) of each active layer's
        ``results[l]`` (shaped as its ``gradients`` entry), in ``dtypes[l]`` (known on every rank)."""

    def write_gradients(self, layers: Sequence[CapturedLayer], results: dict[int, torch.Tensor]) -> None:
        """Store each layer's ``results[l]`` (a matrix shaped as its ``gradients`` entry) into its ``.grad``."""

    def all_finite(self, finite: torch.Tensor) -> torch.Tensor:
        """Whether the 0-d bool ``finite``, a rank's verdict on the gradients and results it holds, holds on
        every rank (replicated: every rank holds the same, so ``finite`` itself)."""

    def agreement(self, *, preconditioning: bool = False) -> AbstractContextManager:
        """The kernel-config agreement (``kfopt.autotune``) of computations that ranks repeat on the same
        data: the preconditioning of layers (``preconditioning=True``: among the ranks that precondition
        the same layers) or a replicated update (every rank)."""


class Replicated:
    """The distributor of replicated parameters (module docstring): a single process or
    ``DistributedDataParallel``. ``plan``: KAISA's assignment of layers to ranks (None: every rank does
    everything on every layer). ``distributed``: whether ``torch.distributed`` was initialised at
    construction."""

    def __init__(self, plan: KAISAPlan | None = None):
        self.world, self.distributed = collectives.world_size(), collectives.is_distributed()
        self.plan = plan
        self.groups = KAISAGroups.create(plan) if plan is not None else None

    @property
    def rank(self) -> int:
        return collectives.rank()

    @classmethod
    def kaisa(cls, dims: Sequence[tuple[int, int]], grad_worker_fraction: float, strategy) -> "Replicated":
        """With KAISA's plan for layers of factor sides ``dims`` (a collective call: process groups)."""
        return cls(KAISAPlan.build(dims, collectives.world_size(), collectives.rank(), grad_worker_fraction,
                                   strategy))

    # -- statistics ---------------------------------------------------------------------------------

    average = staticmethod(average_over_every_rank)

    # -- second-order data --------------------------------------------------------------------------

    def decomposes(self, layer: int) -> bool:
        return self.plan is None or self.plan.inverse_workers[layer] == self.plan.rank

    def holds(self, layer: int) -> bool:
        return self.plan is None or self.plan.is_grad_worker(layer)

    def share_second_order(self, data: Sequence[list[torch.Tensor] | None]) -> None:
        """Broadcast inside this rank's grad-worker group, one bucketed broadcast per source rank."""
        plan = self.plan
        if plan is None or plan.grad_workers == 1:
            return
        group_ranks = plan.worker_groups[plan.rank % plan.groups]
        handles = [collectives.broadcast_async(
            [t for i, layer_data in enumerate(data) if plan.inverse_workers[i] == src for t in layer_data],
            src, self.groups.worker) for src in group_ranks]
        for handle in handles:
            handle.wait()

    # -- preconditioning ----------------------------------------------------------------------------

    def preconditions(self, layer: int) -> bool:
        return self.holds(layer)

    def gradients(self, layers: Sequence[CapturedLayer], active: Sequence[int], *,
                  with_bias: bool = True) -> dict[int, torch.Tensor]:
        """Every active layer's local (replicated) gradient matrix."""
        return {i: layers[i].grad_matrix(with_bias) for i in active}

    def share_preconditioned(self, preconditioned: dict[int, torch.Tensor], active: Sequence[int],
                             like: dict[int, torch.Tensor], dtypes: Sequence[torch.dtype]) -> dict[int, torch.Tensor]:
        """With grad workers fewer than ranks: each layer's ``P`` broadcast from its grad worker in this
        rank's receiver group (one bucketed broadcast per source)."""
        plan = self.plan
        if plan is None or plan.grad_workers == plan.world:
            return preconditioned
        preconditioned = dict(preconditioned)
        for i in active:
            if i not in preconditioned:
                preconditioned[i] = torch.empty(like[i].shape, dtype=dtypes[i], device=like[i].device)
        sources = sorted({plan.gradient_source(i) for i in active})
        handles = [collectives.broadcast_async([preconditioned[i] for i in active if plan.gradient_source(i) == src],
                                               src, self.groups.receiver) for src in sources]
        for handle in handles:
            handle.wait()
        return preconditioned

    def sum_over_preconditioners(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def local_rows(self, results: dict[int, torch.Tensor], dtypes: dict[int, torch.dtype]) -> dict[int, torch.Tensor]:
        return {i: matrix.to(dtypes[i]) for i, matrix in results.items()}

    def write_gradients(self, layers: Sequence[CapturedLayer], results: dict[int, torch.Tensor]) -> None:
        for i, matrix in results.items():
            layers[i].write_grad(matrix)

    def all_finite(self, finite: torch.Tensor) -> torch.Tensor:
        return finite

    def agreement(self, *, preconditioning: bool = False) -> AbstractContextManager:
        """Every rank for a replicated update; for preconditioning, the grad-worker group (each rank for
        itself when it alone preconditions its layers)."""
        if not preconditioning or self.plan is None:
            return agree_on_configs()
        return configs_per_rank() if self.plan.grad_workers == 1 else agree_on_configs(self.groups.worker)
