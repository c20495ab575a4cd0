"""Measure one kernel's autotuning cost in a fresh process (run by perf/test_autotune_cost.py).

    python -m perf.autotune_probe KERNEL      (cwd: the repository root)

Environment: ``KFOPT_PERF_MODE`` (sizes, and the interpreter in the smoke run),
``KFOPT_PERF_AUTOTUNE_CACHE`` (the tuning cache file) and ``TRITON_CACHE_DIR`` (compiled kernels):
the caller points them at empty folders for a cold first process, and reuses them for the second.
Prints one JSON object: first_call_s (wall time of the first call, synchronised: compile + tune on a
cold cache, cache lookup + loading compiled kernels on a warm one), cached_call_s (median wall time
of 10 later synchronised calls), the config chosen, the number of candidates, whether the cache
file changed, and the case's shape and dtype.
"""

from __future__ import annotations

from perf import config  # noqa: I001  (sets TRITON_INTERPRET in the smoke run, before triton is imported)

import importlib
import json
import os
import pkgutil
import statistics
import sys
import time

import torch


def config_space(kernel: str):
    """The ``ConfigSpace`` named ``kernel`` in any module of kfopt.kernels."""
    import kfopt.kernels as kernels
    from kfopt.autotune import ConfigSpace
    for info in pkgutil.iter_modules(kernels.__path__):
        mod = importlib.import_module(f"kfopt.kernels.{info.name}")
        for value in vars(mod).values():
            if isinstance(value, ConfigSpace) and value.kernel == kernel:
                return value
    return None


def build(kernel: str):
    """(call, shape label, dtype label) of the kernel's probe case: elementwise steps on a 1e7-parameter
    GPT-2-small mix (fp32); factor kernels on the first shape of their quick grid (perf.cases.FACTOR;
    the smoke run: of their smoke grid). The rank-1 update works in place: each call first restores
    its factors and scales (two copies, included in the call's time)."""
    from perf import cases
    device = config.DEVICE
    if kernel in ("lamb_step", "lars_step", "sonew_step"):
        total = {"smoke": 3000}.get(config.MODE, int(1e7))
        mix = cases.elementwise_mix("gpt2-small", total)
        ps = cases.ParamSet(mix, torch.float32, device)
        runner = {"lamb_step": cases.LambRunner, "lars_step": cases.LarsRunner,
                  "sonew_step": lambda p: cases.SonewRunner(p, 1)}[kernel](ps)
        return runner.step, mix.label, "fp32"
    methods = {m.name: m for m in cases.FACTOR}
    if kernel not in methods:
        raise KeyError(f"no probe case for kernel {kernel!r} (elementwise steps, or one of {sorted(methods)})")
    method = methods[kernel]
    p = method.grid["smoke" if config.SMOKE else "quick"][0]
    inputs = method.make_inputs(p, device)
    run = next(impl.run for impl in method.impls if impl.role == "kernel")
    reset = method.reset

    def call():
        if reset:
            reset(inputs)
        run(inputs)

    return call, method.label(p), cases.dtype_name(p["dtype"])


def main(kernel: str) -> dict:
    call, shape, dtype = build(kernel)
    cuda = config.DEVICE.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.zeros(1, device="cuda")
        sync()
    cache = config.AUTOTUNE_CACHE
    before = os.path.getmtime(cache) if os.path.exists(cache) else None
    t0 = time.perf_counter()
    call()
    sync()
    first = time.perf_counter() - t0
    after = os.path.getmtime(cache) if os.path.exists(cache) else None
    cached = []
    for _ in range(3 if config.SMOKE else 10):
        t0 = time.perf_counter()
        call()
        sync()
        cached.append(time.perf_counter() - t0)
    entries = {}
    if os.path.exists(cache):
        with open(cache) as f:
            entries = {k: v for k, v in json.load(f).items() if k.startswith(f"{kernel}|")}
    space = config_space(kernel)
    return {"kernel": kernel, "shape": shape, "dtype": dtype, "mode": config.MODE, "first_call_s": first,
            "cached_call_s": statistics.median(cached), "cache_written": after != before,
            "cache_entries": len(entries), "chosen": [v.get("config") for v in entries.values()],
            "n_configs": len(space.configs) if space else None,
            "default": space.default.to_json() if space else None}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
