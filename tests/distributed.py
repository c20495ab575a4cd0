"""Run a function on N gloo processes on this CPU, the way ``torchrun`` would start them.

``run_distributed(fn, world_size, *args, timeout=...)`` spawns ``world_size`` processes (spawn start
method). Each sets the environment ``torchrun`` sets (MASTER_ADDR=127.0.0.1, MASTER_PORT = a free
port, RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE), ``torch.set_num_threads(1)``, initializes the
default process group with the gloo backend from that environment (``env://``), calls
``fn(rank, world_size, *args)`` and saves its return value with ``torch.save``; the parent returns the
values in rank order. ``fn`` and ``args`` must be picklable (``fn`` a module-level function).

It fails the test loudly (``pytest.fail``), killing every process it started, when a rank raises (the
message holds that rank's traceback), exits with a non-zero code or without a result, or when the
ranks have not all finished ``timeout`` seconds after the start (a hang: the message names the ranks
still running).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str, timeout: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    out = Path(out_dir)
    try:
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
        result = fn(rank, world_size, *args)
        torch.save(result, out / f"rank{rank}.tmp")
        os.replace(out / f"rank{rank}.tmp", out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _tracebacks(out: Path, world_size: int) -> str:
    return "".join(f"\n--- rank {r} raised:\n{(out / f'rank{r}.err').read_text()}"
                   for r in range(world_size) if (out / f"rank{r}.err").exists())


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 60.0) -> list[Any]:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, each computed in its
    own gloo process (module docstring); fails the test on an exception, a bad exit or a hang."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="kfopt_dist_") as tmp:
        out, port = Path(tmp), free_port()
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, tmp, timeout), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            while True:
                codes = [p.exitcode for p in procs]
                bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
                if bad:
                    pytest.fail(f"{fn.__name__} on {world_size} processes: rank(s) {bad} exited with code(s) "
                                f"{[codes[r] for r in bad]}{_tracebacks(out, world_size)}", pytrace=False)
                if all(c == 0 for c in codes):
                    break
                if time.monotonic() > deadline:
                    running = [r for r, c in enumerate(codes) if c is None]
                    pytest.fail(f"{fn.__name__} on {world_size} processes: rank(s) {running} did not finish "
                                f"within {timeout} s (hang?); killed{_tracebacks(out, world_size)}", pytrace=False)
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join()
        missing = [r for r in range(world_size) if not (out / f"rank{r}.pt").exists()]
        if missing:
            pytest.fail(f"{fn.__name__}: rank(s) {missing} exited with code 0 but returned no result", pytrace=False)
        return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
