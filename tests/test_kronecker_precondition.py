"""kronecker_precondition (Triton, interpreted on CPU) against the float64 equations
``D = JL [dW | db] JR``, ``[dW | db] <- (||V|| / ||D||) D``, written out here independently."""

import math

import pytest
import torch
from checks import REL_TOL, assert_rel_close

from kfopt.kernels.kronecker import kronecker_precondition, kronecker_precondition_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def spd(n, device, dtype):
    a = torch.randn(n, n, dtype=torch.float64)
    s = a @ a.T / n + 0.1 * torch.eye(n, dtype=torch.float64)
    s = s / s.abs().max()
    return (torch.triu(s) + torch.triu(s, 1).T).to(device=device, dtype=dtype)


def expected(jl, w, jr, b):
    """(new dW, new db, ratio) in float64, or the inputs and NaN where the ratio is not usable."""
    v = w.double() if b is None else torch.cat([w.double(), b.double()[:, None]], dim=1)
    d = jl.double() @ v @ jr.double()
    ratio = v.norm() / d.norm()
    if not (math.isfinite(ratio.item()) and ratio.item() > 0):
        return w.double(), None if b is None else b.double(), math.nan
    d = d * ratio
    return d[:, :w.shape[1]], None if b is None else d[:, -1], ratio.item()


def tolerance(*dtypes):
    return max(REL_TOL[dt] for dt in dtypes)


@pytest.mark.parametrize("factor_dtype", DTYPES)
@pytest.mark.parametrize("grad_dtype", DTYPES)
def test_matches_float64_for_batched_and_mixed_shapes(grad_dtype, factor_dtype, device, seed, poison_empty):
    """Layers of several shapes (two classes hold two layers each), with and without a bias, odd
    sizes, a transposed (column-major) weight gradient and a strided bias; factors scaled by
    unrelated positive numbers (the result must not depend on them)."""
    shapes = [(7, 5, True), (17, 33, False), (7, 5, True), (1, 3, True), (70, 9, True), (17, 33, False)]
    left, grads, right, biases = [], [], [], []
    for i, (m, k, has_bias) in enumerate(shapes):
        left.append(spd(m, device, factor_dtype) * (i + 1))
        right.append(spd(k + has_bias, device, factor_dtype) * 0.5)
        g = torch.randn(m, k, device=device) if i != 1 else torch.randn(k, m, device=device).T
        grads.append(g.to(grad_dtype))
        biases.append(torch.randn(2 * m, device=device)[::2].to(grad_dtype) if has_bias else None)
    want = [expected(*args) for args in zip(left, grads, right, biases)]
    ratios = kronecker_precondition(left, grads, right, biases)
    assert ratios.dtype == torch.float32 and ratios.shape == (len(shapes),)
    tol = tolerance(grad_dtype, factor_dtype)
    for i, (g, b, (w_new, b_new, ratio)) in enumerate(zip(grads, biases, want)):
        assert g.dtype == grad_dtype
        if b is None:
            assert_rel_close(g, w_new, tol=tol, name=f"layer {i}")
        else:
            assert_rel_close(torch.cat([g, b[:, None]], 1), torch.cat([w_new, b_new[:, None]], 1), tol=tol,
                             name=f"layer {i}")
        assert ratios[i].item() == pytest.approx(ratio, rel=max(tol, 1e-5))


def test_several_tiles_and_k_blocks(device, seed, poison_empty):
    """m = 129, n = 70 + bias: 3 x 2 output tiles and several K blocks of the default config; the
    bias column is the first column of the second tile column (col 64 < 70 < 128)."""
    m, k = 129, 70
    jl, jr = spd(m, device, torch.float32), spd(k + 1, device, torch.float32)
    w, b = torch.randn(m, k, device=device), torch.randn(m, device=device)
    w_new, b_new, ratio = expected(jl, w, jr, b)
    ratios = kronecker_precondition([jl], [w], [jr], [b])
    assert_rel_close(w, w_new, tol=1e-5, name="dW")
    assert_rel_close(b, b_new, tol=1e-5, name="db")
    assert ratios.item() == pytest.approx(ratio, rel=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN/inf inputs: numpy warns in the interpreter
def test_unusable_ratios_keep_the_raw_gradient_per_layer(device, seed):
    """Zero gradient (0/0), zero factor (||D|| = 0), NaN gradient, a gradient whose squared norm
    overflows fp32: each keeps its raw gradient (ratio NaN), in the same launch as a normal layer."""
    m, k = 6, 4
    jl, jr = spd(m, device, torch.float32), spd(k + 1, device, torch.float32)
    grads = [torch.randn(m, k, device=device) for _ in range(5)]
    biases = [torch.randn(m, device=device) for _ in range(5)]
    grads[1].zero_()
    biases[1].zero_()
    grads[3][2, 1] = math.nan
    grads[4].mul_(1e20)
    left = [jl, jl, torch.zeros_like(jl), jl, jl]
    before = [(g.clone(), b.clone()) for g, b in zip(grads, biases)]
    w_new, b_new, ratio = expected(jl, grads[0], jr, biases[0])
    ratios = kronecker_precondition(left, grads, [jr] * 5, biases)
    assert_rel_close(grads[0], w_new, tol=1e-5)
    assert ratios[0].item() == pytest.approx(ratio, rel=1e-5)
    for i in range(1, 5):
        assert math.isnan(ratios[i].item()), f"layer {i}"
        assert torch.equal(grads[i].nan_to_num(7.0), before[i][0].nan_to_num(7.0)), f"layer {i} changed"
        assert torch.equal(biases[i], before[i][1]), f"layer {i} bias changed"


def test_reference_path_agrees(device, seed):
    shapes = [(9, 4, True), (5, 11, False)]
    left = [spd(m, device, torch.float32) for m, _, _ in shapes]
    right = [spd(k + b, device, torch.float32) for _, k, b in shapes]
    grads = [torch.randn(m, k, device=device) for m, k, _ in shapes]
    biases = [torch.randn(m, device=device) if b else None for m, _, b in shapes]
    ref_grads, ref_biases = [g.clone() for g in grads], [b.clone() if b is not None else None for b in biases]
    ratios = kronecker_precondition(left, grads, right, biases)
    ref_ratios = kronecker_precondition_reference(left, ref_grads, right, ref_biases)
    assert_rel_close(ratios, ref_ratios, tol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert_rel_close(g, r, tol=1e-5)


@pytest.mark.parametrize("change, error, match", [
    (dict(left=[torch.eye(4)]), ValueError, r"left\[0\]"),
    (dict(right=[torch.eye(3)]), ValueError, r"right\[0\]"),
    (dict(biases=[torch.zeros(4)]), ValueError, r"biases\[0\]"),
    (dict(biases=[torch.zeros(3, dtype=torch.float64)]), TypeError, r"biases\[0\]"),
    (dict(biases=[]), ValueError, "biases"),
    (dict(left=[torch.eye(6)[::2, ::2]]), ValueError, r"left\[0\].*contiguous"),
    (dict(grads=[torch.zeros(3, 4, dtype=torch.int32)]), TypeError, r"grads\[0\]"),
    (dict(grads=[torch.zeros(3)]), ValueError, r"grads\[0\]"),
])
def test_bad_arguments_name_the_argument(change, error, match):
    args = dict(left=[torch.eye(3)], grads=[torch.randn(3, 4)], right=[torch.eye(5)], biases=[torch.randn(3)])
    args.update(change)
    with pytest.raises(error, match=match):
        kronecker_precondition(**args)


def test_float64_runs_on_the_reference_path_only(device):
    with pytest.raises(TypeError, match=r"grads\[0\]"):
        kronecker_precondition([torch.eye(2, device=device)], [torch.ones(2, 2, dtype=torch.float64, device=device)],
                               [torch.eye(2, device=device)])
