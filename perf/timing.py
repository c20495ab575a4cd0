"""How the suite measures device time (GPU only; nothing here is called in the smoke run).

Every timed round is::

    setup:  zero a 256 MiB buffer (evicts L2: 50 MB on an H100, 60 MB on an H200), then enqueue a
            spin kernel (``torch.cuda._sleep``) long enough to cover the host's enqueue time of fn
    timed:  record CUDA event A; fn(); record CUDA event B; wait for B;  round time = B - A

Because the GPU is still busy with the flush and the spin while the host enqueues ``fn``, every
launch of ``fn`` is already queued when event A executes: the round time is the device time of
``fn``'s kernels back to back, cold L2, without the host's launch overhead (the steady state of a
training loop, where the host runs ahead of the GPU). A host synchronisation inside ``fn`` (or more
launches than the launch queue holds) still shows up, as it should. The host's own cost is measured
separately: ``host_s`` (time for ``fn`` to return, nothing synchronised) and ``latency_s`` (call to
completion from an idle GPU, synchronised before and after). A case is "host-bound" when
``host_s`` exceeds its device time: a loop of such steps runs at the host's pace.

With pytest-benchmark, the rounds are driven by ``benchmark.pedantic(fn, setup=prefill, ...)`` with
``cuda_event_clock`` as the timer (set per test through ``@pytest.mark.benchmark(timer=...)``), so
pytest-benchmark's statistics, saved runs and ``--benchmark-compare-fail`` are in device seconds.
Without it, ``measure_rounds`` runs the same rounds itself. Both report the median.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

FLUSH_BYTES = 256 << 20
SPIN_MARGIN_S = 100e-6   # spin this much longer than the host needs to enqueue fn
SPIN_MAX_S = 0.05        # a host slower than this per call is host-bound whatever we do

_state: dict = {"start": None, "now": 0.0, "flush": None, "cycles_per_s": None}


def cuda_event_clock() -> float:
    """A clock in seconds of device time, for pytest-benchmark's timer.

    pytest-benchmark reads its timer once before and once after every round. The first call of a
    pair records CUDA event A and returns the clock; the second records event B, waits for it, and
    advances the clock by the device time from A to B. Between rounds the clock stands still, so
    ``end - start`` is exactly the device time of the round. ``reset_clock`` re-pairs the calls.
    """
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    if _state["start"] is None:
        _state["start"] = event
        return _state["now"]
    event.synchronize()
    _state["now"] += _state["start"].elapsed_time(event) / 1e3
    _state["start"] = None
    return _state["now"]


def reset_clock() -> None:
    """Forget a half-open pair (call before handing the clock to a new pytest-benchmark run)."""
    _state["start"] = None


def _flush_buffer() -> torch.Tensor:
    if _state["flush"] is None:
        l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0)
        _state["flush"] = torch.empty(max(FLUSH_BYTES, 4 * int(l2)), dtype=torch.int8, device="cuda")
    return _state["flush"]


def spin_cycles_per_second() -> float:
    """GPU clock cycles per second of ``torch.cuda._sleep`` (calibrated once)."""
    if _state["cycles_per_s"] is None:
        cycles = 2_000_000
        torch.cuda._sleep(cycles)  # warm up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _state["cycles_per_s"] = cycles / (start.elapsed_time(end) / 1e3)
    return _state["cycles_per_s"]


def make_prefill(host_s: float) -> Callable[[], None]:
    """The per-round setup: flush L2, then keep the GPU busy for ``host_s`` + a margin."""
    flush = _flush_buffer()
    spin_s = min(host_s * 1.5 + SPIN_MARGIN_S, SPIN_MAX_S)
    cycles = int(spin_s * spin_cycles_per_second()) if hasattr(torch.cuda, "_sleep") else 0

    def prefill() -> None:
        flush.zero_()
        if cycles:
            torch.cuda._sleep(cycles)

    return prefill


def host_and_latency(fn: Callable[[], object], reps: int = 5,
                     setup: Callable[[], None] | None = None) -> tuple[float, float]:
    """Median (host enqueue seconds, synchronised latency seconds) of ``fn``, GPU idle before each call;
    ``setup`` (untimed) runs before each call (e.g. restoring inputs that ``fn`` consumes)."""
    host, latency = [], []
    for _ in range(reps):
        if setup:
            setup()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append(t1 - t0)
        latency.append(t2 - t0)
    return statistics.median(host), statistics.median(latency)


def measure_rounds(fn: Callable[[], object], prefill: Callable[[], None], rounds: int,
                   warmup_rounds: int = 2) -> list[float]:
    """Device seconds of ``rounds`` rounds of ``fn`` (see the module docstring), without pytest-benchmark."""
    times = []
    for i in range(warmup_rounds + rounds):
        prefill()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= warmup_rounds:
            times.append(start.elapsed_time(end) / 1e3)
    return times


def choose_rounds(device_s: float, prefill_s: float, budget_s: float, lo: int = 10, hi: int = 200) -> int:
    """Rounds so that a case costs about ``budget_s`` of wall time, within ``[lo, hi]``."""
    return max(lo, min(hi, int(budget_s / max(device_s + prefill_s, 1e-6))))


def summarize(times: list[float]) -> dict:
    """Median, min, max, interquartile range of round times (seconds)."""
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "iqr_s": q[2] - q[0], "rounds": len(times)}


# ----------------------------------------------------------------------------- machine ceilings


def event_median(fn: Callable[[], object], reps: int, warmup: int = 3) -> float:
    """Median device seconds of ``fn`` with L2 flushed before each repetition."""
    flush = _flush_buffer()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure_ceilings(copy_bytes: int = 1 << 30, matmul_n: int = 8192) -> dict:
    """The machine's own ceilings, measured now.

    ``copy_bytes_per_s``: a device-to-device ``copy_`` of ``copy_bytes``, counting read + write
    (2 x ``copy_bytes`` per copy). ``matmul_flops_per_s[dtype]``: ``torch.matmul`` of two
    ``matmul_n``-square random matrices (2 n^3 flops), under the current
    ``torch.get_float32_matmul_precision()`` (recorded: "highest" means fp32 without TF32).
    """
    src = torch.randn(copy_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    copy_s = event_median(lambda: dst.copy_(src), reps=20)
    del src, dst
    rates = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        a = torch.randn(matmul_n, matmul_n, device="cuda", dtype=dtype)
        b = torch.randn(matmul_n, matmul_n, device="cuda", dtype=dtype)
        t = event_median(lambda: torch.matmul(a, b), reps=10)
        rates[str(dtype).replace("torch.", "")] = 2 * matmul_n ** 3 / t
        del a, b
    torch.cuda.empty_cache()
    return {"copy_bytes_per_s": 2 * copy_bytes / copy_s, "copy_bytes": copy_bytes, "matmul_n": matmul_n,
            "matmul_flops_per_s": rates, "float32_matmul_precision": torch.get_float32_matmul_precision()}
