"""``kfopt compare`` end to end on tiny budgets: outputs and their consistency, argument errors,
divergence and failure handling, Ctrl-C; the lr sweep, seeds, verdicts, the run cache and the time
budget on a synthetic quadratic task whose best learning rate is known. Kernels take the PyTorch
path (they are tested elsewhere)."""

import argparse
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import kfopt

from kfopt.__main__ import main
from kfopt.compare import cli, plan, registry, runner, summary
from kfopt.compare.registry import REGISTRY, OptimizerSpec
from kfopt.compare.tasks import Task

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
    assert doc["config"]["seeds"] == [0] and doc["config"]["sweep"]["factors"] == [1.0]
    assert doc["runs_run"] == 2 and doc["runs_reused"] == 0
    assert runs["lamb"]["lr"] == 5e-3 and runs["adamw"]["lr"] == REGISTRY["adamw"].lr["chars"]
    rows = table_rows(table)
    assert set(rows) == set(runs)
    header = table.splitlines()[0].split()
    assert header[2:6] == [f"val@{s}" for s in doc["config"]["table_columns"]] == ["val@2", "val@4", "val@6", "val@8"]
    assert "--thorough" in table  # no sweep, one seed: the table says how to tune
    for name, run in runs.items():
        assert doc["summary"][name]["lr"] == run["lr"] and doc["summary"][name]["seeds"] == [0]
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
    assert doc["summary"]["adamw"]["step_time_vs_baseline"] == 1.0
    lamb = doc["summary"]["lamb"]
    assert lamb["step_time_vs_baseline"] == pytest.approx(
        runs["lamb"]["median_step_ms"] / runs["adamw"]["median_step_ms"])
    if lamb["steps_to_target"]["mean"] is not None:
        assert lamb["time_to_target_s"] == pytest.approx(lamb["steps_to_target"]["mean"] * lamb["median_step_ms"] / 1e3)


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
    (["--sweep", "0"], "expected an integer >= 1"),
    (["--seeds", "two"], "expected an integer >= 1"),
    (["--budget-s", "-5"], "positive number"),
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


def test_default_run_leaves_out_the_variants_and_all_runs_them():
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    every = list(registry.available_optimizers())
    default = cli._select_optimizers(parser.parse_args([]), parser)
    assert default[0] == "adamw" and set(default) == {n for n in every if REGISTRY[n].in_default_run}
    assert {"mkorh", "mkorh-graft", "sonew4", "singd-toeplitz"}.isdisjoint(default)
    assert {"kfac", "mkor", "singd", "sonew", "kfac-graft"} <= set(default)
    assert cli._select_optimizers(parser.parse_args(["--optimizers", "all"]), parser) == every
    assert cli._select_optimizers(parser.parse_args(["--optimizers", "mkorh"]), parser) == ["adamw", "mkorh"]


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
    assert doc["interrupted"] and doc["not_run"] == ["lars lr 10 seed 0"]
    runs = {r["optimizer"]: r for r in doc["runs"]}
    assert runs["adamw"]["status"] == "ok" and runs["adamw"]["steps_done"] == 12
    assert runs["lamb"]["status"] == "interrupted" and runs["lamb"]["steps_done"] == 3
    table = (tmp_path / "results.txt").read_text()
    assert "interrupted (Ctrl-C)" in table and "not run: lars (lr 10, seed 0)" in table
    assert table_rows(table)["lamb"][-1] == "interrupted"
    assert (tmp_path / "loss.png").read_bytes()[:8] == PNG_MAGIC
    # the same command again continues: AdamW comes from the cache, the interrupted run is repeated
    monkeypatch.setattr(runner, "train_step", real_step)
    assert main(["compare", "--task", "digits", "--steps", "12", "--optimizers", "lamb,lars", "--no-plot",
                 "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert not doc["interrupted"] and doc["runs_reused"] == 1 and doc["runs_run"] == 2
    assert [r["status"] for r in doc["runs"]] == ["ok"] * 3 and doc["runs"][0]["train_loss"] == runs["adamw"]["train_loss"]


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


# --- sweep, seeds, verdicts, cache and budget on a quadratic whose best lr is known -------------------

CURVATURE = 1.0
SPREAD = 1e-3
STEPS = 12


class Quadratic(Task):
    """loss(w) = CURVATURE / 2 * |w|^2 for every batch, w ~ 1 + N(0, SPREAD^2) in 4 dimensions (seeds barely
    differ, so a small lr difference shows beyond their spread). SGD without momentum
    multiplies w by (1 - lr * factor(t) * CURVATURE) at step t, so the final loss of a peak lr is known."""

    def build_model(self):
        model = torch.nn.Module()
        model.w = torch.nn.Parameter(1 + SPREAD * torch.randn(4))
        return model

    def train_batch(self, generator):
        batch = torch.rand(3, generator=generator)
        self.batches.append(batch)
        return batch, batch

    def loss(self, model, batch):
        return 0.5 * CURVATURE * (model.w ** 2).sum()

    @torch.no_grad()
    def evaluate(self, model):
        return {"loss": self.loss(model, None).item()}


def sgd_final_loss_ratio(lr: float) -> float:
    """final / initial loss of SGD at peak ``lr`` on the quadratic, from the equation above."""
    ratio = 1.0
    for t in range(STEPS):
        ratio *= (1 - lr * runner.lr_factor(t, STEPS) * CURVATURE) ** 2
    return ratio


@pytest.fixture
def quadratic(monkeypatch):
    """Every ``kfopt compare`` gets the quadratic; optimizers ``sgd`` (lr 0.5; ``--lr sgd=...``),
    ``adamw2`` (AdamW under another name) and ``slow`` (SGD at lr 1e-4). Returns the task and the runs
    started (optimizer, lr, seed), counted through ``cli.train``."""
    task = Quadratic("chars", "small", torch.device("cpu"), STEPS, 1e-3, {"model": {"type": "Quadratic"}})
    task.batches = []
    monkeypatch.setattr(cli, "make_task", lambda *args: task)
    for name, cls, lr in (("sgd", "SGD", 0.5), ("slow", "SGD", 1e-4)):
        monkeypatch.setitem(REGISTRY, name, OptimizerSpec(name, "torch.optim", cls, lr={"chars": lr}))
    monkeypatch.setitem(REGISTRY, "adamw2", OptimizerSpec("adamw2", "torch.optim", "AdamW", lr=REGISTRY["adamw"].lr,
                                                          defaults=REGISTRY["adamw"].defaults))
    started, real_train = [], cli.train

    def counting_train(task, spec, lr, overrides, initial_model, *, seed, **kwargs):
        started.append((spec.name, lr, seed))
        return real_train(task, spec, lr, overrides, initial_model, seed=seed, **kwargs)

    monkeypatch.setattr(cli, "train", counting_train)
    return types.SimpleNamespace(task=task, started=started)


def compare(out, *argv):
    status = main(["compare", "--no-plot", "--out", str(out), *argv])
    return status, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("default_lr, edge", [(0.5, False), (0.05, True)])
def test_sweep_picks_the_known_best_and_flags_the_edge(quadratic, tmp_path, default_lr, edge, capsys):
    status, doc = compare(tmp_path, "--optimizers", "sgd", "--lr", f"sgd={default_lr}", "--sweep", "5")
    assert status == 0
    factors = [0.25, 0.5, 1.0, 2.0, 4.0]
    assert doc["config"]["sweep"]["factors"] == factors and "x1/4, x1/2, x1, x2, x4" in doc["config"]["sweep"]["grid"]
    lrs = [default_lr * f for f in factors]
    best = min(lrs, key=sgd_final_loss_ratio)
    assert (best in (lrs[0], lrs[-1])) == edge  # the case is what its name says
    sgd = doc["summary"]["sgd"]
    assert sgd["lr"] == pytest.approx(best) and sgd["edge"] == edge
    initial = doc["runs"][1]["evals"][0]["loss"]
    for exponent, point in sgd["sweep"].items():  # every grid point measured as the equation says
        assert point["mean_final_val_loss"] == pytest.approx(
            initial * sgd_final_loss_ratio(default_lr * 2.0 ** int(exponent)), rel=1e-4, abs=1e-12)
    table = (tmp_path / "results.txt").read_text()
    assert table in capsys.readouterr().out
    assert ("sgd: best lr at the edge of the grid (x4): widen the sweep" in table) == edge
    assert ("x4!" if edge else "x2") == table_rows(table)["sgd"][2]
    assert "lr sweep" in table and "x1/4, x1/2, x1, x2, x4" in table and plan.SELECTION_RULE in table
    assert sorted(quadratic.started) == sorted((name, lr, 0) for name in ("adamw", "sgd")
                                               for lr in [doc["config"]["default_lrs"][name] * f for f in factors])


def test_seeds_change_initial_weights_and_batches(quadratic, tmp_path):
    status, doc = compare(tmp_path, "--optimizers", "sgd", "--seeds", "2", "--seed", "5")
    assert status == 0 and doc["config"]["seeds"] == [5, 6]
    assert [(r["optimizer"], r["seed"]) for r in doc["runs"]] == [("adamw", 5), ("sgd", 5), ("adamw", 6), ("sgd", 6)]
    batches = quadratic.task.batches
    assert len(batches) == 4 * STEPS
    per_run = [torch.stack(batches[i * STEPS:(i + 1) * STEPS]) for i in range(4)]
    assert torch.equal(per_run[0], per_run[1]) and torch.equal(per_run[2], per_run[3])  # same seed, same batches
    assert not torch.equal(per_run[0], per_run[2])
    initial = [r["evals"][0]["loss"] for r in doc["runs"]]
    assert initial[0] == initial[1] and initial[2] == initial[3] and initial[0] != initial[2]
    torch.manual_seed(6)
    assert initial[2] == pytest.approx(0.5 * CURVATURE * ((1 + SPREAD * torch.randn(4)) ** 2).sum().item(), rel=1e-6)
    finals = [r["final_val_loss"] for r in doc["runs"] if r["optimizer"] == "sgd"]
    spread = doc["summary"]["sgd"]["final_val_loss"]
    assert spread == {"mean": pytest.approx(sum(finals) / 2), "min": min(finals), "max": max(finals)}
    row = table_rows((tmp_path / "results.txt").read_text())["sgd"]
    assert f"{min(finals):.4f}-{max(finals):.4f}" in row


def test_verdicts_tie_when_ranges_overlap(quadratic, tmp_path):
    status, doc = compare(tmp_path, "--optimizers", "adamw2,sgd,slow", "--seeds", "3")
    assert status == 0
    verdicts = {name: s["verdict"] for name, s in doc["summary"].items()}
    assert verdicts == {"adamw": None, "adamw2": "tie", "sgd": "better", "slow": "worse"}
    rows = table_rows((tmp_path / "results.txt").read_text())
    assert [rows[name][-2] for name in ("adamw", "adamw2", "sgd", "slow")] == ["-", "tie", "better", "worse"]
    assert plan.TIE_RULE in (tmp_path / "results.txt").read_text()
    _, doc = compare(tmp_path / "one", "--optimizers", "adamw2,sgd")  # one seed: no verdict
    assert all(s["verdict"] is None for s in doc["summary"].values())


def test_verdict_rule():
    def s(low, high, seeds=2):
        return {"final_val_loss": {"mean": (low + high) / 2, "min": low, "max": high}, "seeds_used": list(range(seeds))}

    assert summary.verdict(s(1.0, 1.2), s(1.1, 1.3)) == "tie"
    assert summary.verdict(s(1.0, 1.1), s(1.1, 1.3)) == "tie"  # touching ranges
    assert summary.verdict(s(1.0, 1.09), s(1.1, 1.3)) == "better"
    assert summary.verdict(s(1.4, 1.5), s(1.1, 1.3)) == "worse"
    assert summary.verdict(s(1.0, 1.0, seeds=1), s(1.1, 1.3)) is None


def test_cache_reuses_runs_and_keys_on_what_determines_them(quadratic, tmp_path):
    args = ["--optimizers", "sgd", "--sweep", "3"]
    _, first = compare(tmp_path, *args)
    assert len(quadratic.started) == 6 and first["runs_run"] == 6
    table = (tmp_path / "results.txt").read_text()
    quadratic.started.clear()
    _, again = compare(tmp_path, *args)
    assert quadratic.started == [] and again["runs_reused"] == 6 and again["summary"] == first["summary"]
    assert (tmp_path / "results.txt").read_text() == table
    _, extended = compare(tmp_path, *args, "--seeds", "2")  # only the new seed runs
    assert sorted(quadratic.started) == sorted((name, lr, 1) for name, lr, _ in
                                               [(r["optimizer"], r["lr"], 0) for r in first["runs"]])
    quadratic.started.clear()
    _, changed = compare(tmp_path, *args, "--hparam", "sgd.momentum=0.5")  # only sgd's runs change
    assert sorted(quadratic.started) == sorted((r["optimizer"], r["lr"], 0) for r in first["runs"]
                                               if r["optimizer"] == "sgd")
    assert len(changed["other_runs"]) == 3 + 6  # sgd without momentum, seed 1: kept for later
    quadratic.started.clear()
    compare(tmp_path, *args, "--steps", "6")  # every run changes
    assert len(quadratic.started) == 6
    quadratic.started.clear()
    _, back = compare(tmp_path, *args)
    assert quadratic.started == [] and back["summary"] == first["summary"]


def test_cache_key_covers_the_run():
    context = {"task": "chars", "size": "small", "steps": 10, "environment": {"device": "cpu", "kfopt": "0.1.0"}}

    def key(context=context, run=plan.Run("sgd", 0, 0, 0.5), cls="torch.optim.SGD", momentum=0.0):
        return plan.key_id(plan.run_key(context, run, cls, {"momentum": momentum}))

    assert key() == key(dict(context), plan.Run("sgd", 0, 0, 0.5))  # equal runs, equal keys
    variants = [key({**context, "steps": 11}), key({**context, "size": "medium"}),
                key({**context, "environment": {"device": "cuda:0", "kfopt": "0.1.0"}}),
                key({**context, "environment": {"device": "cpu", "kfopt": "0.2.0"}}),
                key(run=plan.Run("lamb", 0, 0, 0.5)), key(run=plan.Run("sgd", 0, 0, 1.0)),
                key(run=plan.Run("sgd", 0, 1, 0.5)), key(cls="kfopt.LARS"), key(momentum=0.9)]
    assert len({key()} | set(variants)) == 1 + len(variants)


def test_budget_trims_the_plan_with_a_note(quadratic, tmp_path, capsys):
    status, doc = compare(tmp_path, "--optimizers", "sgd", "--sweep", "5", "--seeds", "3", "--budget-s", "1e-6")
    assert status == 0 and len(quadratic.started) == 2  # the core alone: each optimizer at x1, first seed
    out = capsys.readouterr()
    assert "note: --budget-s 1e-06: the full plan (grid x1/4, x1/2, x1, x2, x4, 3 seed(s))" in out.out + out.err
    assert "running grid x1 with 1 seed(s)" in doc["config"]["budget_note"]
    assert doc["config"]["seeds"] == [0] and doc["config"]["sweep"]["factors"] == [1.0]
    assert doc["config"]["budget_note"] in (tmp_path / "results.txt").read_text()
    quadratic.started.clear()
    _, doc = compare(tmp_path / "ample", "--optimizers", "sgd", "--sweep", "3", "--seeds", "2", "--budget-s", "1e6")
    assert len(quadratic.started) == 12 and doc["config"]["budget_note"] is None


def test_trim_rule():
    def cost(k, n):
        return 10.0 * k * n

    assert plan.trim(5, 3, cost, 1000) == (5, 3)
    assert plan.trim(5, 3, cost, 95) == (3, 3)  # 9 runs beat 5x1 and 4x2
    assert plan.trim(5, 3, cost, 40) == (4, 1)  # 4 runs either way: the wider grid
    assert plan.trim(5, 3, cost, 5) == (1, 1)  # the core always stays
    assert plan.grid_exponents(5) == [-2, -1, 0, 1, 2] and plan.grid_exponents(4) == [-2, -1, 0, 1]
    assert set(plan.grid_exponents(3)) <= set(plan.grid_exponents(4)) <= set(plan.grid_exponents(5))


def test_thorough_is_a_five_point_sweep_with_three_seeds(quadratic, tmp_path):
    status, doc = compare(tmp_path, "--optimizers", "sgd", "--thorough", "--seeds", "2")
    assert status == 0 and doc["config"]["sweep"]["points"] == 5 and doc["config"]["seeds"] == [0, 1]
    assert len(quadratic.started) == 2 * 5 * 2
    assert cli.THOROUGH == {"sweep": 5, "seeds": 3}


def test_steps_to_the_baselines_final_loss_relative_to_its_own():
    """``steps_to_baseline_loss``: the first step at or below the baseline's final smoothed loss (mean over
    its seeds), averaged over the seeds that get there, and relative to the baseline's own; the table cell."""
    from kfopt.compare.report import _to_baseline

    def run(name, seed, smoothed):
        return {"optimizer": name, "exponent": 0, "seed": seed, "status": "ok", "lr": 1.0, "final_val_loss": 1.0,
                "final_val_accuracy": None, "smoothed_loss": smoothed, "final_smoothed_loss": smoothed[-1],
                "median_step_ms": 1.0, "evals": [], "state_mib": 0.0, "message": ""}

    records = [run("adamw", 0, [3.0, 2.0, 1.1, 1.3, 1.2]), run("adamw", 1, [3.0, 2.0, 1.5, 1.4, 1.0]),
               run("fast", 0, [3.0, 1.0, 0.9, 0.8, 0.7]), run("fast", 1, [3.0, 2.0, 1.05, 0.9, 0.8]),
               run("slow", 0, [3.0, 2.5, 2.0, 1.8, 1.6])]
    summaries = summary.summarize(records, ["adamw", "fast", "slow"], [0], target=0.5, baseline="adamw")
    # the baseline's level: mean(1.2, 1.0) = 1.1; it gets there at steps 3 and 5 (mean 4)
    assert summaries["adamw"]["steps_to_baseline_loss"] == {"steps": 4.0, "vs_baseline": 1.0}
    assert summaries["fast"]["steps_to_baseline_loss"] == {"steps": 2.5, "vs_baseline": 2.5 / 4.0}
    assert summaries["slow"]["steps_to_baseline_loss"] == {"steps": None, "vs_baseline": None}
    assert [_to_baseline(summaries[n]["steps_to_baseline_loss"]) for n in ("adamw", "fast", "slow")] == [
        "1.00x", "0.62x", "never"]
    alone = summary.summarize(records, ["fast"], [0], target=0.5, baseline="adamw")  # no baseline run
    assert alone["fast"]["steps_to_baseline_loss"] is None and _to_baseline(None) == "-"


def test_an_optimizer_taking_the_baselines_lr_follows_its_lr_and_its_best_grid_point(quadratic, tmp_path, capsys,
                                                                                       monkeypatch):
    """``lr_of`` (the grafted entries'): ``--lr adamw=...`` carries over unless the optimizer's own is given,
    and a sweep reports it at AdamW's best grid point, not at its own best."""
    monkeypatch.setitem(REGISTRY, "follower", OptimizerSpec("follower", "torch.optim", "SGD", lr={"chars": 1.0},
                                                            lr_of="adamw"))
    status, _ = compare(tmp_path / "given", "--optimizers", "follower", "--lr", "adamw=0.05")
    assert status == 0 and ("follower", 0.05, 0) in quadratic.started
    status, _ = compare(tmp_path / "own", "--optimizers", "follower", "--lr", "adamw=0.05,follower=0.2")
    assert status == 0 and ("follower", 0.2, 0) in quadratic.started
    status, doc = compare(tmp_path / "sweep", "--optimizers", "follower", "--lr", "adamw=0.1", "--sweep", "5")
    assert status == 0
    adamw, follower = doc["summary"]["adamw"], doc["summary"]["follower"]
    own_best = min(follower["sweep"], key=lambda e: (follower["sweep"][e]["not_ok"],
                                                     follower["sweep"][e]["mean_final_val_loss"], int(e)))
    assert int(own_best) != adamw["exponent"]  # SGD's best lr on the quadratic is not AdamW's: not vacuous
    assert follower["exponent"] == adamw["exponent"] and follower["lr_of"] == "adamw" and not follower["edge"]
    assert follower["lr"] == pytest.approx(0.1 * 2.0 ** adamw["exponent"])
    assert "follower: at adamw's best lr" in capsys.readouterr().out
