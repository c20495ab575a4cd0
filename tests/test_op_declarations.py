"""The declarations of the multi-tensor element-wise ops (``kernels/op_declaration.py``) and the shared
argument checks (``kernels/checks.py``): what derives from a declaration, and one error type per kind
of mistake across the launchers."""

import dataclasses
import inspect
import math

import pytest
import torch

from kfopt.kernels import (
    lamb_step,
    lamb_step_reference,
    lars_step,
    lars_step_reference,
    rank1_inverse_update,
    sonew_step,
    sonew_step_reference,
)
from kfopt.kernels.graft import GRAFT, graft_step, graft_step_reference
from kfopt.kernels.lamb import LAMB, LambHyperparameters
from kfopt.kernels.lars import LARS
from kfopt.kernels.sonew import SONEW

OPS = {"lamb": (LAMB, lamb_step, lamb_step_reference), "lars": (LARS, lars_step, lars_step_reference),
       "sonew": (SONEW, sonew_step, sonew_step_reference), "graft": (GRAFT, graft_step, graft_step_reference)}


@pytest.mark.parametrize("name", OPS)
def test_kernel_and_reference_take_the_same_public_arguments(name):
    op, kernel, reference = OPS[name]
    assert inspect.signature(kernel).parameters.keys() == inspect.signature(reference).parameters.keys()
    for k, p in inspect.signature(kernel).parameters.items():
        assert p.default == inspect.signature(reference).parameters[k].default, k
    tensors = [p for p in inspect.signature(kernel).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in tensors] == [a.name for a in op.tensors]
    # the hyperparameters are the record's init fields, nothing else
    assert set(op.public_hyperparameters) <= {f.name for f in dataclasses.fields(op.hyperparameters) if f.init}
    assert "lr" in op.public_hyperparameters and "lr" not in op.defaults()


@pytest.mark.parametrize("name", OPS)
def test_table_columns_are_the_record_fields_in_order(name):
    op = OPS[name][0]
    names = [f.name for f in dataclasses.fields(op.hyperparameters)]
    assert list(op.hyper) == names and op.hyper.width == len(names)
    assert [int(getattr(op.hyper, n)) for n in names] == list(range(len(names)))
    assert list(op.addr)[: len(op.tensors)] == [a.name for a in op.tensors]


def test_a_record_is_one_table_row_with_derived_columns_in_float64():
    h = LambHyperparameters(lr=0.5, beta1=0.9, beta2=0.999, grad_averaging=False)
    assert h.grad_weight == 1.0 and h.one_minus_beta2 == 1.0 - 0.999
    assert h.ln_beta1 == math.log(0.9) and h.ln_beta2 == math.log(0.999)
    assert LambHyperparameters(lr=1, bias_correction=False, beta2=1.0).ln_beta2 == -math.inf
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.lr = 1.0


@pytest.mark.parametrize("name", OPS)
def test_unknown_missing_and_non_numeric_hyperparameters(name, device):
    op, kernel, _ = OPS[name]
    p = torch.randn(2, 3, device=device)
    state = {"lamb": [[torch.zeros(2, 3, device=device)], [torch.zeros(2, 3, device=device)],
                      [torch.zeros((), device=device)]],
             "lars": [[torch.zeros(2, 3, device=device)]],
             "sonew": [[torch.zeros(2, 3, device=device)], [torch.zeros(6, device=device)],
                       [torch.zeros(1, 6, device=device)], [torch.zeros((), device=device)]],
             "graft": [[torch.randn(2, 3, device=device)], [torch.zeros(2, 3, device=device)],
                       [torch.zeros(2, 3, device=device)], [None], [torch.zeros((), device=device)]]}[name]
    args = ([p], [torch.randn(2, 3, device=device)], *state)
    before = p.clone()
    with pytest.raises(TypeError, match="unexpected hyperparameter 'betas'"):
        kernel(*args, lr=0.1, betas=(0.9, 0.99))
    with pytest.raises(TypeError, match="missing hyperparameter 'lr'"):
        kernel(*args)
    with pytest.raises(TypeError, match="weight_decay: expected a real number, got str"):
        kernel(*args, lr=0.1, weight_decay="0.1")
    with pytest.raises(ValueError, match=r"lr: expected one value per tensor \(1\), got 2"):
        kernel(*args, lr=[0.1, 0.2])
    if name == "sonew":
        with pytest.raises(TypeError, match="unexpected hyperparameter 'band'"):  # read off offdiags
            kernel(*args, lr=0.1, band=2)
    if name == "graft":
        with pytest.raises(TypeError, match="unexpected hyperparameter 'has_buffer'"):  # read off momentum_buffers
            kernel(*args, lr=0.1, has_buffer=True)
    assert torch.equal(p, before)


def test_traffic_models_beside_the_launchers():
    """The byte counts the kernels' docstrings state (perf/ divides by them)."""
    shapes = [(1000,), (10, 30)]
    for dtype, lamb, lars in ((torch.float32, 44, 32), (torch.bfloat16, 34, 20)):
        assert LAMB.traffic(shapes, dtype).bytes == 1300 * lamb
        assert LARS.traffic(shapes, dtype).bytes == 1300 * lars
    assert SONEW.traffic(shapes, torch.float32, [1, 1]).bytes == 1300 * 48
    assert SONEW.traffic(shapes, torch.float32, [0, 4]).bytes == 1000 * 40 + 300 * 72
    assert SONEW.traffic(shapes, torch.float32, [1, 1], relative_eps=True).bytes == 1300 * (48 + 12)
    assert GRAFT.traffic(shapes, torch.float32).bytes == 1300 * 48
    assert GRAFT.traffic(shapes, torch.float32, [True, False]).bytes == 1000 * 60 + 300 * 48
    assert GRAFT.traffic(shapes, torch.bfloat16, grad_dtype=torch.float32).bytes == 1300 * (4 + 8 + 4 + 24)
    assert LAMB.traffic(shapes, torch.float32).flops > 0


# ----------------------------------------------------------------------------- one error type per mistake


def _state_of_another_dtype(device):
    """Each launcher given an fp32 state tensor in float64 (or an int32 counter as float)."""
    p, g = torch.randn(6, device=device), torch.randn(6, device=device)
    z = lambda *shape, dtype=torch.float32: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
    return {
        "lamb": lambda: lamb_step([p], [g], [z(6, dtype=torch.float64)], [z(6)], [z(())], lr=0.1),
        "lars": lambda: lars_step([p], [g], [z(6, dtype=torch.float64)], lr=0.1),
        "sonew": lambda: sonew_step([p.reshape(2, 3)], [g.reshape(2, 3)], [z(2, 3)], [z(6, dtype=torch.float64)],
                                    [z(1, 6)], [z(())], lr=0.1),
        "graft": lambda: graft_step([p], [g], [g], [z(6)], [z(6)], [z(6, dtype=torch.float64)], [z(())], lr=0.1),
        "rank1_inverse": lambda: rank1_inverse_update([torch.eye(3, device=device)], [torch.ones(3, device=device)],
                                                      z(1, dtype=torch.float64), decay=0.9),
    }


def _state_of_another_shape(device):
    p, g = torch.randn(6, device=device), torch.randn(6, device=device)
    z = lambda *shape: torch.zeros(*shape, device=device)  # noqa: E731
    return {
        "lamb": lambda: lamb_step([p], [g], [z(5)], [z(6)], [z(())], lr=0.1),
        "lars": lambda: lars_step([p], [g], [z(7)], lr=0.1),
        "sonew": lambda: sonew_step([p.reshape(2, 3)], [g.reshape(2, 3)], [z(2, 3)], [z(5)], [z(1, 6)], [z(())], lr=0.1),
        "graft": lambda: graft_step([p], [g], [g], [z(6)], [z(6)], [z(7)], [z(())], lr=0.1),
        "rank1_inverse": lambda: rank1_inverse_update([torch.eye(3, device=device)], [torch.ones(3, device=device)],
                                                      z(2), decay=0.9),
    }


@pytest.mark.parametrize("launcher", ["lamb", "lars", "sonew", "graft", "rank1_inverse"])
def test_a_state_tensor_of_another_dtype_is_a_type_error(launcher, device):
    with pytest.raises(TypeError, match=r"expected dtype float32"):
        _state_of_another_dtype(device)[launcher]()


@pytest.mark.parametrize("launcher", ["lamb", "lars", "sonew", "graft", "rank1_inverse"])
def test_a_state_tensor_of_another_shape_is_a_value_error(launcher, device):
    with pytest.raises(ValueError, match=r"shape"):
        _state_of_another_shape(device)[launcher]()


@pytest.mark.parametrize("name", OPS)
def test_a_tensor_on_another_device_is_a_value_error(name):
    op, kernel, _ = OPS[name]
    p = torch.randn(2, 3)
    state = {"lamb": [[torch.zeros(2, 3)], [torch.zeros(2, 3)], [torch.zeros((), device="meta")]],
             "lars": [[torch.zeros(2, 3, device="meta")]],
             "sonew": [[torch.zeros(2, 3)], [torch.zeros(6)], [torch.zeros(1, 6)], [torch.zeros((), device="meta")]],
             "graft": [[torch.randn(2, 3)], [torch.zeros(2, 3)], [torch.zeros(2, 3)], [None],
                       [torch.zeros((), device="meta")]]}[name]
    with pytest.raises(ValueError, match=r"\[0\] is on meta, expected cpu"):
        kernel([p], [torch.randn(2, 3)], *state, lr=0.1)


# ----------------------------------------------------------------------------- tensor hyperparameters


def _lamb_inputs(device):
    """Fresh random LAMB inputs, the same at every call: params, grads, exp_avgs, exp_avg_sqs, steps."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(7,), (5, 9)]
    return [[torch.randn(s, generator=gen).to(device) for s in shapes],
            [torch.randn(s, generator=gen).to(device) for s in shapes],
            [0.1 * torch.randn(s, generator=gen).to(device) for s in shapes],
            [torch.rand(s, generator=gen).to(device) for s in shapes],
            [torch.tensor(2.0, device=device) for _ in shapes]]


def _lamb_call(device, **hyper):
    tensors = _lamb_inputs(device)
    skipped = torch.zeros((), dtype=torch.int32, device=device)
    clip = lamb_step(*tensors, skipped=skipped, **hyper)
    return tensors, clip, skipped


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_tensor_hyperparameters_step_as_the_same_numbers(backend, device, monkeypatch):
    """0-d tensors (one per tensor or shared) holding the same numbers as Python floats give the same bits:
    the derived columns (1 - b2, ln b) are formed in float64 on the device as on the host. (An fp32
    tensor holds its fp32 value: 0.5 is exact, 0.9 would not be.)"""
    if backend == "torch":
        monkeypatch.setenv("KFOPT_BACKEND", "torch")
    numbers_ = dict(lr=0.05, beta1=[0.9, 0.8], beta2=0.5, weight_decay=0.01)
    tensors_ = dict(lr=torch.tensor(0.05, dtype=torch.float64), beta1=[torch.tensor(0.9, dtype=torch.float64), 0.8],
                    beta2=torch.tensor(0.5), weight_decay=0.01)
    want, want_clip, _ = _lamb_call(device, **numbers_)
    got, got_clip, skipped = _lamb_call(device, **tensors_)
    assert torch.equal(got_clip, want_clip) and skipped == 0
    moved = False
    for col_got, col_want, col_in in zip(got, want, _lamb_inputs(device)):
        for a, b, c in zip(col_got, col_want, col_in):
            assert torch.equal(a, b)
            moved |= not torch.equal(a, c)
    assert moved


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("hyper", [dict(lr=torch.tensor(math.nan)), dict(lr=-1.0 * torch.ones(())),
                                   dict(lr=0.1, beta1=torch.tensor(1.0)), dict(lr=0.1, eps=torch.tensor(0.0)),
                                   dict(lr=0.1, trust_max=torch.tensor(math.nan))], ids=str)
def test_a_tensor_hyperparameter_out_of_range_skips_the_step_on_the_device(backend, hyper, device, monkeypatch):
    """Checked on the device and folded into the step's skip flag: nothing is written, ``skipped`` counts it."""
    if backend == "torch":
        monkeypatch.setenv("KFOPT_BACKEND", "torch")
    tensors, clip, skipped = _lamb_call(device, **hyper)
    assert skipped == 1 and clip[2] == 0
    for col, original in zip(tensors, _lamb_inputs(device)):
        for a, b in zip(col, original):
            assert torch.equal(a, b), "a skipped step wrote a tensor"


def test_flags_and_choices_must_be_python_values(device):
    p = [torch.randn(3, device=device)]
    state = ([torch.randn(3, device=device)], [torch.zeros(3, device=device)], [torch.zeros(3, device=device)],
             [torch.zeros((), device=device)])
    with pytest.raises(TypeError, match="adapt: expected True or False, got a tensor"):
        lamb_step(p, *state, lr=0.1, adapt=torch.tensor(1.0))
    with pytest.raises(TypeError, match="lr: expected a number or a one-element floating tensor"):
        lamb_step(p, *state, lr=torch.tensor([0.1, 0.2]))
