"""Config spaces: what a kernel may be launched with, and how one config is chosen.

A kernel declares a ``ConfigSpace`` (its candidate ``Config``s and a default). At launch time the
launcher calls ``space.launch(..., run=run)``, which runs ``run(space.select(...))`` on the tensors'
CUDA device; ``select``:

* where nothing can be timed (Triton's interpreter, CPU tensors, no GPU) the default config is
  returned without running anything -- Triton's own autotuner fails there;
* ``KFOPT_AUTOTUNE=default`` in the environment (read at every ``select``): the default config as
  well, untimed and uncached, on every device (one compile per kernel and constexpr signature, no
  tuning: what ``perf/gpu_check.sh`` uses to bound a cold run's compilations); unset or ``tune``:
  the rule below;
* on a GPU, the cache (``kfopt.autotune.cache``) is consulted under
  ``(kernel, device name, triton version, shape bucket, dtype)``; on a miss every candidate is timed
  (median of ``triton.testing.do_bench``), the fastest is stored, and returned.

In-place kernels pass the tensors they write as ``restore``: those are snapshotted before tuning and
restored after every candidate, so when ``select`` returns the buffers hold their original values
and the caller's single real launch is the only update that takes effect.

Several processes (``torch.distributed``)
=========================================
Configs change the order of floating-point sums (chunk and tile sizes, warps), so two ranks that tune
on their own can compute different bits from equal inputs -- and replicas that apply the same update
(data parallelism: every rank steps its own copy of the weights) would drift apart. So when
``torch.distributed`` is initialised with more than one rank, ``select`` decides by the context the
call runs in:

* ``agree_on_configs(group=None)``: every rank of ``group`` (None: all ranks) makes the same launches
  in the same order inside the block (e.g. an optimizer step on replicated weights). The first time a
  kernel/shape/dtype key comes up, each rank resolves it as above (cache or tuning) and then adopts the
  choice of the group's first rank (one small all-reduce); the agreed config is kept for the process.
  If resolving fails on any rank (no candidate can be launched, out of memory while tuning), every
  rank of the group raises, instead of the others waiting forever. kfopt's Kronecker-factored optimizers run their replicated work in this context; wrap an
  element-wise optimizer's step in it to tune it under data parallelism::

      with kfopt.autotune.agree_on_configs():
          optimizer.step()

* ``configs_per_rank()``: results are combined across ranks afterwards (e.g. statistics that are
  all-reduced), so each rank may tune for itself.
* ``default_configs()``, or anywhere else: the default config, the same on every rank without
  communication.

Timing a candidate runs the launcher's whole ``run``, and ranks time different numbers of repetitions
(``do_bench`` sizes them from a first measurement) or none (a cache hit): a collective inside ``run``
would then pair up wrongly across ranks, or wait forever. While candidates are timed,
:func:`timing_candidates` is True, and a launcher's collectives (the shard-group all-reduce of the
element-wise optimizers under FSDP2, ``kfopt.sharding``) are skipped: what is timed is the kernels, whose
configs are chosen; the results are discarded (``restore``), and the real launch makes the collectives.

One process (or ``torch.distributed`` not initialised): these contexts change nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence, TypeVar

import torch
import torch.distributed as dist
import triton

from .cache import get_cache, tuning_key


#: ``KFOPT_AUTOTUNE``: "tune" (or unset) times the candidates where it can; "default" always launches
#: the declared default config (no timing, nothing cached).
AUTOTUNE_ENV = "KFOPT_AUTOTUNE"


def forced_default() -> bool:
    """True when ``KFOPT_AUTOTUNE=default``: every kernel launches its default config, untimed."""
    value = os.environ.get(AUTOTUNE_ENV, "").strip().lower()
    if value in ("", "tune"):
        return False
    if value == "default":
        return True
    raise ValueError(f"{AUTOTUNE_ENV} must be 'tune', 'default' or unset; got {value!r}")


#: Triton reads TRITON_INTERPRET when a kernel is decorated; this is the value seen at import.
INTERPRETER: bool = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Config:
    """Compile-time parameters of one launch: the kernel's constexprs plus warps and stages."""

    params: Mapping[str, int] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        object.__setattr__(self, "params", dict(sorted(self.params.items())))

    def __getitem__(self, name: str) -> int:
        return self.params[name]

    def launch_kwargs(self) -> dict:
        """Keyword arguments for ``kernel[grid](..., **config.launch_kwargs())``."""
        return {**self.params, "num_warps": self.num_warps, "num_stages": self.num_stages}

    def to_json(self) -> dict:
        return {"params": dict(self.params), "num_warps": self.num_warps, "num_stages": self.num_stages}

    @classmethod
    def from_json(cls, data: Mapping) -> "Config":
        return cls(dict(data["params"]), int(data["num_warps"]), int(data["num_stages"]))

    def __hash__(self):
        return hash((tuple(self.params.items()), self.num_warps, self.num_stages))


def shape_bucket(*sizes: int) -> tuple[int, ...]:
    """Round each size up to a power of two: shapes in one bucket share a tuned config."""
    return tuple(1 << max(0, math.ceil(math.log2(max(int(s), 1)))) for s in sizes)


#: What makes one candidate config unusable (it is skipped): too many resources, or a failure to
#: compile (Triton's front end, or ptxas, e.g. a register demand it cannot meet).
CANDIDATE_ERRORS = (triton.runtime.errors.OutOfResources, triton.compiler.errors.CompilationError,
                    triton.runtime.errors.PTXASError)


def can_benchmark(device: torch.device) -> bool:
    """True where candidates can be timed: a compiled (not interpreted) CUDA launch."""
    return device.type == "cuda" and not INTERPRETER


def benchmark(fn: Callable[[], None]) -> float:
    """Median time of ``fn`` in milliseconds, CUDA events, after warm-up."""
    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


T = TypeVar("T")

#: ("agree", group) inside ``agree_on_configs``, ("per-rank", None) inside ``configs_per_rank``
_DISTRIBUTED_MODE: contextvars.ContextVar = contextvars.ContextVar("kfopt_autotune_distributed_mode",
                                                                   default=None)


@contextlib.contextmanager
def agree_on_configs(group: dist.ProcessGroup | None = None) -> Iterator[None]:
    """Inside the block, every rank of ``group`` (None: all ranks) launches the same kernels on the same
    shapes in the same order, and tuned configs are agreed across the group (module docstring)."""
    token = _DISTRIBUTED_MODE.set(("agree", group))
    try:
        yield
    finally:
        _DISTRIBUTED_MODE.reset(token)


@contextlib.contextmanager
def default_configs() -> Iterator[None]:
    """Inside the block, under ``torch.distributed`` with several ranks, every kernel launches its default
    config (whatever context encloses the block): for replicas that cannot agree (module docstring)."""
    token = _DISTRIBUTED_MODE.set(None)
    try:
        yield
    finally:
        _DISTRIBUTED_MODE.reset(token)


#: True while ``ConfigSpace`` times a candidate config (a launcher's collectives are skipped then)
_TIMING: contextvars.ContextVar = contextvars.ContextVar("kfopt_autotune_timing", default=False)


def timing_candidates() -> bool:
    """True while a candidate config is being timed: the launch's results are discarded, and collectives
    inside it must be skipped (module docstring)."""
    return _TIMING.get()


@contextlib.contextmanager
def configs_per_rank() -> Iterator[None]:
    """Inside the block each rank may tune for itself: its results are combined across ranks
    afterwards, never kept as a replica (module docstring)."""
    token = _DISTRIBUTED_MODE.set(("per-rank", None))
    try:
        yield
    finally:
        _DISTRIBUTED_MODE.reset(token)


def _several_ranks() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ConfigSpace:
    """The candidate configs of one kernel and its default (used wherever nothing can be timed)."""

    def __init__(self, kernel: str, configs: Sequence[Config], default: Config):
        if default not in configs:
            raise ValueError(f"{kernel}: the default config must be one of the candidates")
        self.kernel = kernel
        self.configs = tuple(configs)
        self.default = default
        self._agreed: dict[tuple, Config] = {}

    def select(
        self,
        *,
        device: torch.device,
        bucket: tuple[int, ...],
        dtype: torch.dtype | str,
        run: Callable[[Config], None],
        restore: Sequence[torch.Tensor] = (),
    ) -> Config:
        """The config to launch with; may time ``run(config)`` for every candidate (see module doc)."""
        if len(self.configs) == 1 or not can_benchmark(device) or forced_default():
            return self.default
        mode, group = _DISTRIBUTED_MODE.get() or (None, None)
        if not _several_ranks() or mode == "per-rank":
            return self._resolve(device, bucket, dtype, run, restore)
        if mode is None:
            return self.default
        key = (get_cache().path, self.kernel, str(device), bucket, str(dtype), tuple(dist.get_process_group_ranks(
            group if group is not None else dist.group.WORLD)))
        if key not in self._agreed:
            try:
                local, error = self._resolve(device, bucket, dtype, run, restore), None
            except Exception as err:  # noqa: BLE001 - the other ranks must learn of it, not wait forever
                local, error = None, err
            self._agreed[key] = self._agree(local, error, group, device)
        return self._agreed[key]

    def launch(self, *, device: torch.device, bucket: tuple[int, ...], dtype: torch.dtype | str,
               run: Callable[[Config], T], restore: Sequence[torch.Tensor] = ()) -> T:
        """``run(select(...))`` with ``device`` as the current CUDA device (Triton launches on the current
        device and its current stream: tensors on another GPU would be unreachable, or their work
        unordered with PyTorch's). Every kfopt launcher goes through here."""
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            return run(self.select(device=device, bucket=bucket, dtype=dtype, run=run, restore=restore))

    def _agree(self, config: Config | None, error: Exception | None, group: dist.ProcessGroup | None,
               device: torch.device) -> Config:
        """The config of the group's first rank: one all-reduce (on ``device`` for NCCL) of [ranks whose
        resolution failed, the first rank's config index]. If any rank failed, every rank raises."""
        comm_device = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        first = dist.get_rank(group) == 0
        shared = torch.tensor([int(config is None), self.configs.index(config) if first and config else 0],
                              dtype=torch.int64, device=comm_device)
        dist.all_reduce(shared, group=group)
        failed, index = (int(v) for v in shared.tolist())
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"{self.kernel}: choosing a config failed on {failed} rank(s) of the group (their "
                               "errors say why); no rank launches it")
        return self.configs[index]

    def _resolve(self, device, bucket, dtype, run, restore) -> Config:
        """This process's choice: the cached config, or the fastest candidate (timed now, then cached)."""
        key = tuning_key(self.kernel, _device_name(device), triton.__version__, bucket, str(dtype))
        cache = get_cache()
        hit = cache.get(key)
        if hit is not None:
            config = Config.from_json(hit["config"])
            if config in self.configs:
                return config
        snapshot = [t.detach().clone() for t in restore]
        timings, last_error = {}, None
        token = _TIMING.set(True)
        try:
            for config in self.configs:
                try:
                    timings[config] = benchmark(lambda: run(config))
                except CANDIDATE_ERRORS as err:
                    timings[config], last_error = math.inf, err
                finally:
                    for t, saved in zip(restore, snapshot):
                        t.detach().copy_(saved)
        finally:
            _TIMING.reset(token)
        best = min(self.configs, key=lambda c: timings[c])
        if math.isinf(timings[best]):
            raise RuntimeError(f"{self.kernel}: no candidate config could be launched on {device}") from last_error
        cache.put(key, {
            "config": best.to_json(),
            "timings_ms": {_describe(c): t for c, t in timings.items()},
        })
        return best


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _describe(config: Config) -> str:
    params = ",".join(f"{k}={v}" for k, v in config.params.items())
    return f"{params},warps={config.num_warps},stages={config.num_stages}"
