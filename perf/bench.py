"""``Bench``: times one case and records it (used by the pytest suite's ``bench`` fixture and by
``perf/gpu_check.py``; see perf/timing.py for what is measured)."""

from __future__ import annotations

import time

import torch

from perf import config as perf_config
from perf import timing
from perf.results import Recorder


class Bench:
    """Times one case and records it. ``benchmark``: pytest-benchmark's fixture or None (then
    ``perf.timing.measure_rounds`` runs the rounds); ``budget_s``: wall seconds of timed rounds
    (default ``KFOPT_PERF_BUDGET_S``). Every timed record gets ``extra.first_call_s`` (the first,
    untimed call: compilation, tuning or loading compiled kernels, and one run) and ``extra.measure_s``
    (the wall time of everything after it)."""

    def __init__(self, benchmark, recorder: Recorder, budget_s: float | None = None):
        self.benchmark, self.recorder = benchmark, recorder
        self.budget_s = perf_config.BUDGET_S if budget_s is None else budget_s

    def run(self, fn, *, family: str, method: str, impl: str, role: str, group: str, shape: str, dtype: str,
            params: dict | None = None, bytes: float | None = None, compulsory_bytes: float | None = None,
            flops: float | None = None, flops_dtype: str | None = None, reset=None, check: dict | None = None,
            extra: dict | None = None) -> dict:
        fields = dict(family=family, method=method, impl=impl, role=role, group=group, shape=shape, dtype=dtype,
                      params=params or {}, bytes=bytes, compulsory_bytes=compulsory_bytes, flops=flops,
                      flops_dtype=flops_dtype, check=check, extra=extra or {})
        real = self.benchmark is not None
        if perf_config.SMOKE or (real and self.benchmark.disabled):
            if real:  # the case already ran once in its correctness check; tell pytest-benchmark nothing was timed
                self.benchmark.disabled = True
                self.benchmark.pedantic(lambda: None)
            return self.recorder.add(**fields, median_s=None)

        prefill_only = timing.make_prefill(0.0)

        def warm_setup():
            if reset:
                reset()
            prefill_only()

        first_call_s = None
        for _ in range(2):  # compile + autotune happen here, untimed
            warm_setup()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            if first_call_s is None:
                first_call_s = time.perf_counter() - t0
        t_measure = time.perf_counter()
        host_s, latency_s = timing.host_and_latency(fn, setup=reset)
        prefill = timing.make_prefill(host_s)

        def setup():
            if reset:
                reset()
            prefill()

        estimate = sorted(timing.measure_rounds(fn, setup, rounds=3, warmup_rounds=0))[1]
        spin_s = min(host_s * 1.5 + timing.SPIN_MARGIN_S, timing.SPIN_MAX_S)
        rounds = timing.choose_rounds(estimate, spin_s + 2e-4, self.budget_s)
        if real:
            self.benchmark.group = group.replace("|", " ")
            timing.reset_clock()
            self.benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=2, iterations=1)
            times = list(self.benchmark.stats.stats.data)
        else:
            times = timing.measure_rounds(fn, setup, rounds=rounds)
        fields["extra"] = dict(fields["extra"], first_call_s=first_call_s,
                               measure_s=time.perf_counter() - t_measure)
        rec = self.recorder.add(**fields, **timing.summarize(times), host_s=host_s, latency_s=latency_s,
                                host_bound=host_s > timing.summarize(times)["median_s"])
        if real:
            self.benchmark.extra_info.update({k: rec.get(k) for k in (
                "bytes", "flops", "floor_fraction", "bytes_per_s", "flops_per_s", "host_s", "latency_s", "shape",
                "dtype", "device_name", "commit")})
        return rec
