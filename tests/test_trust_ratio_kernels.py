"""lamb_step / lars_step kernels (Triton, interpreted on CPU) against float64 references."""

import math

import pytest
import torch
from checks import REL_TOL, assert_rel_close

from kfopt.kernels.lamb import _lamb_hyper, lamb_step, lamb_step_reference
from kfopt.kernels.lars import _lars_hyper, lars_step, lars_step_reference

SHAPES = [(1,), (7,), (129,), (1000,), (33, 31), (3, 5, 7), (20001,)]  # 20001 spans several chunks
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_tensors(shapes, dtype, device, method):
    """Random params/grads and non-trivial state (never zeros)."""
    params = [torch.randn(s, device=device).to(dtype) for s in shapes]
    grads = [(0.1 * torch.randn(s, device=device)).to(dtype) for s in shapes]
    if method == "lamb":
        state = [[0.01 * torch.randn(s, device=device) for s in shapes],
                 [1e-4 * torch.rand(s, device=device) + 1e-6 for s in shapes],
                 [torch.tensor(float(k % 4), device=device) for k in range(len(shapes))]]
    else:
        state = [[0.01 * torch.randn(s, device=device) for s in shapes]]
    return params, grads, state


def run(method, params, grads, state, **kw):
    fn = lamb_step if method == "lamb" else lars_step
    return fn(params, grads, *state, **kw)


def run_reference(method, params, grads, state, max_grad_norm, **kw):
    n = len(params)
    if method == "lamb":
        hyper = _lamb_hyper(n, kw["lr"], kw.get("beta1", 0.9), kw.get("beta2", 0.999), kw.get("eps", 1e-6),
                            kw["weight_decay"], kw.get("bias_correction", True), kw.get("grad_averaging", True),
                            kw["adapt"], kw.get("trust_min", 0.0), kw.get("trust_max", math.inf))
        return lamb_step_reference(params, grads, *state, hyper=hyper, max_grad_norm=max_grad_norm)
    hyper = _lars_hyper(n, kw["lr"], kw.get("momentum", 0.9), kw["weight_decay"], kw.get("eta", 0.001),
                        kw.get("nesterov", False), kw["adapt"], kw.get("trust_min", 0.0), kw.get("trust_max", math.inf))
    return lars_step_reference(params, grads, *state, hyper=hyper, max_grad_norm=max_grad_norm)


def double(tensors):
    return [t.detach().double().clone() for t in tensors]


def check_against_reference(method, shapes, dtype, device, max_grad_norm, **kw):
    params, grads, state = make_tensors(shapes, dtype, device, method)
    ref_p, ref_g, ref_s = double(params), double(grads), [double(col) for col in state]
    clip = run(method, params, grads, state, max_grad_norm=max_grad_norm, **kw)
    ref_clip = run_reference(method, ref_p, ref_g, ref_s, max_grad_norm, **kw)
    assert_rel_close(clip, ref_clip, torch.float32, name="clip")
    for i, (p, r) in enumerate(zip(params, ref_p)):
        assert_rel_close(p, r, dtype, name=f"param {i} {tuple(p.shape)}")
    for c, (col, ref_col) in enumerate(zip(state, ref_s)):
        for i, (s, r) in enumerate(zip(col, ref_col)):
            assert_rel_close(s, r, torch.float32 if dtype == torch.float32 else dtype, name=f"state {c}[{i}]")
    return params, ref_p


@pytest.mark.parametrize("method", ["lamb", "lars"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_single_tensor_matches_float64(method, dtype, shape, device, poison_empty, seed):
    check_against_reference(method, [shape], dtype, device, max_grad_norm=1.0, lr=0.01, weight_decay=0.01,
                            adapt=True)


@pytest.mark.parametrize("method", ["lamb", "lars"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_many_tensors_one_call_with_per_tensor_hyperparameters(method, dtype, device, poison_empty, seed):
    n = len(SHAPES)
    kw = dict(lr=[0.01 * (k + 1) for k in range(n)], weight_decay=[0.0, 0.1] * 3 + [0.01],
              adapt=[True, False, True, True, False, True, True], trust_min=[0.0] * 5 + [0.5, 0.0],
              trust_max=[math.inf] * 5 + [2.0, 0.8])
    if method == "lamb":
        kw.update(beta1=[0.9, 0.0, 0.8, 0.9, 0.95, 0.9, 0.5], bias_correction=[True, False] * 3 + [True],
                  grad_averaging=[True] * 6 + [False])
    else:
        kw.update(momentum=[0.9, 0.0] * 3 + [0.5], nesterov=[False, True] * 3 + [True], eta=[0.001, 0.02] * 3 + [1.0])
    check_against_reference(method, SHAPES, dtype, device, max_grad_norm=0.5, **kw)


@pytest.mark.parametrize("method", ["lamb", "lars"])
@pytest.mark.parametrize("max_grad_norm", [None, 0.0, 1e-3, 1e6])
def test_global_clipping(method, max_grad_norm, device, poison_empty, seed):
    check_against_reference(method, [(7,), (129,), (33, 31)], torch.float32, device, max_grad_norm=max_grad_norm,
                            lr=0.1, weight_decay=0.01, adapt=True)


@pytest.mark.parametrize("method", ["lamb", "lars"])
def test_mixed_dtypes_in_one_call(method, device, poison_empty, seed):
    params, grads, state = make_tensors([(129,), (17, 3), (1000,)], torch.float32, device, method)
    params[1] = params[1].to(torch.bfloat16)
    grads[1] = grads[1].to(torch.bfloat16)
    params[2] = params[2].to(torch.float16)  # fp16 param with an fp32 gradient
    ref_p, ref_g, ref_s = double(params), double(grads), [double(col) for col in state]
    run(method, params, grads, state, lr=0.05, weight_decay=0.01, adapt=True, max_grad_norm=1.0)
    run_reference(method, ref_p, ref_g, ref_s, 1.0, lr=0.05, weight_decay=0.01, adapt=True)
    for p, r in zip(params, ref_p):
        assert_rel_close(p, r, p.dtype)


@pytest.mark.parametrize("method", ["lamb", "lars"])
def test_zero_weights_take_trust_ratio_one(method, device, poison_empty, seed):
    params, grads, state = make_tensors([(64,), (129,)], torch.float32, device, method)
    params[0].zero_()
    ref_p, ref_g, ref_s = double(params), double(grads), [double(col) for col in state]
    run(method, params, grads, state, lr=0.05, weight_decay=0.0, adapt=True, max_grad_norm=None)
    run_reference(method, ref_p, ref_g, ref_s, None, lr=0.05, weight_decay=0.0, adapt=True)
    assert params[0].abs().sum() > 0, "a zero weight must still move (r = 1)"
    for p, r in zip(params, ref_p):
        assert_rel_close(p, r, torch.float32)


@pytest.mark.parametrize("method", ["lamb", "lars"])
def test_strided_gradient(method, device, poison_empty, seed):
    params, grads, state = make_tensors([(31, 17)], torch.float32, device, method)
    grads = [torch.randn(17, 31, device=device).t()]  # same shape, transposed strides
    ref_p, ref_g, ref_s = double(params), double(grads), [double(col) for col in state]
    run(method, params, grads, state, lr=0.05, weight_decay=0.01, adapt=True, max_grad_norm=1.0)
    run_reference(method, ref_p, ref_g, ref_s, 1.0, lr=0.05, weight_decay=0.01, adapt=True)
    assert_rel_close(params[0], ref_p[0], torch.float32)


@pytest.mark.parametrize("method", ["lamb", "lars"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 3e19])
def test_non_finite_gradient_skips_everything(method, bad, device, seed):
    params, grads, state = make_tensors([(7,), (129,)], torch.float32, device, method)
    grads[1][5] = bad  # 3e19 is finite but its square overflows fp32
    before = [t.clone() for t in params + [s for col in state for s in col]]
    skipped = torch.zeros((), dtype=torch.int32, device=device)
    clip = run(method, params, grads, state, lr=0.1, weight_decay=0.01, adapt=True, max_grad_norm=1.0, skipped=skipped)
    after = params + [s for col in state for s in col]
    for b, a in zip(before, after):
        assert torch.equal(a, b), "a skipped step must leave weights and state untouched"
    assert clip[2].item() == 0 and skipped.item() == 1


def test_reference_path_runs_when_forced(monkeypatch, device, seed):
    """KFOPT_BACKEND=torch routes to the reference: same result, and the Triton launcher is not used."""
    import kfopt.kernels.lamb as lamb_module

    params, grads, state = make_tensors([(33,)], torch.float32, device, "lamb")
    copies = [t.clone() for t in params], [t.clone() for t in grads], [[t.clone() for t in c] for c in state]
    run("lamb", params, grads, state, lr=0.1, weight_decay=0.01, adapt=True, max_grad_norm=1.0)
    monkeypatch.setenv("KFOPT_BACKEND", "torch")
    monkeypatch.setattr(lamb_module, "TensorTable", None)  # any Triton launch would now fail
    run("lamb", *copies, lr=0.1, weight_decay=0.01, adapt=True, max_grad_norm=1.0)
    assert_rel_close(copies[0][0], params[0].double(), tol=REL_TOL[torch.float32])


def test_bad_kernel_inputs(device):
    p = [torch.randn(5, device=device)]
    with pytest.raises(ValueError, match="grads"):
        lamb_step(p, [torch.randn(6, device=device)], [torch.zeros(5)], [torch.zeros(5)], [torch.zeros(())], lr=0.1)
    with pytest.raises(TypeError, match="exp_avgs"):
        lamb_step(p, [torch.randn(5, device=device)], [torch.zeros(5, dtype=torch.float16, device=device)],
                  [torch.zeros(5, device=device)], [torch.zeros((), device=device)], lr=0.1)
    with pytest.raises(TypeError, match="params"):
        lars_step([torch.randn(5, dtype=torch.float64, device=device)], [torch.randn(5, dtype=torch.float64)],
                  [torch.zeros(5, device=device)], lr=0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        lars_step(p, [torch.randn(5, device=device)], [torch.zeros(5, device=device)], lr=0.1, weight_decay=[0.1, 0.2])
