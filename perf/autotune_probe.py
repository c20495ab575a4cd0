"""Measure one kernel's autotuning cost in a fresh process (run by perf/test_autotune_cost.py).

    python -m perf.autotune_probe KERNEL      (cwd: the repository root)

Environment: ``KFOPT_PERF_MODE`` (sizes, and the interpreter in the smoke run),
``KFOPT_PERF_AUTOTUNE_CACHE`` (the tuning cache file) and ``TRITON_CACHE_DIR`` (compiled kernels):
the caller points them at empty folders for a cold first process, and reuses them for the second.
Prints one JSON object: first_call_s (wall time of the first call, synchronised: compile + tune on a
cold cache, cache lookup + loading compiled kernels on a warm one), cached_call_s (median wall time
of 10 later synchronised calls), the config chosen, the number of candidates, whether the cache
file changed, and the case's shape and dtype; or {"skip": reason}.
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
    """(call, shape label, dtype label) of the kernel's probe case, or a skip reason string."""
    from perf import cases
    device = config.DEVICE
    total = {"smoke": 3000}.get(config.MODE, int(1e7))
    if kernel in ("lamb_step", "lars_step", "sonew_step"):
        if kernel == "sonew_step" and cases.SONEW_MISSING:
            return f"kfopt SONew does not import ({cases.SONEW_MISSING})"
        mix = cases.elementwise_mix("gpt2-small", total)
        ps = cases.ParamSet(mix, torch.float32, device)
        runner = {"lamb_step": cases.LambRunner, "lars_step": cases.LarsRunner,
                  "sonew_step": lambda p: cases.SonewRunner(p, 1)}[kernel](ps)
        return runner.step, mix.label, "fp32"
    if kernel == "symmetric_covariance":
        if cases.COVARIANCE_MISSING:
            return f"kfopt symmetric_covariance does not import ({cases.COVARIANCE_MISSING})"
        rows, d = (50, 70) if config.SMOKE else (4096, 1024)
        x = torch.randn(rows, d, device=device).to(torch.bfloat16)
        return (lambda: cases.COVARIANCE[0](x)), f"d={d},rows={rows}", "bf16"
    if kernel == "eigen_precondition":
        if cases.EIGEN_MISSING:
            return f"kfopt eigen_precondition does not import ({cases.EIGEN_MISSING})"
        m = 24 if config.SMOKE else 1024
        p = {"layers": [(m, m)], "dtype": torch.bfloat16}
        inputs = cases.EIGEN_PRECONDITION.make_inputs(p, device)
        call = cases.EIGEN_PRECONDITION.impls[0].run
        return (lambda: call(inputs)), f"{m}x{m}", "bf16"
    return f"unknown kernel {kernel!r}"


def main(kernel: str) -> dict:
    built = build(kernel)
    if isinstance(built, str):
        return {"skip": built}
    call, shape, dtype = built
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
