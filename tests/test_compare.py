"""``kfopt compare`` end to end on tiny budgets: outputs and their consistency, argument errors,
divergence and failure handling, Ctrl-C. Kernels take the PyTorch path (they are tested elsewhere)."""

import json
import os
import subprocess
import sys
import types

import pytest
import torch

import kfopt

from kfopt.__main__ import main
from kfopt.compare import registry, runner
from kfopt.compare.registry import REGISTRY, OptimizerSpec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("KFOPT_BACKEND", "torch")


@pytest.fixture
def test_optimizers(monkeypatch):
    """Registers ``blowup`` (SGD at an absurd lr: diverges) and ``broken`` (raises at its third step)."""

    class Broken(torch.optim.SGD):
        def step(self, closure=None):
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 3:
                raise RuntimeError("broken on purpose")
            return super().step(closure)

    module = types.ModuleType("kfopt_test_optimizers")
    module.Broken = Broken
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(REGISTRY, "blowup", OptimizerSpec("blowup", "torch.optim", "SGD",
                                                          lr={"chars": 1e5, "digits": 1e5}))
    monkeypatch.setitem(REGISTRY, "broken", OptimizerSpec("broken", module.__name__, "Broken",
                                                          lr={"chars": 0.1, "digits": 0.1}))


def table_rows(text: str) -> dict[str, list[str]]:
    """Rows of the results table by optimizer name (the lines between the dashes and the blank line)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("---")) + 1
    rows = {}
    for line in lines[start:]:
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = cells
    return rows


def test_end_to_end_outputs_agree(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["compare", "--steps", "8", "--optimizers", "lamb", "--lr", "lamb=5e-3", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    table = (out / "results.txt").read_text()
    assert table in stdout and str(out / "results.json") in stdout and str(out / "loss.png") in stdout
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC
    doc = json.loads((out / "results.json").read_text())
    runs = {r["optimizer"]: r for r in doc["runs"]}
    assert list(runs) == ["adamw", "lamb"]  # the baseline is always added, first
    assert doc["config"]["steps"] == 8 and doc["config"]["task"] == "chars" and not doc["interrupted"]
    assert runs["lamb"]["lr"] == 5e-3 and runs["adamw"]["lr"] == REGISTRY["adamw"].lr["chars"]
    rows = table_rows(table)
    assert set(rows) == set(runs)
    header = table.splitlines()[0].split()
    assert header[2:6] == [f"val@{s}" for s in doc["config"]["table_columns"]] == ["val@2", "val@4", "val@6", "val@8"]
    for name, run in runs.items():
        assert run["status"] == "ok" and run["steps_done"] == 8 and len(run["step_time"]) == 8
        assert [e["step"] for e in run["evals"]] == doc["config"]["eval_steps"]
        row = rows[name]
        assert row[5] == f"{run['final_val_loss']:.4f}"  # val@8 is the last validation
        assert row[6] == f"{run['final_smoothed_loss']:.4f}"
        assert row[-1] == "ok" and float(row[-2]) == pytest.approx(run["state_mib"], abs=0.01)
        assert run["state_bytes"] > 0
    # same seed: same initial weights and the same first batch for every optimizer
    assert runs["adamw"]["train_loss"][0] == runs["lamb"]["train_loss"][0]
    assert runs["adamw"]["evals"][0]["loss"] == runs["lamb"]["evals"][0]["loss"]
    assert runs["adamw"]["step_time_vs_baseline"] == 1.0


def test_python_dash_m_help():
    proc = subprocess.run([sys.executable, "-m", "kfopt", "compare", "--help"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "KFOPT_BACKEND": "torch"})
    assert proc.returncode == 0, proc.stderr
    assert "--optimizers" in proc.stdout and "adamw" in proc.stdout and "lamb" in proc.stdout


@pytest.mark.parametrize("argv, message", [
    (["--optimizers", "adamw,nosuchopt"], "unknown optimizer 'nosuchopt'; available: adamw"),
    (["--optimizers", ","], "--optimizers"),
    (["--lr", "lamb"], "expected NAME=VALUE"),
    (["--lr", "lamb=fast"], "'lamb=fast'"),
    (["--lr", "lamb=-1"], "positive number"),
    (["--optimizers", "lamb", "--lr", "lars=1"], "argument --lr: 'lars' is not among the optimizers compared"),
    (["--hparam", "lamb=0.1"], "NAME.KEY=VALUE"),
    (["--optimizers", "lamb", "--hparam", "lamb.momentum=0.9"], "optimizer 'lamb' rejects its hyperparameters"),
    (["--optimizers", "lamb", "--hparam", "lamb.betas=(0.9, 2.0)"], "betas"),
    (["--text", "/no/such/file.txt"], "no such file"),
    (["--task", "digits", "--text", __file__], "only the chars task"),
    (["--task", "images"], "--task"),
    (["--size", "huge"], "--size"),
    (["--steps", "0"], "expected an integer >= 1"),
    (["--seed", "-1"], "expected an integer >= 0"),
    (["--target", "nan"], "positive number"),
    (["--device", "tpu"], "expected auto, cpu or cuda"),
])
def test_argument_errors(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--out", str(tmp_path / "never"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: kfopt compare" in err and message in err
    assert not (tmp_path / "never").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_requested_without_cuda(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--device", "cuda"])
    assert exc.value.code == 2 and "CUDA is not available" in capsys.readouterr().err


def test_text_too_short(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--text", str(short), "--out", str(tmp_path / "run")])
    assert exc.value.code == 2 and "at least" in capsys.readouterr().err


def test_digits_without_scikit_learn(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--task", "digits"])
    assert exc.value.code == 2 and "kfopt[digits]" in capsys.readouterr().err


def test_own_text(tmp_path):
    text = tmp_path / "own.txt"
    text.write_bytes(open(__file__, "rb").read() * 3)
    assert main(["compare", "--text", str(text), "--steps", "3", "--optimizers", "adamw", "--no-plot",
                 "--out", str(tmp_path / "run")]) == 0
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    assert doc["config"]["data"]["source"] == "file" and doc["config"]["data"]["path"] == str(text)
    assert doc["config"]["data"]["bytes"] == text.stat().st_size
    assert [r["optimizer"] for r in doc["runs"]] == ["adamw"] and doc["runs"][0]["status"] == "ok"


def test_unavailable_optimizer(monkeypatch, capsys):
    monkeypatch.setitem(REGISTRY, "ghost", OptimizerSpec("ghost", "kfopt.no_such_module", "Ghost", lr={}))
    assert "ghost" not in registry.available_optimizers()
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--optimizers", "ghost"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "'ghost' is not available" in err and "kfopt.no_such_module" in err


def test_divergence_and_failure_do_not_stop_the_others(test_optimizers, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # default output folder: ./kfopt_runs/<date-time>
    status = main(["compare", "--task", "digits", "--steps", "16", "--optimizers", "blowup,broken,lamb", "--no-plot"])
    assert status == 1  # a run raised
    (folder,) = (tmp_path / "kfopt_runs").iterdir()
    assert sorted(os.listdir(folder)) == ["results.json", "results.txt"]
    doc = json.loads((folder / "results.json").read_text())
    runs = {r["optimizer"]: r for r in doc["runs"]}
    assert list(runs) == ["adamw", "blowup", "broken", "lamb"]
    assert runs["blowup"]["status"] == "diverged" and runs["blowup"]["steps_done"] < 16
    assert "loss" in runs["blowup"]["message"]
    assert runs["broken"]["status"] == "failed" and "broken on purpose" in runs["broken"]["message"]
    assert runs["broken"]["steps_done"] == 2
    for name in ("adamw", "lamb"):
        assert runs[name]["status"] == "ok" and runs[name]["steps_done"] == 16
        assert runs[name]["final_val_accuracy"] is not None
    rows = table_rows((folder / "results.txt").read_text())
    assert rows["blowup"][-1] == "diverged" and rows["broken"][-1] == "failed" and rows["lamb"][-1] == "ok"
    assert "val acc" in (folder / "results.txt").read_text()
    assert "RuntimeError: broken on purpose" in capsys.readouterr().err


def test_huge_lr_diverges(tmp_path):
    assert main(["compare", "--task", "digits", "--steps", "10", "--optimizers", "lamb", "--lr", "adamw=1e6",
                 "--no-plot", "--out", str(tmp_path)]) == 0
    runs = {r["optimizer"]: r for r in json.loads((tmp_path / "results.json").read_text())["runs"]}
    assert runs["adamw"]["status"] == "diverged" and runs["lamb"]["status"] == "ok"


def test_ctrl_c_writes_what_was_measured(tmp_path, monkeypatch, capsys):
    real_step, calls = runner.train_step, []

    def interrupted_step(*args):
        calls.append(1)
        if len(calls) == 12 + 4:  # the fourth step of the second run
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(runner, "train_step", interrupted_step)
    status = main(["compare", "--task", "digits", "--steps", "12", "--optimizers", "lamb,lars", "--out", str(tmp_path)])
    assert status == 130
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["interrupted"] and doc["not_run"] == ["lars"]
    runs = {r["optimizer"]: r for r in doc["runs"]}
    assert runs["adamw"]["status"] == "ok" and runs["adamw"]["steps_done"] == 12
    assert runs["lamb"]["status"] == "interrupted" and runs["lamb"]["steps_done"] == 3
    table = (tmp_path / "results.txt").read_text()
    assert "interrupted (Ctrl-C)" in table and "not run: lars" in table
    assert table_rows(table)["lamb"][-1] == "interrupted"
    assert (tmp_path / "loss.png").read_bytes()[:8] == PNG_MAGIC


def test_lr_schedule_and_eval_steps():
    factors = [runner.lr_factor(step, 100) for step in range(100)]
    assert factors[4] == 1.0 and max(factors) == 1.0 and factors[0] == pytest.approx(0.2)
    assert factors[-1] == pytest.approx(runner.FINAL_LR_FRACTION, abs=1e-3)
    assert runner.eval_steps(300) == [0, 38, 75, 112, 150, 188, 225, 262, 300]
    assert runner.eval_steps(3) == [0, 1, 2, 3]


def test_state_bytes_counts_each_storage_once():
    model = torch.nn.Linear(3, 10)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    # exp_avg and exp_avg_sq per parameter (fp32) and a 0-d fp32 step each; params and grads excluded
    assert runner.state_bytes(opt, model) == 2 * 4 * (30 + 10) + 2 * 4
    opt.state[model.weight]["alias"] = opt.state[model.weight]["exp_avg"][0]
    assert runner.state_bytes(opt, model) == 2 * 4 * (30 + 10) + 2 * 4


def test_state_bytes_counts_kronecker_factors(monkeypatch):
    monkeypatch.setenv("KFOPT_BACKEND", "torch")
    model = torch.nn.Sequential(torch.nn.Linear(3, 10), torch.nn.Tanh(), torch.nn.Linear(10, 2))
    opt = kfopt.KFAC(model, lr=0.1, inv_update_steps=1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    factors = 4 * ((3 + 1) ** 2 + 10 ** 2 + (10 + 1) ** 2 + 2 ** 2)
    assert runner.state_bytes(opt, model) >= 2 * factors  # factors and their eigenvectors at least
