"""kfopt.kernels.dispatch: which path a kernel call takes."""

import pytest
import torch

import kfopt.kernels.dispatch as dispatch


def test_interpreter_routes_cpu_tensors_to_triton():
    assert dispatch.INTERPRETER, "tests/conftest.py must set TRITON_INTERPRET=1 before triton is imported"
    assert dispatch.use_triton(torch.device("cpu"))


def test_cuda_tensors_always_take_triton():
    assert dispatch.use_triton(torch.device("cuda"))


def test_backend_override(monkeypatch):
    monkeypatch.setenv("KFOPT_BACKEND", "torch")
    assert not dispatch.use_triton(torch.device("cpu"))
    assert not dispatch.use_triton(torch.device("cuda"))
    monkeypatch.setenv("KFOPT_BACKEND", "cuda")
    with pytest.raises(ValueError, match="KFOPT_BACKEND"):
        dispatch.use_triton(torch.device("cpu"))


def test_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(dispatch, "INTERPRETER", False)
    assert not dispatch.use_triton(torch.device("cpu")), "plain CPU tensors take the PyTorch reference"
    monkeypatch.setenv("KFOPT_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dispatch.use_triton(torch.device("cpu"))


def test_is_dense():
    x = torch.randn(4, 6)
    assert dispatch.is_dense(x) and dispatch.is_dense(x.t()) and dispatch.is_dense(torch.randn(1, 5)[:, :])
    assert not dispatch.is_dense(x[:, :3]) and not dispatch.is_dense(x[::2])
    assert dispatch.is_dense(torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last))


def test_dot_upcast_only_for_bf16_under_interpreter():
    assert dispatch.dot_needs_upcast(torch.bfloat16)
    assert not dispatch.dot_needs_upcast(torch.float16) and not dispatch.dot_needs_upcast(torch.float32)
