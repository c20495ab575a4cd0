"""lamb_step / lars_step kernels (Triton, interpreted on CPU) against float64 references."""

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
from checks import REL_TOL, assert_rel_close, assert_within_one_ulp, moved_beyond_one_ulp

from kfopt.kernels.lamb import lamb_step, lamb_step_reference
from kfopt.kernels.lars import lars_step, lars_step_reference
from kfopt.kernels.aliasing import _element_addresses_overlap, _lattice_overlap

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
    else:  # momentum large enough that one step moves a 16-bit weight by several ulp
        state = [[0.1 * torch.randn(s, device=device) for s in shapes]]
    return params, grads, state


def run(method, params, grads, state, **kw):
    fn = lamb_step if method == "lamb" else lars_step
    return fn(params, grads, *state, **kw)


def run_reference(method, params, grads, state, max_grad_norm, **kw):
    fn = lamb_step_reference if method == "lamb" else lars_step_reference
    return fn(params, grads, *state, max_grad_norm=max_grad_norm, **kw)


def double(tensors):
    return [t.detach().double().clone() for t in tensors]


def check_against_reference(method, shapes, dtype, device, max_grad_norm, **kw):
    params, grads, state = make_tensors(shapes, dtype, device, method)
    ref_p, ref_g, ref_s = double(params), double(grads), [double(col) for col in state]
    before = [p.clone() for p in params]
    clip = run(method, params, grads, state, max_grad_norm=max_grad_norm, **kw)
    ref_clip = run_reference(method, ref_p, ref_g, ref_s, max_grad_norm, **kw)
    assert_rel_close(clip, ref_clip, torch.float32, name="clip")
    check_params(params, ref_p, before)
    for c, (col, ref_col) in enumerate(zip(state, ref_s)):
        for i, (s, r) in enumerate(zip(col, ref_col)):  # fp32 state: fp32 tolerance whatever the params' dtype
            assert_rel_close(s, r, torch.float32, name=f"state {c}[{i}]")
    return params, ref_p


def check_params(params, ref_params, before):
    """fp32: relative error; bf16/fp16: every element within 1 ulp of the float64 result rounded to the
    param dtype (a norm-wise 1e-2 would pass a step that is never written: one step moves the weights
    by about that much), and the step moves some 16-bit element by more than 1 ulp."""
    half = [i for i, p in enumerate(params) if p.dtype != torch.float32]
    for i, (p, r) in enumerate(zip(params, ref_params)):
        name = f"param {i} {tuple(p.shape)} {p.dtype}"
        if p.dtype == torch.float32:
            assert_rel_close(p, r, torch.float32, name=name)
        else:
            assert_within_one_ulp(p, r, name=name)
    if half:
        assert sum(moved_beyond_one_ulp(before[i], ref_params[i]) for i in half), "the 1-ulp check is vacuous"


@pytest.mark.parametrize("method", ["lamb", "lars"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_single_tensor_matches_float64(method, dtype, shape, device, poison_empty, seed):
    check_against_reference(method, [shape], dtype, device, max_grad_norm=1.0, lr=0.05, weight_decay=0.01,
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


def lamb_by_hand(params, grads, m, v, steps, hp, max_grad_norm):
    """One LAMB step in float64, straight from the equations of ``kernels/lamb.py``'s docstring (no
    library helper): ``hp`` holds one dict of hyperparameters per tensor. Updates the lists in place."""
    total = math.sqrt(sum(float((g * g).sum()) for g in grads))
    coef = min(1.0, max_grad_norm / total) if max_grad_norm else 1.0
    for i, h in enumerate(hp):
        g = grads[i] * coef
        t = float(steps[i]) + 1
        b1, b2 = h["beta1"], h["beta2"]
        m[i] = b1 * m[i] + ((1 - b1) if h["grad_averaging"] else 1.0) * g
        v[i] = b2 * v[i] + (1 - b2) * g * g
        bc1, bc2 = (1 - b1 ** t, 1 - b2 ** t) if h["bias_correction"] else (1.0, 1.0)
        u = (m[i] / bc1) / ((v[i] / bc2).sqrt() + h["eps"]) + h["weight_decay"] * params[i]
        wn, un = float(params[i].norm()), float(u.norm())
        r = min(max(wn / un, h["trust_min"]), h["trust_max"]) if h["adapt"] and wn > 0 and un > 0 else 1.0
        params[i] = params[i] - h["lr"] * r * u
        steps[i] = t


def lars_by_hand(params, grads, bufs, hp, max_grad_norm):
    """One LARS step in float64, straight from the equations of ``kernels/lars.py``'s docstring."""
    total = math.sqrt(sum(float((g * g).sum()) for g in grads))
    coef = min(1.0, max_grad_norm / total) if max_grad_norm else 1.0
    for i, h in enumerate(hp):
        d = grads[i] * coef + h["weight_decay"] * params[i]
        wn, dn = float(params[i].norm()), float(d.norm())
        r = min(max(h["eta"] * wn / dn, h["trust_min"]), h["trust_max"]) if h["adapt"] and wn > 0 and dn > 0 else 1.0
        bufs[i] = h["momentum"] * bufs[i] + h["lr"] * r * d
        params[i] = params[i] - (h["momentum"] * bufs[i] + h["lr"] * r * d if h["nesterov"] else bufs[i])


@pytest.mark.parametrize("method", ["lamb", "lars"])
def test_two_steps_match_equations_written_here(method, device, poison_empty, seed):
    """Against an independent float64 step written from the kernels' docstrings (not the library's
    hyperparameter records or references): per-tensor hyperparameters, every option, active clipping,
    two steps from random state (the decay of old state counts)."""
    shapes = [(7,), (129,), (33, 31), (3, 5, 7)]
    params, grads, state = make_tensors(shapes, torch.float32, device, method)
    if method == "lamb":
        kw = dict(lr=[0.05, 0.02, 0.1, 0.03], beta1=[0.9, 0.0, 0.8, 0.95], beta2=[0.999, 0.9, 0.99, 0.95],
                  eps=[1e-6, 1e-3, 1e-8, 1e-6], weight_decay=[0.01, 0.0, 0.1, 0.05],
                  bias_correction=[True, True, False, True], grad_averaging=[True, False, True, True],
                  adapt=[True, True, False, True], trust_min=[0.0, 0.0, 0.0, 1.5], trust_max=[math.inf, 0.5, 1.0, 9.0])
    else:
        kw = dict(lr=[0.5, 0.2, 1.0, 0.3], momentum=[0.9, 0.0, 0.5, 0.9], weight_decay=[1e-3, 0.0, 0.1, 1e-2],
                  eta=[0.01, 0.02, 0.001, 1.0], nesterov=[False, True, True, False], adapt=[True, True, False, True],
                  trust_min=[0.0, 0.0, 0.0, 0.5], trust_max=[math.inf, 0.1, 1.0, 0.8])
    hp = [{k: v[i] for k, v in kw.items()} for i in range(len(shapes))]
    want_p, want_s = double(params), [double(col) for col in state]
    for k in range(2):
        grads = [torch.randn(s, device=device) * (0.5 + k) for s in shapes]
        run(method, params, grads, state, max_grad_norm=1.0, **kw)
        if method == "lamb":
            lamb_by_hand(want_p, double(grads), *want_s, hp, 1.0)
        else:
            lars_by_hand(want_p, double(grads), *want_s, hp, 1.0)
    for i, (p, w) in enumerate(zip(params, want_p)):
        assert_rel_close(p, w, tol=2e-5, name=f"param {i}")
    for c, (col, want_col) in enumerate(zip(state, want_s)):
        for i, (s, w) in enumerate(zip(col, want_col)):
            assert_rel_close(s, torch.as_tensor(w, dtype=torch.float64), tol=2e-5, name=f"state {c}[{i}]")


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
    before = [p.clone() for p in params]
    run(method, params, grads, state, lr=0.05, weight_decay=0.01, adapt=True, max_grad_norm=1.0)
    run_reference(method, ref_p, ref_g, ref_s, 1.0, lr=0.05, weight_decay=0.01, adapt=True)
    check_params(params, ref_p, before)


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
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", [[(7,)], [(33, 31), (129,), (20001,)]], ids=["one", "several"])
def test_grad_scale_and_one_rank_reduce_match_float64(method, dtype, shapes, device, poison_empty, seed):
    """A GradScaler's stored gradients (times 2^10, exact) with ``grad_scale`` and ``found_inf = 0``, on the
    sharded path's ``reduce`` with one rank (nothing to add): the float64 step of the unscaled gradients."""
    params, grads, state = make_tensors(shapes, dtype, device, method)
    ref_p, ref_g, ref_s = double(params), double(grads), [double(col) for col in state]
    before = [p.clone() for p in params]
    scaled = [(g.float() * 1024).to(dtype) for g in grads]
    reduced = []
    kw = dict(lr=0.05, weight_decay=0.01, adapt=True)
    clip = run(method, params, scaled, state, max_grad_norm=1.0, grad_scale=torch.tensor(1024.0, device=device),
               found_inf=torch.zeros((), device=device), reduce=reduced.append, **kw)
    ref_clip = run_reference(method, ref_p, ref_g, ref_s, 1.0, **kw)
    assert len(reduced) == 2, "the gradient-norm partials and the per-tensor sums each go through reduce once"
    assert_rel_close(clip[0], ref_clip[0], torch.float32, name="norm of the unscaled gradients")
    assert_rel_close(clip[1] * 1024, ref_clip[1], torch.float32, name="clip coefficient (carries 1 / grad_scale)")
    assert clip[2].item() == 1
    check_params(params, ref_p, before)
    for c, (col, ref_col) in enumerate(zip(state, ref_s)):
        for i, (t, r) in enumerate(zip(col, ref_col)):
            assert_rel_close(t, r, torch.float32, name=f"state {c}[{i}]")


@pytest.mark.parametrize("method", ["lamb", "lars"])
def test_found_inf_skips_everything(method, device, seed):
    params, grads, state = make_tensors([(7,), (129,)], torch.float16, device, method)
    before = [t.clone() for t in params + [s for col in state for s in col]]
    skipped = torch.zeros((), dtype=torch.int32, device=device)
    clip = run(method, params, grads, state, lr=0.1, weight_decay=0.01, adapt=True, max_grad_norm=1.0, skipped=skipped,
               grad_scale=torch.tensor(2.0, device=device), found_inf=torch.ones((), device=device))
    for b, a in zip(before, params + [s for col in state for s in col]):
        assert torch.equal(a, b), "a step the scaler found inf in must leave weights and state untouched"
    assert clip[2].item() == 0 and skipped.item() == 1


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
    monkeypatch.setattr(lamb_module, "launch_two_passes", None)  # any Triton launch would now fail
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


# ----------------------------------------------------------------------------- bias-correction precision


@pytest.mark.parametrize("step", [0.0, 99.0, 9999.0])  # t = 1, 100, 10^4 (1 - 0.9999^t = 1e-4 .. 0.63)
@pytest.mark.parametrize("beta1,beta2", [(0.9, 0.9999), (0.0, 0.9999), (0.9, 0.999)])
def test_lamb_bias_corrected_update_is_fp32_accurate(step, beta1, beta2, device, seed):
    """The bias-corrected update u = (m / bc1) / (sqrt(v / bc2) + eps) against float64 to ~1e-6, at the
    first step (where 1 - b2^t = 1e-4 cancels hardest) and at large t, for fresh random inputs.

    Zero weights make r = 1 and w_new = -lr u, so the check sees u alone. The interpreter computes
    exp/log/sqrt/division exactly (numpy), so here the test pins the math: bc from ln(b) taken in
    float64 on the host, not from the fp32-rounded beta (fp32(0.9999) is 1.7e-8 off: 1.7e-4 of
    1 - b2 at t = 1). That the compiled kernel keeps this precision on the GPU (no ex2.approx/
    div.full/sqrt.approx) is what ``KFOPT_TEST_DEVICE=cuda`` runs of this test and
    :func:`test_precise_instructions_on_sm90` check.
    """
    shapes = [(1000,), (33, 31)]
    params = [torch.zeros(s, device=device) for s in shapes]
    grads = [torch.randn(s, device=device) for s in shapes]
    state = [[0.1 * torch.randn(s, device=device) for s in shapes],
             [0.01 * torch.rand(s, device=device) for s in shapes],
             [torch.tensor(step, device=device) for _ in shapes]]
    kw = dict(lr=1.0, beta1=beta1, beta2=beta2, eps=1e-8, weight_decay=0.0, adapt=True)
    ref_p, ref_g, ref_s = double(params), double(grads), [double(col) for col in state]
    run("lamb", params, grads, state, max_grad_norm=None, **kw)
    run_reference("lamb", ref_p, ref_g, ref_s, None, **kw)
    for i, (p, r) in enumerate(zip(params, ref_p)):
        assert_rel_close(p, r, tol=2e-6, name=f"update {i} (t = {step + 1:.0f})")
        assert (p.double() - r).abs().max() <= 4e-6 * r.abs().max(), "an element is off by more than ~30 ulp"


def test_bias_correction_needs_betas_below_one(device):
    p, g = [torch.randn(5, device=device)], [torch.randn(5, device=device)]

    def state():
        return [[torch.zeros(5, device=device)], [torch.zeros(5, device=device)], [torch.zeros((), device=device)]]

    with pytest.raises(ValueError, match=r"beta2: bias correction needs a decay rate in \[0, 1\)"):
        lamb_step(p, g, *state(), lr=0.1, beta2=1.0)
    with pytest.raises(ValueError, match=r"beta1\[0\]"):
        lamb_step(p, g, *state(), lr=0.1, beta1=[-0.5])
    lamb_step(p, g, *state(), lr=0.1, beta2=1.0, bias_correction=False)  # no 1 - b^t: any beta goes


# ----------------------------------------------------------------------------- aliasing


def lamb_args(device, n=3, numel=9):
    params, grads, state = make_tensors([(numel,)] * n, torch.float32, device, "lamb")
    return dict(params=params, grads=grads, exp_avgs=state[0], exp_avg_sqs=state[1], steps=state[2])


@pytest.mark.parametrize("case,match", [
    ("shared step", r"steps\[2\] is the same tensor as steps\[0\]"),
    ("param twice", r"params\[1\] is the same tensor as params\[0\]"),
    ("state across lists", r"exp_avg_sqs\[1\] is the same tensor as exp_avgs\[1\]"),
    ("overlapping views", r"exp_avgs\[1\] overlaps the memory of exp_avgs\[0\]"),
    ("param is a state", r"exp_avgs\[2\] is the same tensor as params\[0\]"),
    ("grad is a param", r"grads\[1\] is the same tensor as params\[0\] \(params\[0\] is written by the step\)"),
    ("skipped is a step", r"steps\[0\] .* skipped\[0\]|skipped\[0\] .* steps\[0\]"),
])
def test_lamb_rejects_tensors_sharing_memory(case, match, device):
    """Several programs would read-modify-write one address (lost updates on a GPU): a ValueError names
    both entries, before anything is written."""
    args = lamb_args(device)
    skipped = None
    if case == "shared step":
        args["steps"][2] = args["steps"][0]
    elif case == "param twice":
        args["params"][1] = args["params"][0]
    elif case == "state across lists":
        args["exp_avg_sqs"][1] = args["exp_avgs"][1]
    elif case == "overlapping views":
        buf = torch.zeros(20, device=device)
        args["exp_avgs"][0], args["exp_avgs"][1] = buf[:9], buf[5:14]
    elif case == "param is a state":
        args["exp_avgs"][2] = args["params"][0]
    elif case == "grad is a param":
        args["grads"][1] = args["params"][0]
    elif case == "skipped is a step":
        skipped = args["steps"][0]
    before = {k: [t.clone() for t in v] for k, v in args.items()}
    with pytest.raises(ValueError, match=match):
        lamb_step(**args, lr=0.1, skipped=skipped)
    for k, v in args.items():
        for t, b in zip(v, before[k]):
            assert torch.equal(t, b), f"{k} was written before the check"


def test_lars_rejects_tensors_sharing_memory(device):
    params, grads, (bufs,) = make_tensors([(9,), (9,)], torch.float32, device, "lars")
    with pytest.raises(ValueError, match=r"momentum_buffers\[1\] is the same tensor as params\[0\]"):
        lars_step(params, grads, [bufs[0], params[0]], lr=0.1)
    with pytest.raises(ValueError, match=r"params\[1\] is the same tensor as params\[0\]"):
        lars_step([params[0], params[0]], grads, bufs, lr=0.1)
    with pytest.raises(ValueError, match=r"grads\[0\] is the same tensor as momentum_buffers\[1\] "
                                         r"\(momentum_buffers\[1\] is written by the step\)"):
        lars_step(params, [bufs[1], grads[1]], bufs, lr=0.1)


def test_disjoint_views_and_shared_gradients_are_accepted(device, seed):
    """Memory sharing that is safe: slices of one flat buffer that do not overlap (params, state, steps)
    and one read-only gradient passed for several tensors."""
    flat, state_flat, steps_flat = (torch.randn(40, device=device), torch.zeros(80, device=device),
                                    torch.zeros(4, device=device))
    params = [flat[:15], flat[15:20], flat[20:]]
    exp_avgs = [state_flat[:15], state_flat[15:20], state_flat[20:40]]
    exp_avg_sqs = [state_flat[40:55], state_flat[55:60], state_flat[60:80]]
    steps = [steps_flat[0], steps_flat[1], steps_flat[3]]
    g = torch.randn(20, device=device)
    grads = [g[:15], g[:5], g]
    want = [double(params), double(grads), [double(exp_avgs), double(exp_avg_sqs), double(steps)]]
    lamb_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr=0.1, max_grad_norm=None)
    run_reference("lamb", *want, None, lr=0.1, weight_decay=0.01, adapt=True)
    for p, r in zip(params, want[0]):
        assert_rel_close(p, r, torch.float32)
    assert steps_flat.tolist() == [1.0, 1.0, 0.0, 1.0]


def test_check_no_overlap_messages():
    from kfopt.kernels.aliasing import check_no_overlap

    def error(written, read=()):
        try:
            check_no_overlap(written, read)
        except ValueError as e:
            return str(e).split(":")[0]
        return None

    x, W = torch.zeros(10), torch.zeros(4, 6)
    assert error([("steps", [torch.zeros(()), x[0], torch.zeros(()), x[0]])]) == (
        "steps[3] is the same tensor as steps[1]")
    assert error([("params", [x]), ("exp_avgs", [x[3:5]])]) == "exp_avgs[0] overlaps the memory of params[0]"
    assert error([("params", [x[:5]]), ("exp_avgs", [x[5:]])]) is None
    assert error([("params", [W[:, ::2], W[:, 1::2]])]) is None  # interleaved columns: spans meet, elements don't
    assert error([("params", [W[:, ::2], W[:, 2::3]])]) == "params[1] overlaps the memory of params[0]"
    assert error([("params", [W.t()]), ("exp_avgs", [W[1, 2:4]])]) == "exp_avgs[0] overlaps the memory of params[0]"
    assert error([("params", [x[:4]]), ("steps", [x.view(torch.int32)[3:4]])]) == (
        "steps[0] overlaps the memory of params[0]")  # another dtype over the same bytes
    assert error([("params", [x.view(torch.float16)[:6]]), ("steps", [x[3:4]])]) is None
    assert error([("params", [torch.zeros(1).expand(5)])]).startswith("params[0] has elements that share memory")
    assert error([("params", [torch.zeros(0), torch.zeros(0)]), ("skipped", [None])]) is None
    assert error([("params", [torch.zeros(3)])], [("grads", [x, x, x])]) is None  # read-only duplicates
    assert error([("params", [x[:3]])], [("grads", [x[5:], x[5:], x[2:4]])]) == (
        "grads[2] overlaps the memory of params[0] (params[0] is written by the step)")


@pytest.mark.parametrize("method", ["lamb", "lars"])
def test_non_dense_params_are_rejected(method, device):
    """The kernels address a param as one block of numel elements: a view with gaps would have other
    memory written."""
    W = torch.randn(6, 8, device=device)
    p = W[:, ::2]
    state = ([[torch.zeros(6, 8, device=device)[:, ::2]], [torch.zeros(6, 8, device=device)[:, ::2]],
              [torch.zeros((), device=device)]] if method == "lamb" else [[torch.zeros(6, 8, device=device)[:, ::2]]])
    before = W.clone()
    with pytest.raises(ValueError, match=r"params\[0\] must be dense"):
        run(method, [p], [torch.randn(6, 4, device=device)], state, lr=0.1, weight_decay=0.0, adapt=True)
    assert torch.equal(W, before)


# ----------------------------------------------------------------------------- sm_90 instructions

PTX_SCRIPT = r"""
import collections, json, re, sys
import triton, triton.language as tl
if "nvidia" not in triton.backends.backends:
    print(json.dumps("NO_NVIDIA_BACKEND")); sys.exit(0)
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kfopt.kernels import lamb, lars, multi_tensor as mt, sonew

I64, F32 = "*i64", "*fp32"
TABLE = {n: I64 for n in ("addr_ptr", "numel_ptr", "chunk_tensor_ptr", "chunk_start_ptr")}
CHUNKED = dict(BLOCK=1024, CHUNK=8192)
CASES = [
    (mt._grad_sumsq_kernel, dict(addr_ptr=I64, addr_stride="i32", g_col="i32", numel_ptr=I64, chunk_tensor_ptr=I64,
                                 chunk_start_ptr=I64, partial_ptr=F32, inv_scale_ptr=F32),
     dict(G_DT=tl.float32, HAS_SCALE=True, **CHUNKED)),
    (mt._clip_coef_kernel, dict(partial_ptr=F32, n_chunks="i32", max_norm="fp32", clip_ptr=F32, skipped_ptr="*i32",
                                inv_scale_ptr=F32, found_inf_ptr=F32),
     dict(HAS_CLIP=True, HAS_SKIPPED=True, HAS_SCALE=True, HAS_FOUND_INF=True, RBLOCK=1024)),
    (mt._segment_norms_kernel, dict(partial_ptr=F32, bounds_ptr=I64, norms_ptr=F32, addr_ptr=I64, addr_stride="i32",
                                    step_col="i32", clip_ptr=F32), dict(INCREMENT_STEP=True, SQRT=True, RBLOCK=1024)),
    (lamb._lamb_moments_kernel, dict(TABLE, hyper_ptr=F32, clip_ptr=F32, partial_ptr=F32),
     dict(P_DT=tl.float32, G_DT=tl.float32, **CHUNKED)),
    (lamb._lamb_apply_kernel, dict(TABLE, hyper_ptr=F32, clip_ptr=F32, norms_ptr=F32),
     dict(P_DT=tl.float32, **CHUNKED)),
    (lars._lars_norms_kernel, dict(TABLE, hyper_ptr=F32, clip_ptr=F32, partial_ptr=F32),
     dict(P_DT=tl.float32, G_DT=tl.float32, **CHUNKED)),
    (lars._lars_apply_kernel, dict(TABLE, hyper_ptr=F32, clip_ptr=F32, norms_ptr=F32),
     dict(P_DT=tl.float32, G_DT=tl.float32, **CHUNKED)),
    (sonew._sonew_direction_kernel, dict(TABLE, hyper_ptr=F32, clip_ptr=F32, snap_ptr=F32, row_max_ptr=F32,
                                         partial_ptr=F32),
     dict(G_DT=tl.float32, BAND=2, BLOCK=256, CHUNK=2048, HAS_RELATIVE=True)),
    (sonew._sonew_apply_kernel, dict(TABLE, hyper_ptr=F32, clip_ptr=F32, norms_ptr=F32),
     dict(P_DT=tl.float32, BLOCK=256, CHUNK=2048)),
]
OP = re.compile(r"^\s*(?:@!?%p\d+\s+)?((?:div|sqrt|rsqrt|rcp|ex2|lg2|sin|cos|tanh)\.[a-z0-9.]+)", re.M)
ops = {}
for fn, signature, constexprs in CASES:
    signature = dict(signature, **{k: "constexpr" for k in constexprs})
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    ops[fn.__name__] = sorted(set(OP.findall(kernel.asm["ptx"])))
print(json.dumps(ops))
"""


def test_precise_instructions_on_sm90(tmp_path):
    """The sm_90 PTX of the LAMB, LARS, SONew and multi-tensor kernels has no approximate arithmetic
    (``div.full.f32``, ``sqrt.approx``, ``ex2.approx``, ``lg2.approx``, ``rcp.approx``): the norms are
    ``sqrt.rn.f32``, ratios and the Adam denominators ``div.rn.f32``, the bias corrections float64
    (``div.rn.f64``, ``exp`` as an FMA polynomial). The interpreter cannot show this: it runs numpy."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    result = subprocess.run([sys.executable, "-c", PTX_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ops = json.loads(result.stdout.strip().splitlines()[-1])
    if ops == "NO_NVIDIA_BACKEND":
        pytest.skip("this Triton build has no NVIDIA backend")
    approximate = {k: [op for op in v if "approx" in op or op.startswith(("div.full", "ex2", "lg2"))]
                   for k, v in ops.items()}
    assert not any(approximate.values()), f"approximate instructions: {approximate}"
    expected = {
        "_clip_coef_kernel": {"sqrt.rn.f32", "div.rn.f32"},
        "_segment_norms_kernel": {"sqrt.rn.f32"},
        "_lamb_moments_kernel": {"div.rn.f64", "div.rn.f32", "sqrt.rn.f32"},
        "_lamb_apply_kernel": {"div.rn.f64", "div.rn.f32", "sqrt.rn.f32"},
        "_lars_apply_kernel": {"div.rn.f32"},
        "_sonew_direction_kernel": {"div.rn.f64", "div.rn.f32", "sqrt.rn.f32"},
        "_sonew_apply_kernel": {"div.rn.f32"},
    }
    for kernel, want in expected.items():
        assert want <= set(ops[kernel]), f"{kernel}: {ops[kernel]} lacks {want - set(ops[kernel])}"


def test_overlap_arithmetic_matches_the_element_comparison():
    """Two views of one layout (e.g. column blocks of a fused weight) are decided from their address
    difference, without listing elements; on random layouts that decision equals the exact comparison."""
    rng = random.Random(0)
    base, decided = torch.zeros(2000), 0
    for _ in range(600):
        nd = rng.randint(1, 3)
        shape, strides = [rng.randint(1, 5) for _ in range(nd)], [rng.randint(1, 12) for _ in range(nd)]
        a, b = (base.as_strided(shape, strides, rng.randint(0, 40)) for _ in range(2))
        verdict = _lattice_overlap(a, b)
        if verdict is not None:
            decided += 1
            assert verdict == _element_addresses_overlap(a, b), (shape, strides, a.storage_offset(),
                                                                  b.storage_offset())
    assert decided > 300
    fused = torch.zeros(64, 3 * 48)
    columns = [fused[:, 48 * i:48 * (i + 1)] for i in range(3)]
    assert _lattice_overlap(columns[0], columns[1]) is False
    assert _lattice_overlap(columns[1], fused[:, 60:108]) is True
