"""``kfopt compare --distributed {ddp,fsdp}``: the comparison trained data-parallel under ``torchrun``.

``torchrun --nproc-per-node N -m kfopt compare --distributed ddp|fsdp ...`` starts N ranks (gloo on the
CPU, NCCL on GPUs: rank r uses ``cuda:LOCAL_RANK``). Every rank draws the same global batch (the same
seeded generator as one process) and trains on its contiguous share of ``batch / N`` rows; the model
is wrapped in ``DistributedDataParallel`` (``ddp``) or sharded with FSDP2's ``fully_shard`` on every
module that holds parameters and on the root (``fsdp``). Both average the gradients of the ranks' mean
losses, which is the gradient of the global batch's mean loss, so a run computes what one process
computes on the global batch (up to the order of floating-point sums). The loss every rank records
(and decides divergence and the target on) is that of the global batch (one all-reduce per step);
validation runs on every rank on the whole validation set. Rank 0 prints and writes the reports;
step times and optimizer-state memory are rank 0's (under FSDP2: its shard).

Under ``fsdp`` only optimizers that step sharded parameters run (AdamW, LAMB, LARS, SONew, MKOR, MKOR-H,
SINGD without grafting, and K-FAC with ``grad_worker_fraction = 1 / world``: one owner per layer); the others are
left out of the default list with a note, and naming one is a usage error.

A rank ends through :func:`finish`: a barrier, the process group destroyed, then ``os._exit``: torch
keeps gloo's worker threads alive after DDP or FSDP wrapped a module, and one of them releasing its
last work during interpreter finalization aborts the process (``tests/distributed.py`` has the
analysis).
"""

from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn

from kfopt.registry import REGISTRY as OPTIMIZERS

from .registry import BASELINE
from .tasks import Task

MODES = ("ddp", "fsdp")


@dataclass(frozen=True)
class Distribution:
    """This rank's place in a data-parallel comparison."""

    mode: str
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start(mode: str, device: torch.device) -> Distribution:
    """Join the process group torchrun set up (ValueError when not started by torchrun)."""
    if mode not in MODES:
        raise ValueError(f"--distributed: expected one of {', '.join(MODES)}, got {mode!r}")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("--distributed needs ranks started by torchrun: "
                         f"torchrun --nproc-per-node N -m kfopt compare --distributed {mode} ...")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distribution(mode, dist.get_rank(), dist.get_world_size(), device)


def finish(status: int) -> NoReturn:
    """End this rank with ``status`` after every rank is done (module docstring)."""
    gc.collect()
    if status == 0:
        dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


#: The Kronecker-factored optimizers of the comparison that train FSDP2-sharded models
#: (``kfopt.sharded_distribution``), with what sharding needs of their hyperparameters on ``world`` ranks.
SHARDED_KRONECKER = {"kfac": lambda world: {"grad_worker_fraction": 1 / world},
                     "singd": lambda world: {}, "singd-toeplitz": lambda world: {},
                     "mkor": lambda world: {}, "mkorh": lambda world: {}}


def supports(mode: str, name: str) -> bool:
    """Whether optimizer ``name`` of the comparison can train under ``mode``."""
    return (mode != "fsdp" or name == BASELINE or name in SHARDED_KRONECKER
            or OPTIMIZERS[name].cls._shardable is True)


def required_overrides(mode: str, name: str, world: int) -> dict:
    """The hyperparameters optimizer ``name`` must take under ``mode`` on ``world`` ranks (fsdp: K-FAC's
    one owner per layer)."""
    return SHARDED_KRONECKER[name](world) if mode == "fsdp" and name in SHARDED_KRONECKER else {}


def agree(distribution: Distribution | None, value):
    """Rank 0's ``value`` on every rank (what decides the runs: every rank must make the same ones);
    ``value`` itself in one process."""
    if distribution is None or distribution.world == 1:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


class DistributedTask:
    """``task`` trained data-parallel by ``distribution``: the same interface as a :class:`Task`."""

    def __init__(self, task: Task, distribution: Distribution):
        batch = task.describe["batch"]
        if batch % distribution.world:
            raise ValueError(f"--distributed: the global batch of {batch} does not split evenly over "
                             f"{distribution.world} ranks")
        self.task = task
        self.distribution = distribution
        self.describe = {**task.describe, "distributed": {"mode": distribution.mode, "world_size": distribution.world,
                                                          "local_batch": batch // distribution.world}}

    def __getattr__(self, name):
        return getattr(self.task, name)

    def prepare(self, model: nn.Module) -> nn.Module:
        """``model`` wrapped for data-parallel training (DDP, or FSDP2 on each module with parameters
        of its own and on the root)."""
        if self.distribution.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.distribution.device.index] if self.distribution.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=device_ids)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.distribution.device.type, (self.distribution.world,))
        for module in list(model.modules())[1:]:
            if any(True for _ in module.parameters(recurse=False)):
                fully_shard(module, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    def train_batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's contiguous share of the global batch (every rank draws the same one)."""
        share = self.task.describe["batch"] // self.distribution.world
        lo = self.distribution.rank * share
        return tuple(t[lo:lo + share] for t in self.task.train_batch(generator))

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        """This rank's mean loss (what its gradients come from), valued at the global batch's mean loss."""
        local = self.task.loss(model, batch)
        mean = local.detach().clone()
        dist.all_reduce(mean)
        return local + (mean / self.distribution.world - local.detach())
