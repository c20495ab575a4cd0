"""Fixtures of the contract suite: the registry's entries, and the kernel path (the PyTorch reference
path, ``KFOPT_BACKEND=torch``, or Triton through its interpreter as the repository's conftest sets up)."""

import pytest

from kfopt.registry import REGISTRY


@pytest.fixture(params=list(REGISTRY))
def entry(request):
    """Each registered optimizer (an ``OptimizerEntry``)."""
    return REGISTRY[request.param]


@pytest.fixture
def torch_path(monkeypatch):
    """Run the PyTorch reference path of every kernel."""
    monkeypatch.setenv("KFOPT_BACKEND", "torch")


def use_backend(monkeypatch, backend: str) -> None:
    """"torch": the PyTorch reference path; "triton": Triton kernels (the interpreter on the CPU)."""
    if backend == "torch":
        monkeypatch.setenv("KFOPT_BACKEND", "torch")
    else:
        monkeypatch.delenv("KFOPT_BACKEND", raising=False)
