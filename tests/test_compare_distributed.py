"""``torchrun -m kfopt compare --distributed {ddp,fsdp}`` on two gloo ranks: the same training losses
and validation losses as one process on the same global batches (within fp32 summation order); the
optimizers that cannot train sharded parameters are left out under fsdp (an error when named); without
torchrun a clear usage error."""

import json
import os
import subprocess
import sys

import pytest
from distributed import free_port

from kfopt.__main__ import main

TOL = 1e-5
#: fsdp: optimizers that step sharded parameters (K-FAC, MKOR and SINGD among them); ddp: a Kronecker-factored one as well
OPTIMIZERS = {"fsdp": "lamb,lars,kfac,mkor,singd", "ddp": "lamb,kfac"}
ARGS = ["--task", "digits", "--steps", "4", "--no-plot"]


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_distributed_compare_equals_one_process(mode, tmp_path, monkeypatch):
    monkeypatch.setenv("KFOPT_BACKEND", "torch")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "kfopt", "compare", "--distributed", mode,
           "--optimizers", OPTIMIZERS[mode], "--out", str(tmp_path / mode), *ARGS]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("kfopt compare: task digits") == 1  # rank 0 alone prints
    assert main(["compare", "--optimizers", OPTIMIZERS[mode], "--out", str(tmp_path / "one"), *ARGS]) == 0
    ranks, one = (json.loads((tmp_path / d / "results.json").read_text()) for d in (mode, "one"))
    assert ranks["config"]["distributed"] == {"mode": mode, "world_size": 2, "local_batch": 32}
    runs = {r["optimizer"]: r for r in ranks["runs"]}
    assert list(runs) == ["adamw", *OPTIMIZERS[mode].split(",")]
    for reference in one["runs"]:
        run = runs[reference["optimizer"]]
        assert run["status"] == "ok" and len(run["train_loss"]) == 4
        for a, b in zip(run["train_loss"], reference["train_loss"]):
            assert rel(a, b) < TOL, (mode, run["optimizer"], run["train_loss"], reference["train_loss"])
        for a, b in zip(run["evals"], reference["evals"]):
            assert rel(a["loss"], b["loss"]) < TOL, (mode, run["optimizer"], a, b)
        assert reference["train_loss"][-1] != reference["train_loss"][0]  # it trained


def test_fsdp_leaves_out_or_rejects_unsupported_optimizers(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--distributed", "fsdp", "--optimizers", "lamb,mkor-graft", *ARGS])
    assert exit_info.value.code == 2
    assert "mkor-graft cannot train under --distributed fsdp" in capsys.readouterr().err


def test_distributed_without_torchrun_is_a_usage_error(capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--distributed", "ddp", *ARGS])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--distributed needs ranks started by torchrun" in err and "--nproc-per-node" in err


def test_ranks_train_on_disjoint_shares_of_the_global_batch():
    import torch

    from kfopt.compare.distributed import Distribution, DistributedTask
    from kfopt.compare.tasks import make_task

    task = make_task("digits", "small", torch.device("cpu"))
    full = task.train_batch(torch.Generator().manual_seed(3))
    shares = [DistributedTask(task, Distribution("ddp", rank, 4, torch.device("cpu"))).train_batch(
        torch.Generator().manual_seed(3)) for rank in range(4)]
    for i, t in enumerate(full):
        assert all(len(share[i]) == len(t) // 4 for share in shares)
        assert torch.equal(torch.cat([share[i] for share in shares]), t)
    with pytest.raises(ValueError, match="does not split evenly over 3 ranks"):
        DistributedTask(task, Distribution("ddp", 0, 3, torch.device("cpu")))
