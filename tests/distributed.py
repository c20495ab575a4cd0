"""Run a function on N gloo processes on this CPU: spawned directly, or started by ``torchrun``.

``run_distributed(fn, world_size, *args, timeout=...)`` spawns ``world_size`` processes (spawn start
method), each with the environment ``torchrun`` sets (MASTER_ADDR=127.0.0.1, MASTER_PORT = a free
port, RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE). ``run_torchrun(fn, world_size, *args,
timeout=...)`` launches ``python -m torch.distributed.run --nproc-per-node world_size`` on this file
instead, so the ranks are started, and their environment set, by torchrun's own agent. Either way
every rank lives through ``rank_main``: ``torch.set_num_threads(1)``, the default process group
initialized with the gloo backend from the environment (``env://``), ``fn(rank, world_size,
*args)``, its return value saved with ``torch.save``, then ``end_rank`` (below). The parent returns
the values in rank order. ``fn`` and ``args`` must be picklable (``fn`` a module-level function).

Both fail the test loudly (``pytest.fail``), killing every process they started, when a rank raises
(the message holds that rank's traceback), exits with a non-zero code or without a result, or when
the ranks have not all finished ``timeout`` seconds after the start (a hang: the message names the
ranks still running, or holds torchrun's output).

How a rank ends (``end_rank``), and why: its wrappers are released (``gc.collect()``: DDP/FSDP
modules, device meshes and async work objects that the rank program left in reference cycles), every
rank waits for its peers (``dist.barrier()``: all collectives of all ranks are complete), the
process groups are destroyed, and the process leaves with ``os._exit`` after flushing its output,
without interpreter finalization. The last step is the fix for a crash seen about once in ten
torchrun runs under load: torch keeps a gloo process group alive from C++ after
``destroy_process_group()`` whenever DDP or FSDP wrapped a module (its worker threads
``pt_gloo_runloop`` are still there, measured in ``/proc/self/task``), and such a worker thread drops
its reference to its last finished work (e.g. a scatter of ``distribute_tensor``) shortly after the
waiting rank has moved on. Dropping it releases Python tensors, which needs the GIL; during
interpreter finalization CPython ends a thread that asks for the GIL with ``pthread_exit``, whose
forced unwind through the work's ``noexcept`` destructor aborts the process ("terminate called
without an active exception", SIGABRT; the core dump shows ``~AsyncScatterWork`` under
``ProcessGroupGloo::runLoop``). Nothing is left to do after the barrier and the destruction, so the
rank skips the finalization those threads cannot survive.
"""

from __future__ import annotations

import gc
import importlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ one rank's life


def end_rank(exit_code: int) -> NoReturn:
    """Tear this rank down (module docstring) and leave the process with ``exit_code``.

    After a failure (``exit_code != 0``) there is no barrier: the peers may never reach it, and the
    parent kills them once it sees this rank's exit code."""
    try:
        gc.collect()
        if dist.is_initialized():
            if exit_code == 0:
                dist.barrier()
            dist.destroy_process_group()
        gc.collect()
    except BaseException:
        traceback.print_exc()
        exit_code = exit_code or 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def rank_main(fn: Callable, args: tuple, out_dir: str, timeout: float) -> NoReturn:
    """Run ``fn(rank, world_size, *args)`` as one rank of the job the environment describes; save its
    result as ``out_dir/rank{rank}.pt`` (or its traceback as ``rank{rank}.err``) and ``end_rank``."""
    torch.set_num_threads(1)
    out, rank = Path(out_dir), int(os.environ["RANK"])
    try:
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
        result = fn(rank, dist.get_world_size(), *args)
        torch.save(result, out / f"rank{rank}.tmp")
        os.replace(out / f"rank{rank}.tmp", out / f"rank{rank}.pt")
        del result
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        end_rank(1)
    end_rank(0)


def _spawned_rank(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str,
                  timeout: float) -> NoReturn:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    rank_main(fn, args, out_dir, timeout)


# ------------------------------------------------------------------ the parent


def _tracebacks(out: Path, world_size: int) -> str:
    return "".join(f"\n--- rank {r} raised:\n{(out / f'rank{r}.err').read_text()}"
                   for r in range(world_size) if (out / f"rank{r}.err").exists())


def _results(fn: Callable, out: Path, world_size: int) -> list[Any]:
    missing = [r for r in range(world_size) if not (out / f"rank{r}.pt").exists()]
    if missing:
        pytest.fail(f"{fn.__name__}: rank(s) {missing} exited with code 0 but returned no result", pytrace=False)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 60.0) -> list[Any]:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, each computed in its
    own spawned gloo process (module docstring); fails the test on an exception, a bad exit or a hang."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="kfopt_dist_") as tmp:
        out, port = Path(tmp), free_port()
        procs = [ctx.Process(target=_spawned_rank, args=(r, world_size, port, fn, args, tmp, timeout), daemon=True)
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
        return _results(fn, out, world_size)


def run_torchrun(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """``run_distributed``'s result, with the ranks started by ``torchrun --nproc-per-node world_size``
    (its elastic agent, its environment and its store) running this file as the rank program."""
    with tempfile.TemporaryDirectory(prefix="kfopt_torchrun_") as tmp:
        out = Path(tmp)
        (out / "program.pkl").write_bytes(pickle.dumps((fn.__module__, fn.__qualname__, args, timeout)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world_size),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), __file__, tmp]
        test_dir = str(Path(fn.__code__.co_filename).parent)
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [test_dir, os.environ.get("PYTHONPATH")])))
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
            pytest.fail(f"{fn.__name__} under torchrun did not finish within {timeout} s (hang?); killed"
                        f"{_tracebacks(out, world_size)}\nOutput:\n{log}", pytrace=False)
        if proc.returncode != 0:
            pytest.fail(f"{fn.__name__} under torchrun: exit code {proc.returncode}{_tracebacks(out, world_size)}"
                        f"\nOutput:\n{log}", pytrace=False)
        return _results(fn, out, world_size)


def _torchrun_rank(out_dir: str) -> NoReturn:
    """The rank program ``run_torchrun`` hands to torchrun: load ``fn`` and ``args``, then ``rank_main``."""
    module, qualname, args, timeout = pickle.loads((Path(out_dir) / "program.pkl").read_bytes())
    fn = importlib.import_module(module)
    for name in qualname.split("."):
        fn = getattr(fn, name)
    rank_main(fn, args, out_dir, timeout)


if __name__ == "__main__":
    _torchrun_rank(sys.argv[1])
