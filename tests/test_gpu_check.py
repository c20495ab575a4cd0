"""perf/gpu_check.sh without a GPU: the dry run's plan (stages in priority order, every public kernel in
every dtype, every optimizer, the compile count and time estimates), the CPU smoke run of a small part of
the plan (correctness checks run, summary written), the deadline, and ``KFOPT_AUTOTUNE=default``."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kfopt
import kfopt.autotune.space as space
from kfopt import kernels
from kfopt.autotune import Config, ConfigSpace

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "perf" / "gpu_check.sh"
STAGE_NAMES = ["environment", "correctness", "elementwise", "steps", "factor", "torch.compile", "rest"]
NOT_KERNELS = {"INTERPRETER", "KERNEL_DTYPES", "backend_override", "use_triton"}


def _run(*args, env=None, timeout=120):
    env = {k: v for k, v in dict(os.environ, **(env or {})).items() if k != "TRITON_INTERPRET"}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def plan():
    out = _run("--dry-run", timeout=30)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def public_kernels():
    return sorted(n for n in kernels.__all__ if n not in NOT_KERNELS and not n.endswith("_reference"))


def test_dry_run_lists_every_stage_in_priority_order(plan):
    stages = re.findall(r"^stage (\d) (\S+): (\d+) items, estimated compiles (\d+) .*estimated (\d+) s, "
                        r"cumulative (\d+) s", plan, re.M)
    assert [int(s[0]) for s in stages] == list(range(1, 8)), plan[:2000]
    assert [s[1] for s in stages] == STAGE_NAMES
    assert all(int(s[2]) > 0 for s in stages), "a stage without items"
    cumulative = [int(s[5]) for s in stages]
    assert cumulative == sorted(cumulative)
    # the first five stages (environment .. factor kernels) are planned to fit the default deadline
    assert cumulative[4] <= 450, f"stages 1-5 are estimated at {cumulative[4]} s > 450 s"
    compiles = re.search(r"^estimated cold compile count: (\d+) Triton kernel signatures", plan, re.M)
    assert compiles and int(compiles.group(1)) > 0
    assert int(compiles.group(1)) == sum(int(s[3]) for s in stages)
    assert int(stages[1][3]) > 0, "stage 2 must compile the kernels (in parallel)"
    assert re.search(r"stage 2 runs on \d+ worker processes", plan)


def test_dry_run_covers_every_public_kernel_dtype_and_optimizer(plan):
    checked = re.search(r"^public kernels checked: (.*)$", plan, re.M).group(1).split(", ")
    assert sorted(checked) == public_kernels()
    for name in public_kernels():
        for dtype in ("fp32", "bf16", "fp16"):
            for shape in ("awkward", "large"):
                assert re.search(rf"- kernel {name} {dtype} {shape}\b", plan), f"no check of {name} {dtype} {shape}"
    optimizers = re.search(r"^optimizers checked: (.*)$", plan, re.M).group(1).split(", ")
    for cls in kfopt.__all__:
        if isinstance(getattr(kfopt, cls), type) and issubclass(getattr(kfopt, cls), torch.optim.Optimizer):
            assert any(o == cls.lower() or o.startswith(cls.lower() + "-") for o in optimizers), f"{cls} not checked"
    for method in ("kfac", "mkor", "mkorh", "singd-dense", "singd-block32", "singd-toeplitz"):
        assert f"- step {method} kfopt gpt2-small" in plan
    for method in ("lamb", "lars", "sonew-band1", "sonew-band4"):
        for dtype in ("fp32", "bf16"):
            assert f"- elementwise {method} kfopt gpt2-small {dtype}" in plan
    for method in ("lamb", "sonew-band1"):
        assert f"- torch.compile {method} gpt2-small fp32" in plan
    for name in ("symmetric_covariance", "rank1_inverse_update", "eigen_precondition", "block_diagonal_matmul",
                 "triangular_matmul", "toeplitz_matmul"):
        for d in (1024, 4096):
            assert f"- factor {name} kfopt d={d} bf16" in plan


@pytest.mark.slow
def test_cpu_smoke_runs_checks_and_writes_the_summary(tmp_path):
    out = _run("--cpu-smoke", "--workers", "1", "--only", "kernel symmetric_covariance fp32", str(tmp_path),
               timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    summary = (tmp_path / "gpu_check_summary.md").read_text()
    assert "| 2 correctness | 2 | 2 | 0 | 0 |" in summary, summary
    assert "## Correctness failures\n\nnone" in summary
    assert (tmp_path / "gpu_check.log").exists() and (tmp_path / "gpu_check_items.jsonl").exists()
    assert not list((REPO / "perf" / "results").glob("cpu-*")), "the smoke run wrote to perf/results/"


@pytest.mark.slow
def test_past_the_deadline_items_are_skipped_and_the_summary_still_written(tmp_path):
    out = _run("--cpu-smoke", "--workers", "1", "--only", "kernel symmetric_covariance fp32", str(tmp_path),
               env={"KFOPT_GPU_CHECK_DEADLINE_S": "1"}, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    summary = (tmp_path / "gpu_check_summary.md").read_text()
    assert "## Skipped (3)" in summary, summary
    assert "kernel symmetric_covariance fp32 large: deadline" in summary


def test_forced_default_config_is_untimed_and_uncached(monkeypatch, tmp_path):
    a, b = Config({"BLOCK": 1}), Config({"BLOCK": 2})
    cs = ConfigSpace("probe", [a, b], default=b)
    monkeypatch.setattr(space, "can_benchmark", lambda device: True)
    monkeypatch.setattr(space, "benchmark", lambda fn: pytest.fail("timed a candidate"))
    monkeypatch.setenv("KFOPT_AUTOTUNE_CACHE", str(tmp_path / "cache.json"))
    monkeypatch.setenv("KFOPT_AUTOTUNE", "default")
    assert cs.select(device=torch.device("cpu"), bucket=(8,), dtype="fp32", run=lambda c: None) == b
    assert not (tmp_path / "cache.json").exists()
    monkeypatch.setenv("KFOPT_AUTOTUNE", "sometimes")
    with pytest.raises(ValueError, match="KFOPT_AUTOTUNE"):
        cs.select(device=torch.device("cpu"), bucket=(8,), dtype="fp32", run=lambda c: None)
    monkeypatch.setenv("KFOPT_AUTOTUNE", "tune")  # tuning again: every candidate timed
    timed = []
    monkeypatch.setattr(space, "benchmark", lambda fn: timed.append(1) or float(len(timed)))
    assert cs.select(device=torch.device("cpu"), bucket=(8,), dtype="fp32", run=lambda c: None) == a
    assert len(timed) == 2


def test_main_module_imports_without_a_gpu():
    out = subprocess.run([sys.executable, "-c", "import perf.gpu_check as g; print(len(g.build_plan(False)))"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and int(out.stdout.strip()) > 100, out.stderr
