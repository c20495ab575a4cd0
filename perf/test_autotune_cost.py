"""Autotuning cost: first-call tuning time and cached-call time, each kernel in fresh processes.

Process 1 starts with an empty tuning cache and an empty Triton kernel cache (compile + tune);
process 2 reuses both (what the next training job pays). The smoke run checks that under the
interpreter nothing is timed and no cache entry is written (kfopt.autotune's contract).
"""

import json
import os
import subprocess
import sys

import pytest

from perf.cases import AUTOTUNE_CASES
from perf.config import MODE, SMOKE
from perf.results import REPO


def probe(kernel: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "perf.autotune_probe", kernel], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"autotune probe for {kernel} failed:\n{out.stderr[-4000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kernel", AUTOTUNE_CASES[MODE])
def test_autotune_cost(recorder, kernel, tmp_path):
    env = dict(os.environ, KFOPT_PERF_MODE=MODE, KFOPT_PERF_AUTOTUNE_CACHE=str(tmp_path / "autotune.json"),
               TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), PYTHONPATH=os.pathsep.join(
                   [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    first = probe(kernel, env)
    extra = {"first_call_s": first["first_call_s"], "n_configs": first["n_configs"],
             "chosen": first["chosen"], "default": first["default"]}
    if SMOKE:
        assert not first["cache_written"] and first["cache_entries"] == 0, \
            "under the interpreter autotune must pick the default config without timing or caching"
    else:
        assert first["cache_written"] and first["cache_entries"] >= 1, f"{kernel}: the first call did not tune"
        second = probe(kernel, env)
        assert not second["cache_written"], f"{kernel}: a second process tuned again instead of using the cache"
        extra.update(second_process_first_call_s=second["first_call_s"], cached_call_s=second["cached_call_s"])
    recorder.add(family="autotune", method=kernel, impl="kfopt", role="autotune", group=f"autotune|{kernel}",
                 shape=first["shape"], dtype=first["dtype"], median_s=None, params={},
                 check={"against": "autotune contract", "max_rel_err": 0.0}, extra=extra)
