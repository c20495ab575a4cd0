"""Test set-up. Kernels run through Triton's interpreter on CPU unless KFOPT_TEST_DEVICE=cuda.

TRITON_INTERPRET must be set before triton is imported (it is read when kernels are decorated), so
this happens at the very top, before anything imports kfopt.
"""

import os

TEST_DEVICE = os.environ.get("KFOPT_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.pop("KFOPT_BACKEND", None)

import pytest  # noqa: E402
import torch  # noqa: E402

# Test tensors are tiny: one thread avoids OpenMP spin overhead on the 2-core CI machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def isolated_autotune_cache(tmp_path_factory):
    """Tests never read or write the user's tuning cache (processes they spawn inherit this)."""
    os.environ["KFOPT_AUTOTUNE_CACHE"] = str(tmp_path_factory.mktemp("autotune") / "cache.json")


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests put their tensors: CPU (interpreter) in CI, CUDA with KFOPT_TEST_DEVICE=cuda."""
    return torch.device(TEST_DEVICE)


@pytest.fixture
def poison_empty(monkeypatch):
    """Make ``torch.empty``/``torch.empty_like`` return NaN-filled floating memory during the test,
    so any output element a kernel forgets to write shows up as NaN."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


@pytest.fixture
def seed():
    torch.manual_seed(0)
