"""The extra collectives of the element-wise optimizers under FSDP2, counted and timed on W processes.

``run_case(case, world, backend)`` spawns ``world`` processes (``backend`` "nccl": one GPU per rank;
"gloo": CPU tensors), each of which builds the GPT-2-shaped model (perf.models.GPT, fp32), shards it
with ``fully_shard`` (each block, then the root) on a 1-D mesh, gives every parameter a random
gradient shard (seeded per rank) and steps two copies of the optimizer on the same gradients: one plain,
one with ``torch.distributed``'s collectives wrapped (:class:`CollectiveLog`). kfopt calls them as
``dist.all_reduce`` / ``dist.all_gather_single`` at call time (``kfopt.sharding``, ``kfopt.halos``), so
wrapping the module's functions sees exactly what it issues; FSDP2 itself makes no collective inside
``optimizer.step()``. Per rank it returns: every collective of each step (name, reduce op, bytes this
rank contributes: the tensor of an all-reduce, the input of an all-gather), whether the two copies'
parameters are bitwise equal after every step, and with ``timed`` the plain copy's step times
(synchronised, after ``WARMUP`` steps) and the time spent inside the collectives of the wrapped copy
(the device synchronised before and after each one, so the time is the collective's alone, waiting
for the slowest rank included).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: every torch.distributed collective a step could issue; kfopt's are the first two
WATCHED = ("all_reduce", "all_gather_single", "all_gather_into_tensor", "all_gather", "reduce_scatter_tensor",
           "all_to_all_single", "broadcast", "reduce")
WARMUP = 2


def _bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class CollectiveLog:
    """Wraps ``torch.distributed``'s collectives while active: ``calls`` gets ``(name, op, bytes,
    seconds)`` per call (``seconds`` None unless ``timed``; then the device is synchronised around
    each call)."""

    def __init__(self, timed: bool, device: torch.device):
        self.timed, self.device, self.calls = timed, device, []

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            if name == "all_reduce":
                op = kwargs.get("op", args[1] if len(args) > 1 else dist.ReduceOp.SUM)
                sent = _bytes(kwargs.get("tensor", args[0] if args else None))
            elif name == "all_gather_single":
                op, sent = None, _bytes(args[1] if len(args) > 1 else kwargs.get("input"))
            else:
                op, sent = None, sum(_bytes(a) for a in args)
            if self.timed:
                self._sync()
                t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            seconds = None
            if self.timed:
                self._sync()
                seconds = time.perf_counter() - t0
            self.calls.append((name, None if op is None else str(op).split(".")[-1], sent, seconds))
            return out
        return wrapper

    @contextlib.contextmanager
    def active(self):
        originals = {name: getattr(dist, name) for name in WATCHED if hasattr(dist, name)}
        try:
            for name, fn in originals.items():
                setattr(dist, name, self._wrap(name, fn))
            yield self
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)


def _sharded_model(cfg, device, mesh, rank):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from perf.models import GPT

    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    gen = torch.Generator(device=device).manual_seed(1000 + rank)
    for p in model.parameters():
        local = torch.randn(p.to_local().shape, generator=gen, device=device) * 1e-2
        p.grad = DTensor.from_local(local, mesh, p.placements, shape=p.shape, stride=p.stride())
    return model


def rank_program(rank: int, world: int, spec: dict) -> dict:
    """One rank's measurement (module docstring); ``spec``: registry, lr, cfg, steps, timed, kfopt_backend."""
    from torch.distributed.device_mesh import init_device_mesh

    from kfopt.registry import REGISTRY
    from perf.cases import sonew_tensor_band

    if spec["kfopt_backend"]:
        os.environ["KFOPT_BACKEND"] = spec["kfopt_backend"]
    device = torch.device("cuda", rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))
    models = [_sharded_model(spec["cfg"], device, mesh, rank) for _ in range(2)]
    plain, wrapped = (REGISTRY[spec["registry"]].build(m, lr=spec["lr"]) for m in models)
    counted = CollectiveLog(timed=False, device=device)
    per_step, equal = [], []
    for _ in range(spec["steps"]):
        plain.step()
        before = len(counted.calls)
        with counted.active():
            wrapped.step()
        per_step.append([c[:3] for c in counted.calls[before:]])
        equal.append(all(torch.equal(a.to_local(), b.to_local())
                         for a, b in zip(models[0].parameters(), models[1].parameters())))
    band = plain.param_groups[0].get("band", 0)
    out = {"per_step": per_step, "equal": equal, "tensors": len(list(models[0].parameters())),
           "bands": [sonew_tensor_band(tuple(p.shape), band) for p in models[0].parameters()],
           "step_s": None, "collective_s": None, "instrumented_step_s": None, "device": device.type}
    if spec["timed"]:
        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        step_s, inst_s, coll_s = [], [], []
        timing_log = CollectiveLog(timed=True, device=device)
        for i in range(WARMUP + spec["timed_steps"]):
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            plain.step()
            sync()
            if i >= WARMUP:
                step_s.append(time.perf_counter() - t0)
            dist.barrier()
            before = len(timing_log.calls)
            sync()
            t0 = time.perf_counter()
            with timing_log.active():
                wrapped.step()
            sync()
            if i >= WARMUP:
                inst_s.append(time.perf_counter() - t0)
                coll_s.append(sum(c[3] for c in timing_log.calls[before:]))
        out.update(step_s=step_s, instrumented_step_s=inst_s, collective_s=coll_s)
    return out


def _rank_main(rank: int, world: int, port: int, backend: str, spec: dict, out_dir: str, timeout: float):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    code = 0
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        result = rank_program(rank, world, spec)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        code = 1
    try:  # leave without interpreter finalization (gloo worker threads of FSDP: tests/distributed.py)
        if dist.is_initialized():
            dist.destroy_process_group()
    except BaseException:
        code = code or 1
    os._exit(code)


def run_case(spec: dict, world: int, backend: str, timeout: float = 600.0) -> list[dict]:
    """``rank_program`` on ``world`` spawned processes; the ranks' results in rank order. RuntimeError
    with the ranks' tracebacks when one fails or they outlast ``timeout``."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="kfopt_perf_shard_") as tmp:
        procs = [ctx.Process(target=_rank_main, args=(r, world, port, backend, spec, tmp, timeout), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            while any(p.exitcode is None for p in procs) and time.monotonic() < deadline:
                if any(p.exitcode not in (None, 0) for p in procs):
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join()
        errors = "".join(f"\n--- rank {r}:\n{(Path(tmp) / f'rank{r}.err').read_text()}"
                         for r in range(world) if (Path(tmp) / f"rank{r}.err").exists())
        codes = [p.exitcode for p in procs]
        if errors or any(c != 0 for c in codes):
            raise RuntimeError(f"sharded collectives on {world} {backend} processes: exit codes {codes}{errors}")
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]
