"""SONew kernels (Triton, interpreted on CPU) against float64 truths built independently from the math.

The truth for the sparse inverse is dense: S is formed as an n x n matrix from the band statistics and
X = L D L^T from per-row ``torch.linalg.solve`` calls (not the elimination recurrences the kernel and
the library reference use), with the edge-dropping rule of ``kernels/sonew.py`` restated on dense
matrices.
"""

import pytest
import torch
from checks import assert_rel_close

import kfopt.kernels.sonew as sonew
from kfopt.autotune import Config, ConfigSpace
from kfopt.kernels.sonew import (
    DROP_TOL,
    MAX_BAND,
    apply_sparse_inverse_reference,
    sonew_step,
    sonew_step_reference,
    sparse_inverse_factors_reference,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
F64 = torch.float64


# ----------------------------------------------------------------------------- float64 truth


def dense_band(diag, offdiag, damping=0.0):
    """The n x n symmetric banded matrix with ``diag + damping`` and ``S[i, i+j] = offdiag[j-1, i]``."""
    n, b = diag.shape[0], offdiag.shape[0]
    S = torch.diag(diag.to(F64) + damping)
    for j in range(1, min(b, n - 1) + 1):
        S += torch.diag(offdiag[j - 1, : n - j].to(F64), j) + torch.diag(offdiag[j - 1, : n - j].to(F64), -j)
    return S


def reference_inverse(S, band):
    """Dense X from the library reference's factors of the band of (already damped) dense S."""
    n = S.shape[0]
    offdiag = torch.zeros(band, n, dtype=F64)
    for j in range(1, min(band, n - 1) + 1):
        offdiag[j - 1, : n - j] = S.diagonal(j)
    psi, dinv = sparse_inverse_factors_reference(S.diagonal().clone(), offdiag, 0.0)
    eye = torch.eye(n, dtype=F64)
    return torch.stack([apply_sparse_inverse_reference(psi, dinv, eye[k]) for k in range(n)], dim=1)


def band_mask(n, b):
    idx = torch.arange(n)
    return (idx[:, None] - idx[None, :]).abs() <= b


def dense_sparse_inverse(S, band, tol=DROP_TOL):
    """X = L D L^T for dense S; row k regresses on its nearest neighbours k+1..k+m, m the longest prefix
    for which every neighbour's conditional variance (given the nearer ones) and row k's conditional
    variance stay above ``tol`` times their unconditional values. Returns (X, edges kept)."""
    n = S.shape[0]
    L, D, kept_edges = torch.eye(n, dtype=F64), torch.zeros(n, dtype=F64), 0
    for k in range(n):
        kept, c_kept = 0, S[k, k]
        for m in range(1, min(band, n - 1 - k) + 1):
            A, s = S[k + 1:k + m + 1, k + 1:k + m + 1], S[k + 1:k + m + 1, k]
            pivot = A[-1, -1] - (A[-1, :-1] @ torch.linalg.solve(A[:-1, :-1], A[:-1, -1]) if m > 1 else 0)
            c = S[k, k] - s @ torch.linalg.solve(A, s)
            if pivot <= tol * A[-1, -1] or c <= tol * S[k, k]:
                break
            kept, c_kept = m, c
        if kept:
            L[k + 1:k + kept + 1, k] = -torch.linalg.solve(S[k + 1:k + kept + 1, k + 1:k + kept + 1],
                                                           S[k + 1:k + kept + 1, k])
        D[k] = 1 / c_kept
        kept_edges += kept
    return L @ torch.diag(D) @ L.T, kept_edges


def random_band_statistics(n, b, seed=0, collinear=False):
    """Band of a random PSD matrix C C^T: diag (n,), offdiag (b, n). Well conditioned (no edge is
    dropped) unless ``collinear``: then every third row of C is a multiple of the previous one, so
    windows holding both rows are singular and their edges must go."""
    gen = torch.Generator().manual_seed(seed)
    C = torch.randn(n, 4 * n + 8, generator=gen, dtype=F64)
    if collinear:
        C[2::3] = -1.5 * C[1::3][: C[2::3].shape[0]]
    sigma = C @ C.T / C.shape[1] + (0.0 if collinear else 0.1) * torch.eye(n, dtype=F64)
    offdiag = torch.zeros(b, n, dtype=F64)
    for j in range(1, min(b, n - 1) + 1):
        offdiag[j - 1, : n - j] = sigma.diagonal(j)
    return sigma.diagonal().clone(), offdiag


def use_tiles(monkeypatch, block, chunk):
    """Launch with tiles of ``block`` rows and chunks of ``chunk``, so that small tensors put halos
    across tile and chunk boundaries (the interpreter's cost grows with the number of tiles)."""
    small = Config({"BLOCK": block, "CHUNK": chunk}, num_warps=4)
    monkeypatch.setattr(sonew, "SONEW_CONFIGS", ConfigSpace("sonew_step", [small], small))


@pytest.fixture
def small_tiles(monkeypatch):
    use_tiles(monkeypatch, 4, 8)


@pytest.fixture
def medium_tiles(monkeypatch):
    use_tiles(monkeypatch, 16, 32)


# ----------------------------------------------------------------------------- the sparse inverse


@pytest.mark.parametrize("band", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 17])
def test_reference_factors_invert_to_the_band(band, n):
    """X^{-1} = S on the band, X = 0 off it; the factors equal the dense truth (float64)."""
    diag, offdiag = random_band_statistics(n, band, seed=n * 10 + band)
    damping = 1e-3
    psi, dinv = sparse_inverse_factors_reference(diag, offdiag, damping)
    L = torch.eye(n, dtype=F64)
    for k in range(n):
        for p in range(1, band + 1):
            if k + p < n:
                L[k + p, k] = -psi[k, p - 1]
            else:
                assert psi[k, p - 1] == 0, "a neighbour past the end must have no weight"
    X = L @ torch.diag(dinv) @ L.T
    S = dense_band(diag, offdiag, damping)
    on_band = band_mask(n, band)
    assert torch.count_nonzero(X[~on_band]) == 0
    assert_rel_close(torch.linalg.inv(X)[on_band], S[on_band], tol=1e-10, name="X^-1 on the band")
    truth, kept = dense_sparse_inverse(S, band)
    assert kept == sum(min(band, n - 1 - k) for k in range(n)), "well-conditioned S: every edge kept"
    assert_rel_close(X, truth, tol=1e-10, name="X")
    v = torch.randn(n, dtype=F64)
    assert_rel_close(apply_sparse_inverse_reference(psi, dinv, v), truth @ v, tol=1e-12, name="X v")


def test_reference_drops_an_edge_of_a_singular_window():
    """Row 0's window is rank one (S = u u^T + tiny damping on rows 0..1): its edge is dropped (psi = 0,
    D = 1/S_00), the other rows keep theirs."""
    u = torch.tensor([1.0, -2.0], dtype=F64)
    diag = torch.tensor([1.0, 4.0, 3.0, 2.0], dtype=F64)
    offdiag = torch.tensor([[u[0] * u[1], 0.5, 0.3, 0.0]], dtype=F64)
    psi, dinv = sparse_inverse_factors_reference(diag, offdiag, 1e-12)
    assert psi[0, 0] == 0 and dinv[0] == 1 / (1.0 + 1e-12)
    assert (psi[1:3, 0] != 0).all()
    truth, kept = dense_sparse_inverse(dense_band(diag, offdiag, 1e-12), 1)
    assert kept == 2
    X = torch.eye(4, dtype=F64)
    for k in range(4):
        X[:, k] = apply_sparse_inverse_reference(psi, dinv, torch.eye(4, dtype=F64)[k])
    assert_rel_close(X, truth, tol=1e-12, name="X")


def kernel_inverse(diag_old, offdiag_old, g, band, device, b1=0.5, b2=0.9, eps=1e-3, step=3.0):
    """X as the kernel applies it, column by column: n copies of one tensor in one launch, where copy k
    has mu^ = e_k (exp_avg chosen for that), w = 0, lr = 1, no grafting, so w_new = -X e_k.
    Also returns the damped S the kernel must have built."""
    n = g.numel()
    t = step + 1
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
    eye = torch.eye(n, dtype=F64)
    exp_avgs = [((bc1 * eye[k] - (1 - b1) * g.to(F64)) / b1).float().to(device) for k in range(n)]
    params = [torch.zeros(n, device=device) for _ in range(n)]
    diags = [diag_old.float().to(device) for _ in range(n)]
    offdiags = [offdiag_old.float().to(device) for _ in range(n)]
    steps = [torch.tensor(step, device=device) for _ in range(n)]
    sonew_step(params, [g.to(device)] * n, exp_avgs, diags, offdiags, steps, lr=1.0, beta1=b1, beta2=b2, eps=eps,
               graft="none")
    X = -torch.stack(params, dim=1).to(F64).cpu()
    # the statistics after the step, from the fp32 inputs the kernel saw
    g64 = g.to(F64)
    diag_new = (b2 * diag_old.float().to(F64) + (1 - b2) * g64 * g64) / bc2
    offdiag_new = b2 * offdiag_old.float().to(F64)
    for j in range(1, min(band, n - 1) + 1):
        offdiag_new[j - 1, : n - j] += (1 - b2) * g64[:-j] * g64[j:]
    return X, dense_band(diag_new, offdiag_new / bc2, eps)


@pytest.mark.parametrize("band", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [2, 3, 11])
def test_kernel_inverse_invert_to_the_band(band, n, small_tiles, poison_empty, device):
    """The kernel's X (fp32): zero off the band, X^{-1} = S on the band, equal to the dense truth;
    n = 2, 3 are shorter than bands 2..4; tiles of 4 rows put halos across tile and chunk edges."""
    diag, offdiag = random_band_statistics(n, band, seed=band)
    g = torch.randn(n, generator=torch.Generator().manual_seed(n))
    X, S = kernel_inverse(diag, offdiag, g, band, device)
    on_band = band_mask(n, band)
    assert torch.count_nonzero(X[~on_band]) == 0
    truth, kept = dense_sparse_inverse(S, band)
    assert kept == sum(min(band, n - 1 - k) for k in range(n))
    assert_rel_close(X, truth, torch.float32, name="X")
    assert_rel_close(torch.linalg.inv(X)[on_band], S[on_band], tol=1e-4, name="X^-1 on the band")


@pytest.mark.parametrize("band", [1, 2, 3, 4])
def test_kernel_drops_the_edges_of_singular_windows(band, small_tiles, device):
    """Statistics with collinear rows (g = 0, so S is exactly the scaled old band; damping 1e-7 of the
    diagonal): the kernel drops exactly the edges the dense truth drops -- the neighbour's own
    conditional variance (pivot) vanishing included -- and matches its X."""
    n = 11
    diag, offdiag = random_band_statistics(n, band, seed=band, collinear=True)
    X, S = kernel_inverse(diag, offdiag, torch.zeros(n), band, device, eps=1e-7)
    truth, kept = dense_sparse_inverse(S, band)
    assert 0 < kept < sum(min(band, n - 1 - k) for k in range(n))
    assert torch.equal(X != 0, truth != 0), "the kernel kept or dropped other edges than the truth"
    assert_rel_close(X, truth, torch.float32, name="X")
    X_ref = reference_inverse(S, band)
    assert torch.equal(X_ref != 0, truth != 0), "the reference kept or dropped other edges than the truth"
    assert_rel_close(X_ref, truth, tol=1e-10, name="reference X")


# ----------------------------------------------------------------------------- the whole step


SHAPES = [(1,), (2,), (7,), (3, 5), (2, 1, 9), (33,), (129,)]


def make_tensors(shape, band, dtype, gen, device):
    """Random state that is not a first step: [param, grad, exp_avg, diag, offdiag, step], the
    offdiag truncated to the tensor's length as the optimizer does."""
    n = torch.Size(shape).numel()
    diag, offdiag = random_band_statistics(n, band, seed=int(torch.randint(0, 1000, (1,), generator=gen)))
    offdiag = offdiag[: min(band, n - 1)].contiguous()
    tensors = [torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype),
               0.3 * torch.randn(shape, generator=gen), diag.float(), offdiag.float(), torch.tensor(5.0)]
    return [t.to(device) for t in tensors]


def run_both(tensors, **hyper):
    """The kernel on ``tensors`` (in place) and the float64 reference on float64 copies."""
    ref = [[t.to(F64) if i < 5 else t.clone() for i, t in enumerate(ts)] for ts in tensors]
    clip = sonew_step(*[list(c) for c in zip(*tensors)], **hyper)
    ref_clip = sonew_step_reference(*[list(c) for c in zip(*ref)], **hyper)
    return clip, ref_clip, ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("band", [1, 2, 3, 4])
def test_step_matches_reference(dtype, band, medium_tiles, poison_empty, device):
    """Every output of one multi-tensor step vs the float64 reference: odd shapes (tensors shorter than
    the band included), per-tensor grafts, relative and absolute damping, plain-Adam tensors."""
    gen = torch.Generator().manual_seed(band)
    tensors = [make_tensors(shape, band, dtype, gen, device) for shape in SHAPES]
    n = len(SHAPES)
    grafts = ["adam", "none", "rmsprop", "sgd", "adam", "none", "adam"]
    clip, ref_clip, ref = run_both(
        tensors, lr=0.1, weight_decay=0.05, eps=1e-3, graft=grafts, relative_eps=[i % 2 == 1 for i in range(n)],
        precondition=[i != 4 for i in range(n)], beta1=0.8, beta2=0.95)
    assert_rel_close(clip[:1], ref_clip[:1].float(), torch.float32, name="grad norm")
    assert clip[2] == 1
    for i, (out, want) in enumerate(zip(tensors, ref)):
        for col, name in ((0, "param"), (2, "exp_avg"), (3, "diag"), (4, "offdiag")):
            o, w = out[col], want[col]
            if o.numel():
                assert_rel_close(o, w, dtype if name == "param" else torch.float32, name=f"{name}[{i}]")
        assert out[5] == 6.0


def sonew_by_hand(w, g, mu, nu_d, nu_off, step, band, lr, b1, b2, eps, wd, graft, graft_eps, relative, precondition):
    """One SONew step of one tensor in float64 from ``kernels/sonew.py``'s docstring equations, dense
    (``dense_band``, ``dense_sparse_inverse``), with no library helper. Returns (w, mu, nu_d, nu_off)."""
    n, t = w.numel(), step + 1
    w, g, mu = w.reshape(-1), g.reshape(-1), mu.reshape(-1)
    mu = b1 * mu + (1 - b1) * g
    nu_d = b2 * nu_d + (1 - b2) * g * g
    nu_off = nu_off.clone()
    for j in range(1, min(band, n - 1) + 1):
        nu_off[j - 1, : n - j] = b2 * nu_off[j - 1, : n - j] + (1 - b2) * g[:-j] * g[j:]
    mu_hat, nu_hat = mu / (1 - b1 ** t), nu_d / (1 - b2 ** t)
    s_hat = dense_band(nu_hat, nu_off / (1 - b2 ** t))
    damp = max(eps * s_hat.abs().sum(1).max().item(), 1e-24) if relative else eps
    adam = mu_hat / (nu_hat.sqrt() + graft_eps)
    if precondition:
        x = dense_sparse_inverse(s_hat + damp * torch.eye(n, dtype=F64), band)[0] @ mu_hat
        a = {"adam": adam, "rmsprop": g / (nu_hat.sqrt() + graft_eps), "sgd": g, "none": None}[graft]
        d = x if a is None else a.norm() / x.norm() * x
    else:
        d = adam
    return w - lr * (d + wd * w), mu, nu_d, nu_off


def test_step_matches_the_equations_written_here(medium_tiles, poison_empty, device):
    """Two steps of several tensors in one call against ``sonew_by_hand`` (not the library's reference or
    hyperparameter records): every graft, relative and absolute damping, a plain-Adam tensor, weight
    decay, distinct betas."""
    gen = torch.Generator().manual_seed(11)
    cases = [((5, 7), 2, "adam", False, True), ((9,), 1, "rmsprop", True, True), ((2, 6), 3, "sgd", True, True),
             ((4, 4), 1, "none", False, True), ((6,), 2, "adam", False, False)]
    hyper = dict(lr=0.05, beta1=0.8, beta2=0.95, eps=1e-3, weight_decay=0.02, graft=[c[2] for c in cases],
                 graft_eps=1e-6, relative_eps=[c[3] for c in cases], precondition=[c[4] for c in cases])
    tensors = [make_tensors(c[0], c[1], torch.float32, gen, device) for c in cases]
    want = [[t.to(F64).cpu() for t in ts[:5]] + [ts[5].item()] for ts in tensors]
    for _ in range(2):
        grads = [torch.randn(c[0], generator=gen) for c in cases]
        for ts, g in zip(tensors, grads):
            ts[1] = g.to(device)
        sonew_step(*[list(c) for c in zip(*tensors)], **hyper)
        for i, (c, g) in enumerate(zip(cases, grads)):
            w, _, mu, nu_d, nu_off, step = want[i]
            w_new, mu, nu_d, nu_off = sonew_by_hand(
                w, g.to(F64), mu, nu_d, nu_off, step, c[1], hyper["lr"], hyper["beta1"], hyper["beta2"], hyper["eps"],
                hyper["weight_decay"], c[2], hyper["graft_eps"], c[3], c[4])
            want[i] = [w_new.view(c[0]), None, mu.view(c[0]), nu_d, nu_off, step + 1]
    for i, (out, w) in enumerate(zip(tensors, want)):
        for col, name in ((0, "param"), (2, "exp_avg"), (3, "diag"), (4, "offdiag")):
            assert_rel_close(out[col], w[col], tol=2e-5, name=f"{name}[{i}] ({cases[i][2]})")
        assert out[5].item() == w[5]


def test_mixed_dtypes_in_one_call(medium_tiles, poison_empty, device):
    """Tensors of several dtypes: one launch per dtype group over consecutive chunk ranges, each
    group finding its halo snapshots at its own offset."""
    gen = torch.Generator().manual_seed(7)
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.float32, torch.bfloat16]
    shapes = [(5, 9), (40,), (3, 3), (2,), (70,)]
    tensors = [make_tensors(shape, 2, dtype, gen, device) for shape, dtype in zip(shapes, dtypes)]
    _, _, ref = run_both(tensors, lr=0.1, graft="none", eps=1e-3, relative_eps=[True, False, True, False, True])
    for i, (out, want) in enumerate(zip(tensors, ref)):
        assert_rel_close(out[0], want[0], dtypes[i], name=f"param[{i}]")
        assert_rel_close(out[4], want[4], torch.float32, name=f"offdiag[{i}]")


def test_relative_damping_changes_the_step(medium_tiles, device):
    """With eps large enough to matter, relative and absolute damping give different (correct) steps."""
    gen = torch.Generator().manual_seed(3)
    base = make_tensors((4, 9), 2, torch.float32, gen, device)
    params = []
    for relative in (False, True):
        tensors = [[t.clone() for t in base]]
        _, _, ref = run_both(tensors, lr=0.1, eps=0.5, graft="none", relative_eps=relative)
        assert_rel_close(tensors[0][0], ref[0][0], torch.float32, name=f"param (relative={relative})")
        params.append(tensors[0][0])
    assert (params[0] - params[1]).abs().max() > 1e-3


def test_non_contiguous_param_follows_row_major_order(device):
    """A transposed view is preconditioned in its own row-major order and written back in place."""
    gen = torch.Generator().manual_seed(4)
    ts = make_tensors((6, 5), 1, torch.float32, gen, device)
    ts[0] = torch.randn(5, 6, generator=gen).to(device).t()
    ts[1] = torch.randn(5, 6, generator=gen).to(device).t()
    view = ts[0]
    _, _, ref = run_both([ts], lr=0.1, graft="none")
    assert ts[0] is view and not view.is_contiguous()
    assert_rel_close(view, ref[0][0], torch.float32, name="param")


def test_nonfinite_gradient_skips_every_tensor(medium_tiles, device):
    gen = torch.Generator().manual_seed(5)
    tensors = [make_tensors(shape, 2, torch.float32, gen, device) for shape in [(3, 4), (9,)]]
    tensors[1][1][3] = float("inf")
    before = [[t.clone() for t in ts] for ts in tensors]
    skipped = torch.zeros((), dtype=torch.int32, device=device)
    clip = sonew_step(*[list(c) for c in zip(*tensors)], lr=0.1, skipped=skipped)
    assert clip[2] == 0 and skipped == 1
    for ts, old in zip(tensors, before):
        for t, o in zip(ts, old):
            assert torch.equal(t, o)


def test_empty_and_zero_size_tensors(device):
    assert torch.equal(sonew_step([], [], [], [], [], [], lr=0.1), torch.zeros(3))
    p, s = torch.zeros(0, 3, device=device), torch.tensor(0.0, device=device)
    sonew_step([p], [p.clone()], [p.clone()], [torch.zeros(0, device=device)], [torch.zeros(0, 0, device=device)],
               [s], lr=0.1)
    assert s == 1.0


def test_bad_inputs_raise_before_any_write(device):
    gen = torch.Generator().manual_seed(6)
    ts = make_tensors((3, 4), 1, torch.float32, gen, device)
    p, g, m, v, o, s = ts
    before = [t.clone() for t in ts]
    cases = [
        (ValueError, "grads", dict(grads=[g[:2]])),
        (ValueError, "exp_avgs", dict(exp_avgs=[m.reshape(-1)])),
        (ValueError, "diags", dict(diags=[v[:-1]])),
        (ValueError, "offdiags", dict(offdiags=[torch.zeros(MAX_BAND + 1, 12, device=device)])),
        (ValueError, "offdiags", dict(offdiags=[torch.zeros(12, device=device)])),
        (ValueError, "steps", dict(steps=[])),
        (ValueError, "graft", dict(graft="adagrad")),
        (ValueError, "must be contiguous", dict(offdiags=[torch.zeros(12, 2, device=device).t()[:1]])),
        (TypeError, "float32 state", dict(diags=[v.double()])),
        (TypeError, "params", dict(params=[p.double()], grads=[g.double()], exp_avgs=[m.double()])),
    ]
    for error, match, change in cases:
        args = dict(params=[p], grads=[g], exp_avgs=[m], diags=[v], offdiags=[o], steps=[s])
        hyper = {"graft": change.pop("graft")} if "graft" in change else {}
        args.update(change)
        with pytest.raises(error, match=match):
            sonew_step(**args, lr=0.1, **hyper)
    for t, b in zip(ts, before):
        assert torch.equal(t, b)


# ----------------------------------------------------------------------------- bias-correction precision


def zero_weight_step(shape, band, step, gen, device, precondition, graft, beta1, beta2):
    """A step from fresh random state with w = 0 and lr = 1 (w_new = -d, the direction alone)."""
    n = torch.Size(shape).numel()
    diag, offdiag = random_band_statistics(n, band, seed=int(torch.randint(0, 1000, (1,), generator=gen)))
    ts = [torch.zeros(shape), torch.randn(shape, generator=gen), 0.3 * torch.randn(shape, generator=gen),
          diag.float(), offdiag[: min(band, n - 1)].float().contiguous(), torch.tensor(step)]
    tensors = [[t.to(device) for t in ts]]
    _, _, ref = run_both(tensors, lr=1.0, eps=1e-8, graft=graft, graft_eps=1e-8, precondition=precondition,
                         beta1=beta1, beta2=beta2)
    return tensors[0][0], ref[0][0]


@pytest.mark.parametrize("step", [0.0, 99.0, 9999.0])  # t = 1, 100, 10^4 (1 - 0.9999^t = 1e-4 .. 0.63)
@pytest.mark.parametrize("beta1,beta2", [(0.9, 0.9999), (0.0, 0.9999), (0.9, 0.999)])
def test_bias_corrected_update_is_fp32_accurate(step, beta1, beta2, small_tiles, device):
    """The bias-corrected step against float64 at the first step (1 - b2^t = 1e-4 cancels hardest) and
    at large t, for fresh random inputs: the plain-Adam direction mu^ / (sqrt(nu^) + eps) to ~1e-6 and
    the grafted sparse-inverse direction (whose size is that of the Adam vector) to fp32 tolerance.

    The interpreter computes exp/log/sqrt/division exactly (numpy), so here the test pins the math:
    the bias corrections come from ln(b) taken in float64 on the host, not from the fp32-rounded beta
    (fp32(0.9999) is 1.7e-8 off: 1.7e-4 of 1 - b2 at t = 1). That the compiled kernel keeps this
    precision on the GPU is what ``KFOPT_TEST_DEVICE=cuda`` runs of this test check, and the sm_90
    instruction check in ``test_trust_ratio_kernels.py``.
    """
    gen = torch.Generator().manual_seed(int(step) + int(100 * beta1))
    out, want = zero_weight_step((300,), 0, step, gen, device, False, "adam", beta1, beta2)
    assert_rel_close(out, want, tol=2e-6, name=f"Adam direction (t = {step + 1:.0f})")
    assert (out.double().cpu() - want).abs().max() <= 4e-6 * want.abs().max()
    out, want = zero_weight_step((6, 7), 2, step, gen, device, True, "adam", beta1, beta2)
    assert_rel_close(out, want, torch.float32, name=f"grafted direction (t = {step + 1:.0f})")


def test_betas_must_be_below_one(device):
    gen = torch.Generator().manual_seed(8)
    p, g, m, v, o, s = make_tensors((3, 4), 1, torch.float32, gen, device)
    with pytest.raises(ValueError, match=r"beta2: bias correction needs a decay rate in \[0, 1\)"):
        sonew_step([p], [g], [m], [v], [o], [s], lr=0.1, beta2=1.0)
    with pytest.raises(ValueError, match=r"beta1\[0\]"):
        sonew_step([p], [g], [m], [v], [o], [s], lr=0.1, beta1=[1.5])


# ----------------------------------------------------------------------------- aliasing


@pytest.mark.parametrize("case,match", [
    ("shared step", r"steps\[1\] is the same tensor as steps\[0\]"),
    ("param twice", r"params\[1\] is the same tensor as params\[0\]"),
    ("shared diag", r"diags\[1\] is the same tensor as diags\[0\]"),
    ("offdiag over exp_avg", r"offdiags\[0\] overlaps the memory of exp_avgs\[0\]"),
    ("grad over diag", r"grads\[0\] overlaps the memory of diags\[1\] \(diags\[1\] is written by the step\)"),
])
def test_rejects_tensors_sharing_memory(case, match, device):
    """Several programs would read-modify-write one address (lost updates on a GPU): a ValueError names
    both entries, before anything is written."""
    gen = torch.Generator().manual_seed(9)
    tensors = [make_tensors((3, 4), 1, torch.float32, gen, device) for _ in range(2)]
    cols = [list(c) for c in zip(*tensors)]  # params, grads, exp_avgs, diags, offdiags, steps
    if case == "shared step":
        cols[5][1] = cols[5][0]
    elif case == "param twice":
        cols[0][1] = cols[0][0]
    elif case == "shared diag":
        cols[3][1] = cols[3][0]
    elif case == "offdiag over exp_avg":
        cols[4][0] = cols[2][0].view(1, 12)
    elif case == "grad over diag":
        cols[1][0] = cols[3][1][:12].view(3, 4)
    before = [[t.clone() for t in c] for c in cols]
    with pytest.raises(ValueError, match=match):
        sonew_step(*cols, lr=0.1)
    for c, b in zip(cols, before):
        for t, u in zip(c, b):
            assert torch.equal(t, u)


def test_interleaved_params_and_one_shared_gradient_are_accepted(medium_tiles, device):
    """Safe sharing: params that are interleaved columns of one matrix (spans overlap, elements do not;
    updated through contiguous copies) and one read-only gradient passed for both."""
    gen = torch.Generator().manual_seed(10)
    W = torch.randn(5, 12, generator=gen).to(device)
    g = torch.randn(5, 6, generator=gen).to(device)
    tensors = []
    for k in range(2):
        _, _, m, v, o, s = make_tensors((5, 6), 1, torch.float32, gen, device)
        tensors.append([W[:, k::2], g, m, v, o, s])
    _, _, ref = run_both(tensors, lr=0.1, graft="adam")
    for k in range(2):
        assert_rel_close(W[:, k::2], ref[k][0], torch.float32, name=f"param {k}")


# ----------------------------------------------------------------------------- shards with halos


#: two tensors cut into five shards each (offsets into the flattened tensor): uneven, empty, and
#: shorter than the band
SHARDED = (((7, 3), (0, 1, 1, 9, 10, 21)), ((3, 4), (0, 4, 4, 8, 12, 12)))


def shard_call(whole, cuts, k, band, halo_dtype):
    """Shard ``k`` of each tensor (``whole[i]``: [param, grad, exp_avg, diag, offdiag, step]) cut at
    ``cuts[i]``: the local tensors, the halo tables (rows that do not exist are NaN: never read) and the
    existing halo rows per side."""
    tensors, halos, lefts, rights = [], [], [], []
    for (p, g, m, v, o, s), cut in zip(whole, cuts):
        lo, hi = cut[k], cut[k + 1]
        n_all, b = p.numel(), o.shape[0]
        tensors.append([p.reshape(-1)[lo:hi].clone(), g.reshape(-1)[lo:hi].clone(), m.reshape(-1)[lo:hi].clone(),
                        v[lo:hi].clone(), o[:, lo:hi].clone(), s.clone()])
        rows = torch.cat([torch.arange(lo - b, lo), torch.arange(hi, hi + b)]).to(p.device)
        exists = (rows >= 0) & (rows < n_all)
        quantities = torch.stack([g.reshape(-1).to(halo_dtype), m.reshape(-1).to(halo_dtype),
                                  v.to(halo_dtype), *o.to(halo_dtype)])
        halos.append(torch.where(exists, quantities[:, rows.clamp(0, n_all - 1)], float("nan")))
        lefts.append(min(b, lo))
        rights.append(min(b, n_all - hi))
    return tensors, halos, lefts, rights


class _Recorded(Exception):
    """Ends a shard's step at its first collective whose result is not known yet."""


def step_shards(step, whole, band, halo_dtype, **hyper):
    """Every shard stepped on its own with its halo, the collectives simulated: each round steps copies of
    the shards, giving every ``reduce``/``reduce_max`` call whose result is known that result and
    recording what each shard hands to the first unknown one (the step ends there); the reduction over
    the shards (sum, max) of that call is then known. The round without an unknown call is the result:
    each shard's tensors."""
    n_shards = len(SHARDED[0][1]) - 1
    cuts = [c for _, c in SHARDED]
    known = []  # (kind, reduced value) of the calls, in the order each shard makes them

    def run(k, seen):
        tensors, halos, lefts, rights = shard_call(whole, cuts, k, band, halo_dtype)
        calls = [0]

        def reducer(kind):
            def reduce(t):
                i, calls[0] = calls[0], calls[0] + 1
                if i < len(known):
                    assert known[i][0] == kind, "the shards make the same collectives in the same order"
                    t.copy_(known[i][1])
                else:
                    seen.append((kind, t.clone()))
                    raise _Recorded
            return reduce

        try:
            step(*[list(c) for c in zip(*tensors)], halos=halos, halo_left=lefts, halo_right=rights,
                 reduce=reducer("sum"), reduce_max=reducer("max"), **hyper)
        except _Recorded:
            pass
        return tensors

    while True:
        seen = []
        shards = [run(k, seen) for k in range(n_shards)]
        if not seen:
            return shards
        assert len(seen) == n_shards and len({kind for kind, _ in seen}) == 1
        parts = torch.stack([t for _, t in seen])
        known.append((seen[0][0], parts.sum(0) if seen[0][0] == "sum" else parts.amax(0)))


@pytest.mark.parametrize("band,dtype", [(1, torch.float32), (4, torch.float32), (2, torch.bfloat16),
                                        (3, torch.float16)])
def test_shards_with_their_halos_equal_the_whole_tensor(band, dtype, small_tiles, poison_empty, device):
    """A tensor cut into shards (uneven, empty, shorter than the band), each stepped alone with its halo
    and the shards' norms and row maxima reduced: every shard's outputs equal its rows of the float64
    reference on the whole tensor -- the Triton kernel at the dtype's tolerance, the PyTorch reference
    (float64, same halo arguments) to 1e-12. Relative damping and the Adam graft (whole-tensor norms)."""
    gen = torch.Generator().manual_seed(100 + band)
    whole = [make_tensors(shape, band, dtype, gen, device) for shape, _ in SHARDED]
    hyper = dict(lr=0.1, weight_decay=0.05, eps=1e-3, graft="adam", relative_eps=True, beta1=0.8, beta2=0.95)
    truth = [[t.to(F64) if i < 5 else t.clone() for i, t in enumerate(ts)] for ts in whole]
    sonew_step_reference(*[list(c) for c in zip(*truth)], **hyper)
    as_f64 = [[t.to(F64) if i < 5 else t.clone() for i, t in enumerate(ts)] for ts in whole]
    for step, inputs, halo_dtype, tol in ((sonew_step, whole, torch.float32, None),
                                          (sonew_step_reference, as_f64, F64, 1e-12)):
        shards = step_shards(step, inputs, band, halo_dtype, **hyper)
        for i, want in enumerate(truth):  # the shards' rows put together
            for col, name in ((0, "param"), (2, "exp_avg"), (3, "diag"), (4, "offdiag")):
                out = torch.cat([tensors[i][col].reshape(tensors[i][col].shape[0], -1) if col == 4
                                 else tensors[i][col].reshape(-1) for tensors in shards], dim=-1)
                w = want[col] if col == 4 else want[col].reshape(-1)
                assert_rel_close(out, w, dtype if col == 0 else torch.float32, tol=tol,
                                 name=f"{step.__name__} {name}[{i}]")
            assert all(tensors[i][5] == 6.0 for tensors in shards)


def test_halo_arguments_are_checked(device):
    """A halo of another band, or halo rows beyond the halo (or without one), raise before any write."""
    gen = torch.Generator().manual_seed(0)
    p, g, m, v, o, s = make_tensors((3, 4), 2, torch.float32, gen, device)
    halo = torch.zeros(5, 4, device=device)
    with pytest.raises(ValueError, match=r"halos\[0\]: expected shape \(5, 4\) for band 2"):
        sonew_step([p], [g], [m], [v], [o], [s], halos=[torch.zeros(4, 2, device=device)], lr=0.1)
    with pytest.raises(ValueError, match="halo_left: expected an integer in \\[0, 2\\]"):
        sonew_step([p], [g], [m], [v], [o], [s], halos=[halo], halo_left=3, lr=0.1)
    with pytest.raises(ValueError, match="halo_right: expected an integer in \\[0, 0\\] for tensor 0 \\(no halo"):
        sonew_step([p], [g], [m], [v], [o], [s], halo_right=1, lr=0.1)
    assert s == 5.0
