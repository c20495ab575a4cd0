"""rank1_inverse_update (Triton, interpreted on CPU) against float64 inverses formed explicitly.

The float64 references never use the Sherman-Morrison formula: they invert the running average
``gamma L + (1 - gamma) v v^T`` of the current inverse's inverse with ``torch.linalg.inv``.
"""

import math

import pytest
import torch
from checks import REL_TOL, assert_rel_close

from kfopt.kernels.rank1_inverse import rank1_inverse_update, rank1_inverse_update_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GAMMA = 0.95


def random_spd(d, cond=20.0, dtype=torch.float64):
    """A symmetric positive definite matrix with eigenvalues in [1, cond], random eigenvectors."""
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    values = torch.logspace(0, math.log10(cond), d, dtype=torch.float64)
    return ((q * values) @ q.T).to(dtype)


def stored(j_true, dtype):
    """``(F, scale)`` with ``scale * F = j_true`` and ``max|F| = 1``, F exactly symmetric in ``dtype``."""
    scale = j_true.abs().max()
    f = (j_true / scale).to(dtype)
    f = torch.triu(f) + torch.triu(f, 1).T
    return f, scale.item()


def true_inverse(f, scale):
    return scale * f.double().cpu()


def ema_inverse(j, v, gamma=GAMMA):
    """inv(gamma inv(J) + (1 - gamma) v v^T) in float64 (on the CPU)."""
    v = v.double().cpu()
    return torch.linalg.inv(gamma * torch.linalg.inv(j) + (1 - gamma) * torch.outer(v, v))


def update(factors, vectors, scales, **kwargs):
    counts = torch.zeros((len(factors), 3), dtype=torch.int32, device=scales.device)
    rank1_inverse_update(factors, vectors, scales, counts=counts, **kwargs)
    return counts


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_update_of_mixed_sizes_matches_float64(dtype, device, seed, poison_empty):
    """One launch over factors of sizes 1, 7, 17, 33, 129 (several row chunks and column blocks) and
    mixed storage dtypes (the class under test plus fp32), from random SPD states with scales != 1."""
    sizes = [1, 7, 17, 33, 129]
    dtypes = [dtype, torch.float32, dtype, dtype, dtype]
    factors, scales, before = [], [], []
    for d, dt in zip(sizes, dtypes):
        f, s = stored(torch.linalg.inv(random_spd(d)) * 3.7, dt)
        factors.append(f.to(device))
        scales.append(s)
        before.append(true_inverse(f, s))
    vectors = [torch.randn(d, device=device) * 2 for d in sizes]
    vectors[2] = torch.randn(2 * sizes[2], device=device)[::2]  # a strided vector (copied)
    scales = torch.tensor(scales, dtype=torch.float32, device=device)
    counts = update(factors, vectors, scales, decay=GAMMA)
    assert counts.sum().item() == 0
    for i, (f, dt) in enumerate(zip(factors, dtypes)):
        assert f.dtype == dt
        assert torch.equal(f, f.T), f"factor {i} is not exactly symmetric"
        assert f.abs().max().item() <= 1.0 + 1e-2, "the stored factor is not normalised"
        assert_rel_close(true_inverse(f, scales[i].item()), ema_inverse(before[i], vectors[i]), dtype=dt,
                         name=f"factor {i} (d={sizes[i]})")


@pytest.mark.parametrize("dtype", DTYPES)
def test_k_updates_from_identity_give_the_inverse_of_the_explicit_average(dtype, device, seed):
    """After k updates from I: scale * F == inv(gamma^k I + (1 - gamma) sum_i gamma^(k-i) v_i v_i^T)."""
    sizes, k = [7, 33], 12
    factors = [torch.eye(d, dtype=dtype, device=device) for d in sizes]
    scales = torch.ones(len(sizes), device=device)
    ema = [torch.eye(d, dtype=torch.float64) for d in sizes]
    for _ in range(k):
        vectors = [torch.randn(d, device=device) + 0.3 for d in sizes]
        counts = update(factors, vectors, scales, decay=GAMMA)
        assert counts.sum().item() == 0
        ema = [GAMMA * e + (1 - GAMMA) * torch.outer(v.double().cpu(), v.double().cpu()) for e, v in zip(ema, vectors)]
    for f, s, e in zip(factors, scales, ema):
        # 16-bit storage: one rounding per update; after k updates the relative error grows ~sqrt(k) x
        tol = REL_TOL[dtype] if dtype == torch.float32 else 2e-2
        assert_rel_close(true_inverse(f, s.item()), torch.linalg.inv(e), tol=tol, name=f"d={f.shape[0]}")


@pytest.mark.parametrize("magnitude, start", [(1e4, 1.0), (1e-3, 6e4)])
def test_fp16_storage_does_not_overflow(magnitude, start, device, seed):
    """fp16 factors with huge vectors (v^T J v ~ 1e9 > 65504: the reference code's fp16 math overflows
    and silently drops such updates) and with tiny vectors from J = 6e4 I (J grows like gamma^-k, past
    65504): the stored factor stays within [-1, 1], the scale carries the magnitude, and the inverse
    matches float64. (8 updates < d: directions no vector refreshed keep the factor's largest entries;
    see the kernel's docstring on cancellation when every direction shrinks by more than 1/eps.)"""
    d, k = 17, 8
    f = torch.eye(d, dtype=torch.float16, device=device)
    f32 = torch.eye(d, dtype=torch.float32, device=device)
    scales = torch.full((2,), start, device=device)
    ema = torch.eye(d, dtype=torch.float64) / start
    largest_s = 0.0
    for _ in range(k):
        v = torch.randn(d, device=device) * magnitude
        v64 = v.double().cpu()
        largest_s = max(largest_s, (v64 @ torch.linalg.solve(ema, v64)).item())
        counts = update([f, f32], [v, v], scales, decay=GAMMA)
        assert counts.sum().item() == 0
        ema = GAMMA * ema + (1 - GAMMA) * torch.outer(v64, v64)
    expected = torch.linalg.inv(ema)
    assert torch.isfinite(f).all() and f.abs().max().item() <= 1.0 + 1e-3
    assert_rel_close(true_inverse(f, scales[0].item()), expected, dtype=torch.float16, name="fp16")
    assert_rel_close(true_inverse(f32, scales[1].item()), expected, tol=1e-4, name="fp32")
    assert largest_s > 65504 or expected.abs().max().item() > 65504, "the case should leave fp16's range"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN/inf inputs: numpy warns in the interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_stabiliser_blend_reset_and_skip_per_factor(dtype, device, seed, poison_empty):
    """One launch, one factor per case, each decided on its own:

    0 blend (max|J| > threshold): J <- SM(zeta J + (1 - zeta) I);  1 below the threshold: plain SM;
    2 NaN in F, 3 inf in F, 4 scale inf, 5 negative definite F (v^T J v < 0), 6 F == 0: reset, SM of I;
    7 non-finite vector: unchanged; 8 NaN F and NaN vector: reset, no update;
    9 zero vector: J <- J / gamma exactly.
    """
    d, threshold, zeta = 9, 5.0, 0.8
    eye = torch.eye(d, dtype=torch.float64)
    j_big = torch.linalg.inv(random_spd(d)) * 20  # max|J| > 5
    j_small = torch.linalg.inv(random_spd(d))  # max|J| <= 1
    cases = [stored(j_big, dtype), stored(j_small, dtype)] + [stored(j_small, dtype) for _ in range(8)]
    factors = [f.clone().to(device) for f, _ in cases]
    scales = torch.tensor([s for _, s in cases], dtype=torch.float32, device=device)
    before = [true_inverse(f, s) for f, s in cases]
    factors[2][1, 3] = factors[2][3, 1] = math.nan
    factors[3][0, 0] = math.inf
    scales[4] = math.inf
    factors[5] = (-factors[5]).contiguous()
    factors[6].zero_()
    factors[8].fill_(math.nan)
    vectors = [torch.randn(d, device=device) for _ in cases]
    vectors[7][2] = math.inf
    vectors[8][0] = math.nan
    vectors[9].zero_()
    original_7 = factors[7].clone()
    counts = update(factors, vectors, scales, decay=GAMMA, threshold=threshold, blend=zeta)

    expected_counts = [[1, 0, 0], [0, 0, 0]] + [[0, 1, 0]] * 5 + [[0, 0, 1], [0, 1, 1], [0, 0, 0]]
    assert counts.tolist() == expected_counts
    tol = dict(dtype=dtype) if dtype != torch.float32 else dict(tol=1e-5)
    got = [true_inverse(f, s) for f, s in zip(factors, scales.tolist())]
    assert_rel_close(got[0], ema_inverse(zeta * before[0] + (1 - zeta) * eye, vectors[0]), **tol, name="blend")
    assert_rel_close(got[1], ema_inverse(before[1], vectors[1]), **tol, name="plain")
    for i in range(2, 7):
        assert_rel_close(got[i], ema_inverse(eye, vectors[i]), **tol, name=f"reset case {i}")
    assert torch.equal(factors[7], original_7) and scales[7].item() == pytest.approx(cases[7][1], rel=1e-6)
    assert torch.equal(factors[8], torch.eye(d, dtype=dtype, device=device)) and scales[8].item() == 1.0
    assert_rel_close(got[9], before[9] / GAMMA, **tol, name="zero vector")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf inputs: numpy warns in the interpreter
@pytest.mark.parametrize("path", ["kernel", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_definiteness_check_of_the_stabiliser(path, dtype, device):
    """Factors that are finite and non-zero but not positive definite, and the limits of the check.
    Hand-made 2 x 2 (4 x 4) cases whose outcome is known in closed form, one factor per case:

    0 F = diag(1, -1), v = (1, 0.9): v^T J v = 0.19 > 0 but |F w|^2 = 1.81 > 2 d max|F| t = 0.76: reset;
    1 F = diag(1, -1), v = (0.9, 1): v^T J v < 0: reset;
    2 J = 10 diag(1, -0.01) blended (threshold 5, zeta 0.8) is diag(8.2, 0.12), definite: blend, no reset;
    3 J = 10 diag(1, -1) blended is diag(8.2, -7.8), v = (1, 1) still sees it indefinite: reset;
    4 indefinite F with a non-finite vector: skipped (not reset, unchanged);
    5 scale -1 and 6 scale 0 (J negative definite / zero): reset;
    7 F = diag(1, 0), v = (0, 1): v^T J v = 0, J v = 0 (semi-definite, kept): J <- J / gamma;
    8 F = 0.9 ones + 0.1 I (4 x 4, definite), v = ones: |F w|^2 = 3.7^2 4 > max|F| t = 14.8, within the
      bound 2 d max|F| t: kept, plain update.
    """
    eye2 = torch.eye(2, dtype=torch.float64)
    mats = [torch.diag(torch.tensor(x, dtype=torch.float64)) for x in
            ([1.0, -1.0], [1.0, -1.0], [1.0, -0.01], [1.0, -1.0], [1.0, -1.0], [1.0, 0.5], [1.0, 0.5], [1.0, 0.0])]
    mats.append(0.9 * torch.ones(4, 4, dtype=torch.float64) + 0.1 * torch.eye(4, dtype=torch.float64))
    vecs = [[1.0, 0.9], [0.9, 1.0], [0.3, 0.7], [1.0, 1.0], [math.inf, 1.0], [0.5, 1.0], [0.5, 1.0], [0.0, 1.0],
            [1.0] * 4]
    kappas = [1.0, 1.0, 10.0, 10.0, 1.0, -1.0, 0.0, 1.0, 1.0]
    factors = [m.to(device=device, dtype=dtype) for m in mats]
    vectors = [torch.tensor(v, device=device) for v in vecs]
    scales = torch.tensor(kappas, device=device)
    before = [k * m for k, m in zip(kappas, mats)]
    originals = [f.clone() for f in factors]
    counts = torch.zeros((len(factors), 3), dtype=torch.int32, device=device)
    kw = dict(decay=GAMMA, threshold=5.0, blend=0.8, counts=counts)
    (rank1_inverse_update if path == "kernel" else rank1_inverse_update_reference)(factors, vectors, scales, **kw)

    assert counts.tolist() == [[0, 1, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 0], [0, 1, 0],
                               [0, 0, 0], [0, 0, 0]]
    tol = dict(tol=1e-5) if dtype == torch.float32 else dict(dtype=dtype)
    got = [true_inverse(f, s) for f, s in zip(factors, scales.tolist())]
    for i in (0, 1, 3, 5, 6):
        assert_rel_close(got[i], ema_inverse(eye2, vectors[i]), **tol, name=f"reset case {i}")
    blended = 0.8 * before[2] + 0.2 * eye2
    assert_rel_close(got[2], ema_inverse(blended, vectors[2]), **tol, name="blend of an indefinite factor")
    assert torch.equal(factors[4], originals[4]) and scales[4].item() == 1.0
    assert_rel_close(got[7], before[7] / GAMMA, **tol, name="semi-definite, J v = 0")
    assert_rel_close(got[8], ema_inverse(before[8], vectors[8]), **tol, name="definite, |F w|^2 > max|F| t")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN/inf inputs: numpy warns in the interpreter
def test_reference_path_makes_the_same_decisions(device, seed):
    """The PyTorch twin (used on CPU without the interpreter) against the kernel on the stabiliser's
    cases and on large vectors."""
    d = 12
    cases = [stored(torch.linalg.inv(random_spd(d)) * m, torch.float32) for m in (20.0, 1.0, 1.0, 1.0)]
    factors = [f.to(device) for f, _ in cases]
    factors[2][0, 1] = factors[2][1, 0] = math.nan
    vectors = [torch.randn(d, device=device) * m for m in (1.0, 1e5, 1.0, 0.0)]
    scales = torch.tensor([s for _, s in cases], dtype=torch.float32, device=device)
    ref_factors, ref_scales = [f.clone() for f in factors], scales.clone()
    counts = update(factors, vectors, scales, decay=0.9, threshold=5.0, blend=0.9)
    ref_counts = torch.zeros_like(counts)
    rank1_inverse_update_reference(ref_factors, vectors, ref_scales, decay=0.9, threshold=5.0, blend=0.9,
                                   counts=ref_counts)
    assert torch.equal(counts, ref_counts)
    assert_rel_close(scales, ref_scales, tol=1e-5, name="scales")
    for i, (f, r) in enumerate(zip(factors, ref_factors)):
        assert_rel_close(f, r, tol=1e-5, name=f"factor {i}")


def test_per_factor_hyperparameters_without_counts(device, seed):
    d = 5
    factors = [torch.eye(d, device=device) for _ in range(2)]
    scales = torch.ones(2, device=device)
    v = torch.randn(d, device=device)
    rank1_inverse_update(factors, [v, v], scales, decay=[0.5, 0.99])
    for f, s, gamma in zip(factors, scales, (0.5, 0.99)):
        assert_rel_close(true_inverse(f, s.item()), ema_inverse(torch.eye(d, dtype=torch.float64), v, gamma), tol=1e-5)


@pytest.mark.parametrize("call, error, match", [
    (lambda f, v, s: rank1_inverse_update([f], [v[:3]], s, decay=0.9), ValueError, r"vectors\[0\]"),
    (lambda f, v, s: rank1_inverse_update([f[:, :3]], [v], s, decay=0.9), ValueError, r"factors\[0\]"),
    (lambda f, v, s: rank1_inverse_update([torch.eye(8)[::2, ::2]], [v[:4]], s, decay=0.9), ValueError,
     r"factors\[0\].*contiguous"),
    (lambda f, v, s: rank1_inverse_update([f], [v], s.double(), decay=0.9), TypeError, "scales"),
    (lambda f, v, s: rank1_inverse_update([f], [v], torch.ones(2), decay=0.9), ValueError, "scales"),
    (lambda f, v, s: rank1_inverse_update([f], [v], s, decay=1.0), ValueError, "decay"),
    (lambda f, v, s: rank1_inverse_update([f], [v], s, decay=0.9, threshold=0.0), ValueError, "threshold"),
    (lambda f, v, s: rank1_inverse_update([f], [v], s, decay=0.9, blend=1.5), ValueError, "blend"),
    (lambda f, v, s: rank1_inverse_update([f], [v], s, decay=[0.9, 0.9]), ValueError, "decay"),
    (lambda f, v, s: rank1_inverse_update([f], [v], s, decay=0.9, counts=torch.zeros(1, 3)), TypeError, "counts"),
    (lambda f, v, s: rank1_inverse_update([f.int()], [v], s, decay=0.9), TypeError, r"factors\[0\]"),
    (lambda f, v, s: rank1_inverse_update([f], [v], s, decay="0.9"), TypeError, "decay"),
])
def test_bad_arguments_name_the_argument(call, error, match):
    f, v, s = torch.eye(6), torch.randn(6), torch.ones(1)
    with pytest.raises(error, match=match):
        call(f, v, s)


def test_float64_factors_run_on_the_reference_path_only(device):
    f = torch.eye(4, dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match=r"factors\[0\]"):
        rank1_inverse_update([f], [torch.ones(4, device=device)], torch.ones(1, device=device), decay=0.9)
