"""The structured-factor kernels (Triton, interpreted on CPU) against dense float64 math written here:
block-diagonal, triangular, Toeplitz, lag sums, diagonal, hierarchical; each dtype, odd sizes, strided
operands, NaN-poisoned outputs, their references, other tile configs, and bad inputs."""

import pytest
import torch
from checks import REL_TOL, assert_rel_close

from kfopt.kernels import block_diagonal, diagonal_scaling, hierarchical_products, toeplitz, triangular
from kfopt.kernels.block_diagonal import (
    block_covariance,
    block_covariance_reference,
    block_diagonal_matmul,
    block_diagonal_matmul_reference,
)
from kfopt.kernels.diagonal_scaling import (
    diagonal_from_inner,
    diagonal_from_inner_reference,
    diagonal_matmul,
    diagonal_matmul_reference,
)
from kfopt.kernels.hierarchical_products import hierarchical_matmul, hierarchical_matmul_reference
from kfopt.kernels.toeplitz import lag_sums, lag_sums_reference, toeplitz_matmul, toeplitz_matmul_reference
from kfopt.kernels.triangular import triangular_matmul, triangular_matmul_reference

DTYPES = [pytest.param(dt, id=str(dt).removeprefix("torch.")) for dt in (torch.float32, torch.bfloat16, torch.float16)]
SIZES = [1, 2, 29, 30, 31, 65, 129]
#: fp32 results of fp32 accumulation (products of 16-bit values are exact in fp32)
TOL = 2e-5
SIDES = [(False, False), (True, False), (False, True), (True, True)]  # (transpose, right)


def randn(*shape, dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


def apply(m, x, transpose, right):
    """op(M) x or x op(M) in float64."""
    op = m.T if transpose else m
    return x.double() @ op if right else op @ x.double()


def operand(d, n, right, dtype, seed, device):
    """x for a product with a d x d matrix; right operands are column-major views (strided)."""
    if right:
        return randn(d, n, dtype=dtype, seed=seed, device=device).T
    return randn(d, n, dtype=dtype, seed=seed, device=device)


# -- dense matrices of the structures, built independently ------------------------------------------------


def toeplitz_dense(c):
    d = c.shape[0]
    return torch.stack([torch.cat([c[:i + 1].flip(0), c.new_zeros(d - i - 1)]) for i in range(d)]).double()


def packed_dense(p, d):
    out = torch.zeros(d, d, dtype=torch.float64)
    k = 0
    for i in range(d):
        out[i, :i + 1] = p[k:k + i + 1].double()
        k += i + 1
    return out


def hierarchical_dense(a, b, c, d, e):
    k1, m, k2 = a.shape[0], c.shape[0], e.shape[0]
    h = torch.zeros(k1 + m + k2, k1 + m + k2, dtype=torch.float64)
    h[:k1, :k1], h[:k1, k1:] = a.double(), b.double()
    h[k1:k1 + m, k1:k1 + m] = torch.diag(c.double())
    h[k1 + m:, k1:k1 + m], h[k1 + m:, k1 + m:] = d.double(), e.double()
    return h


# -- block-diagonal ---------------------------------------------------------------------------------------

BLOCK_CASES = [(1, 1, 1), (3, 2, 29), (2, 30, 31), (1, 65, 2), (5, 29, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nb, b, n", BLOCK_CASES)
def test_block_diagonal_matmul(nb, b, n, dtype, device, poison_empty):
    blocks = randn(nb, b, b, dtype=dtype, device=device)
    m = torch.block_diag(*blocks.double().cpu())
    for i, (transpose, right) in enumerate(SIDES):
        x = operand(nb * b, n, right, dtype, i + 1, device)
        got = block_diagonal_matmul(blocks, x, transpose, right)
        assert got.dtype == torch.float32
        assert_rel_close(got, apply(m, x.cpu(), transpose, right), tol=TOL, name=f"{transpose=}, {right=}")
        batch = randn(*((nb, n, b) if right else (nb, b, n)), dtype=dtype, seed=i + 9, device=device)
        want = torch.stack([apply(blk, xb, transpose, right) for blk, xb in zip(blocks.double().cpu(), batch.cpu())])
        assert_rel_close(block_diagonal_matmul(blocks, batch, transpose, right), want, tol=TOL, name="batch form")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ones_column", [False, True])
@pytest.mark.parametrize("rows, d, block", [(1, 1, 1), (7, 29, 4), (33, 30, 30), (5, 64, 30), (17, 65, 16)])
def test_block_covariance(rows, d, block, ones_column, dtype, device, poison_empty):
    x = (randn(rows, d, dtype=dtype, device=device) + 0.5).to(dtype)
    a = x.double().cpu()
    if ones_column:
        a = torch.cat([a, torch.ones(rows, 1, dtype=torch.float64)], 1)
    side = a.shape[1]
    nbt = -(-side // block)
    want = torch.zeros(nbt, block, block, dtype=torch.float64)
    for i in range(nbt):
        cols = a[:, i * block:(i + 1) * block]
        want[i, :cols.shape[1], :cols.shape[1]] = 0.5 * cols.T @ cols
    got = block_covariance(x, block, ones_column, scale=0.5)
    assert got.dtype == torch.float32 and got.shape == (nbt, block, block)
    assert_rel_close(got, want, tol=TOL)


# -- triangular and Toeplitz ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", SIZES)
def test_triangular_matmul(d, dtype, device, poison_empty):
    packed = randn(d * (d + 1) // 2, dtype=dtype, device=device)
    t = packed_dense(packed.cpu(), d)
    for i, (transpose, right) in enumerate(SIDES):
        x = operand(d, 3, right, dtype, i + 1, device)
        got = triangular_matmul(packed, x, transpose, right)
        assert_rel_close(got, apply(t, x.cpu(), transpose, right), tol=TOL, name=f"{transpose=}, {right=}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", SIZES)
def test_toeplitz_matmul(d, dtype, device, poison_empty):
    c = randn(d, dtype=dtype, device=device)
    lower = toeplitz_dense(c.cpu())
    for i, (transpose, right) in enumerate(SIDES):
        x = operand(d, 3, right, dtype, i + 1, device)
        got = toeplitz_matmul(c, x, transpose, right)
        assert_rel_close(got, apply(lower, x.cpu(), transpose, right), tol=TOL, name=f"{transpose=}, {right=}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, d", [(1, 1), (3, 2), (7, 29), (2, 30), (9, 31), (4, 65), (3, 129), (40, 17)])
def test_lag_sums(rows, d, dtype, device, poison_empty):
    u, v = randn(rows, d, dtype=dtype, device=device), randn(d, rows, dtype=dtype, seed=1, device=device).T
    for got, (p, q) in ((lag_sums(u), (u, u)), (lag_sums(u, v), (u, v))):
        inner = p.double().cpu().T @ q.double().cpu()
        want = torch.stack([torch.diagonal(inner, k).sum() for k in range(d)])
        assert got.dtype == torch.float32 and got.shape == (d,)
        assert_rel_close(got, want, tol=TOL)


# -- diagonal and hierarchical ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", SIZES)
def test_diagonal_kernels(d, dtype, device, poison_empty):
    k = randn(d, dtype=dtype, device=device)
    for right in (False, True):
        x = operand(d, 5, right, dtype, 1, device)
        assert_rel_close(diagonal_matmul(k, x, right), apply(torch.diag(k.double().cpu()), x.cpu(), False, right),
                         tol=TOL)
    for ones_column in (False, True):
        x = randn(13, d - ones_column, dtype=dtype, seed=2, device=device)
        a = x.double().cpu()
        if ones_column:
            a = torch.cat([a, torch.ones(13, 1, dtype=torch.float64)], 1)
        want = 0.5 * torch.diagonal(torch.diag(k.double().cpu()) @ a.T @ a @ torch.diag(k.double().cpu()))
        assert_rel_close(diagonal_from_inner(k, x, ones_column, 0.5), want, tol=TOL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k1, m, k2", [(1, 0, 0), (3, 0, 2), (15, 35, 15), (2, 97, 3), (1, 1, 1), (15, 0, 0)])
def test_hierarchical_matmul(k1, m, k2, dtype, device, poison_empty):
    parts = [randn(*shape, dtype=dtype, seed=i, device=device)
             for i, shape in enumerate([(k1, k1), (k1, m + k2), (m,), (k2, m), (k2, k2)])]
    h = hierarchical_dense(*(p.cpu() for p in parts))
    for i, (transpose, right) in enumerate(SIDES):
        x = operand(k1 + m + k2, 4, right, dtype, i + 7, device)
        got = hierarchical_matmul(*parts, x, transpose, right)
        assert_rel_close(got, apply(h, x.cpu(), transpose, right), tol=TOL, name=f"{transpose=}, {right=}")


# -- outputs in place, in the storage dtype ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_views_in_the_storage_dtype(dtype, device):
    """``out`` may be a strided view in any kernel dtype: the result is rounded once, on store."""
    d, n = 31, 6
    c = randn(d, dtype=dtype, device=device)
    packed = randn(d * (d + 1) // 2, dtype=dtype, seed=1, device=device)
    blocks = randn(1, d, d, dtype=dtype, seed=2, device=device)
    x = randn(d, n, dtype=dtype, seed=3, device=device)
    cases = [(toeplitz_matmul, c, toeplitz_dense(c.cpu())), (triangular_matmul, packed, packed_dense(packed.cpu(), d)),
             (block_diagonal_matmul, blocks, blocks[0].double().cpu())]
    for fn, first, m in cases:
        big = torch.full((n, 2 * d), float("nan"), dtype=dtype, device=device)
        out = big[:, ::2].T  # (d, n), strides (2, 2 d)
        assert fn(first, x, out=out) is out
        assert_rel_close(out, m @ x.double().cpu(), tol=REL_TOL[dtype], name=fn.__name__)
        assert torch.isnan(big[:, 1::2]).all(), f"{fn.__name__} wrote outside out"


# -- references, other configs, errors --------------------------------------------------------------------


def test_references_match_dense_float64_math(monkeypatch):
    monkeypatch.setenv("KFOPT_BACKEND", "torch")
    d, n = 130, 4  # more than one REFERENCE_TILE
    c, x = randn(d, dtype=torch.float64), randn(d, n, dtype=torch.float64, seed=1)
    packed = randn(d * (d + 1) // 2, dtype=torch.float64, seed=2)
    blocks = randn(5, 26, 26, dtype=torch.float64, seed=3)
    u, v = randn(n, d, dtype=torch.float64, seed=4), randn(n, d, dtype=torch.float64, seed=5)
    parts = [randn(*s, dtype=torch.float64, seed=6 + i) for i, s in enumerate([(3, 3), (3, 127), (125,), (2, 125),
                                                                              (2, 2)])]
    inner = u.T @ v
    checks = [
        (toeplitz_matmul_reference(c, x, True), toeplitz_dense(c).T @ x),
        (toeplitz_matmul_reference(c, x.T, right=True), x.T @ toeplitz_dense(c)),
        (triangular_matmul_reference(packed, x, True), packed_dense(packed, d).T @ x),
        (block_diagonal_matmul_reference(blocks, x.T, right=True, transpose=True), x.T @ torch.block_diag(*blocks).T),
        (lag_sums_reference(u, v), torch.stack([torch.diagonal(inner, k).sum() for k in range(d)])),
        (hierarchical_matmul_reference(*parts, x, True), hierarchical_dense(*parts).T @ x),
        (diagonal_matmul_reference(c, x), torch.diag(c) @ x),
        (diagonal_from_inner_reference(c, u[:, 1:], True), torch.diagonal(
            torch.diag(c) @ torch.cat([u[:, 1:], torch.ones(n, 1, dtype=torch.float64)], 1).T
            @ torch.cat([u[:, 1:], torch.ones(n, 1, dtype=torch.float64)], 1) @ torch.diag(c))),
        (block_covariance_reference(u, 26)[1], u[:, 26:52].T @ u[:, 26:52]),
    ]
    for got, want in checks:
        assert got.dtype == torch.float64
        assert_rel_close(got, want, tol=1e-12)


@pytest.mark.parametrize("module, space_name", [
    (block_diagonal, "BLOCK_MATMUL_CONFIGS"), (block_diagonal, "BLOCK_COVARIANCE_CONFIGS"),
    (triangular, "TRIANGULAR_CONFIGS"), (toeplitz, "TOEPLITZ_CONFIGS"), (toeplitz, "LAG_SUM_CONFIGS"),
    (diagonal_scaling, "DIAGONAL_MATMUL_CONFIGS"), (diagonal_scaling, "DIAGONAL_INNER_CONFIGS"),
    (hierarchical_products, "HIERARCHICAL_CONFIGS"),
])
def test_smallest_and_largest_tile_configs(module, space_name, monkeypatch, device):
    """Where nothing is timed the default config runs: run the extreme candidates as the default."""
    space = getattr(module, space_name)
    size = lambda cfg: sum(cfg.params.values())  # noqa: E731
    d, n = 37, 5
    c, x = randn(d, device=device), randn(d, n, seed=1, device=device)
    runs = {
        "BLOCK_MATMUL_CONFIGS": (lambda: block_diagonal_matmul(c[:36].reshape(1, 6, 6), x[:6]),
                                 lambda: c[:36].reshape(6, 6).double().cpu() @ x[:6].double().cpu()),
        "BLOCK_COVARIANCE_CONFIGS": (lambda: block_covariance(x.T, 2, True)[1],
                                     lambda: x.T[:, 2:4].double().cpu().T @ x.T[:, 2:4].double().cpu()),
        "TRIANGULAR_CONFIGS": (lambda: triangular_matmul(randn(d * (d + 1) // 2, device=device), x, True),
                               lambda: packed_dense(randn(d * (d + 1) // 2), d).T @ x.double().cpu()),
        "TOEPLITZ_CONFIGS": (lambda: toeplitz_matmul(c, x), lambda: toeplitz_dense(c.cpu()) @ x.double().cpu()),
        "LAG_SUM_CONFIGS": (lambda: lag_sums(x.T), lambda: torch.stack(
            [torch.diagonal(x.double().cpu() @ x.double().cpu().T, k).sum() for k in range(d)])),
        "DIAGONAL_MATMUL_CONFIGS": (lambda: diagonal_matmul(c, x),
                                    lambda: c.double().cpu()[:, None] * x.double().cpu()),
        "DIAGONAL_INNER_CONFIGS": (lambda: diagonal_from_inner(c, x.T),
                                   lambda: c.double().cpu().square() * x.double().cpu().square().sum(1)),
        "HIERARCHICAL_CONFIGS": (lambda: hierarchical_matmul(*[randn(*s, seed=i, device=device) for i, s in enumerate(
            [(2, 2), (2, 35), (32,), (3, 32), (3, 3)])], x, True),
            lambda: hierarchical_dense(*[randn(*s, seed=i) for i, s in enumerate(
                [(2, 2), (2, 35), (32,), (3, 32), (3, 3)])]).T @ x.double().cpu()),
    }
    got_fn, want_fn = runs[space_name]
    for config in (min(space.configs, key=size), max(space.configs, key=size)):
        monkeypatch.setattr(space, "default", config)
        assert_rel_close(got_fn(), want_fn(), tol=TOL, name=str(config))


def test_bad_inputs_name_the_argument(device):
    x = randn(6, 3, device=device)
    with pytest.raises(TypeError, match="x: expected dtype"):
        toeplitz_matmul(randn(6, device=device), x.double())
    with pytest.raises(ValueError, match="x: expected rows = 5"):
        toeplitz_matmul(randn(5, device=device), x)
    with pytest.raises(ValueError, match="coeffs: expected a tensor with 1 dimensions"):
        toeplitz_matmul(randn(6, 1, device=device), x)
    with pytest.raises(ValueError, match="packed: 7 elements"):
        triangular_matmul(randn(7, device=device), x)
    with pytest.raises(ValueError, match="x: expected columns = 6"):
        triangular_matmul(randn(21, device=device), x, right=True)
    with pytest.raises(ValueError, match="blocks: expected \\(nb, b, b\\)"):
        block_diagonal_matmul(randn(2, 3, 2, device=device), x)
    with pytest.raises(ValueError, match="x: expected a batch of shape"):
        block_diagonal_matmul(randn(2, 3, 3, device=device), randn(3, 3, 3, device=device))
    with pytest.raises(ValueError, match="block: expected an int >= 1"):
        block_covariance(x, 0)
    with pytest.raises(TypeError, match="transpose: expected True or False"):
        block_diagonal_matmul(randn(2, 3, 3, device=device), x, transpose=1)
    with pytest.raises(ValueError, match="v: expected the shape of u"):
        lag_sums(x, x.T)
    with pytest.raises(ValueError, match="diag: expected length 4"):
        diagonal_from_inner(randn(3, device=device), x, ones_column=True)
    with pytest.raises(ValueError, match="d: expected shape"):
        hierarchical_matmul(*[randn(*s, device=device) for s in [(2, 2), (2, 4), (2,), (3, 2), (2, 2)]], x)
    with pytest.raises(ValueError, match="out: expected shape"):
        toeplitz_matmul(randn(6, device=device), x, out=randn(6, 4, device=device))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        diagonal_matmul(randn(6, device=device), [[1.0]])


def test_out_sharing_memory_with_an_input_is_rejected(device):
    """The kernels read their inputs tile by tile while writing ``out``: an ``out`` that shares memory with
    an input would read half-written values (on a GPU in any order), so it is a ValueError naming it."""
    x = randn(6, 6, device=device)
    packed, coeffs, blocks, diag = (randn(*s, device=device) for s in [(21,), (6,), (2, 3, 3), (6,)])
    h = [randn(*s, device=device) for s in [(2, 2), (2, 4), (2,), (2, 2), (2, 2)]]
    products = [lambda out: triangular_matmul(packed, x, out=out),
                lambda out: toeplitz_matmul(coeffs, x, True, True, out),
                lambda out: block_diagonal_matmul(blocks, x, out=out),
                lambda out: diagonal_matmul(diag, x, out=out),
                lambda out: hierarchical_matmul(*h, x, out=out)]
    for product in products:
        for alias in (x, x[:, :], x.T.T):
            with pytest.raises(ValueError, match=r"x (is the same tensor as|overlaps the memory of) out"):
                product(alias)
    x3 = randn(6, 3, device=device)
    with pytest.raises(ValueError, match=r"packed (is the same tensor as|overlaps the memory of) out"):
        triangular_matmul(packed, x3, out=packed[:18].view(6, 3))
    with pytest.raises(ValueError, match=r"blocks (is the same tensor as|overlaps the memory of) out"):
        block_diagonal_matmul(blocks, x3, out=blocks.view(6, 3))
    big = randn(6, 12, device=device)
    with pytest.raises(ValueError, match=r"x (is the same tensor as|overlaps the memory of) out"):  # half of x's columns
        triangular_matmul(packed, big[:, :6], out=big[:, 3:9])
    triangular_matmul(packed, big[:, :6], out=big[:, 6:])  # the other half: allowed
    assert torch.equal(big[:, 6:], triangular_matmul(packed, big[:, :6]))


# -- grid limits ------------------------------------------------------------------------------------------

#: CUDA's grid limits: axis 0 takes up to 2^31 - 1 programs, axes 1 and 2 up to 65535 each
CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)
#: activation rows (batch x sequence): more than 65535 tiles of every candidate tile width (<= 256)
HUGE = 2**25


def _free(*shape):
    """An fp32 CPU tensor of ``shape`` backed by one element (stride 0): launch arguments only."""
    return torch.zeros(1).expand(*shape)


def _sides(fn, d, *first):
    """``fn(*first, x, transpose, right)`` for every (transpose, right), x with HUGE rows (the n of ``op(M) x``)."""
    for transpose, right in SIDES:
        fn(*first, _free(HUGE, d) if right else _free(d, HUGE), transpose, right)


def _block_matmuls():
    blocks = _free(2, 3, 3)
    _sides(block_diagonal_matmul, 6, blocks)
    for transpose, right in SIDES:  # the batched form, then many blocks (their row tiles share axis 0)
        block_diagonal_matmul(blocks, _free(2, HUGE, 3) if right else _free(2, 3, HUGE), transpose, right)
        block_diagonal_matmul(_free(70000, 1, 1), _free(3, 70000) if right else _free(70000, 3), transpose, right)


def _hierarchical_parts():
    return [_free(*s) for s in [(1, 1), (1, 3), (2,), (1, 2), (1, 1)]]


GRID_CASES = {  # space, kernel, a call launching it with every size that grows with the data
    "triangular_matmul": (triangular.TRIANGULAR_CONFIGS, triangular._lower_triangular_kernel,
                          lambda: _sides(triangular_matmul, 3, _free(6))),
    "toeplitz_matmul": (toeplitz.TOEPLITZ_CONFIGS, triangular._lower_triangular_kernel,
                        lambda: _sides(toeplitz_matmul, 3, _free(3))),
    "hierarchical_matmul": (hierarchical_products.HIERARCHICAL_CONFIGS,
                            hierarchical_products._hierarchical_matmul_kernel,
                            lambda: _sides(lambda *a: hierarchical_matmul(*_hierarchical_parts(), *a), 4)),
    "block_diagonal_matmul": (block_diagonal.BLOCK_MATMUL_CONFIGS, block_diagonal._block_matmul_kernel,
                              _block_matmuls),
    "block_covariance": (block_diagonal.BLOCK_COVARIANCE_CONFIGS, block_diagonal._block_covariance_kernel,
                         lambda: [block_covariance(_free(HUGE, 10), 4, True), block_covariance(_free(7, 4100), 4100)]),
    "diagonal_matmul": (diagonal_scaling.DIAGONAL_MATMUL_CONFIGS, diagonal_scaling._diagonal_matmul_kernel,
                        lambda: [diagonal_matmul(_free(3), _free(3, HUGE)),
                                 diagonal_matmul(_free(3), _free(HUGE, 3), right=True)]),
    "diagonal_from_inner": (diagonal_scaling.DIAGONAL_INNER_CONFIGS, diagonal_scaling._diagonal_inner_kernel,
                            lambda: diagonal_from_inner(_free(4), _free(HUGE, 3), True)),
    "lag_sums": (toeplitz.LAG_SUM_CONFIGS, toeplitz._lag_sums_kernel,
                 lambda: [lag_sums(_free(HUGE, 5)), lag_sums(_free(HUGE, 5), _free(HUGE, 5))]),
}


@pytest.mark.parametrize("name", list(GRID_CASES))
def test_grids_stay_within_cuda_limits(name, monkeypatch):
    """With HUGE activation rows (and many or large blocks), every candidate config launches a grid CUDA
    accepts: the interpreter has no limit, a GPU refuses more than 65535 programs on axis 1 or 2. The
    launches are captured, not run (operands are stride-0 views, outputs too)."""
    space, kernel, call = GRID_CASES[name]
    grids = []

    def capture(*args, grid, warmup, **kwargs):
        grids.append(tuple(grid(kwargs) if callable(grid) else grid))

    monkeypatch.setattr(kernel, "run", capture)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *shape, dtype=None, device=None, **_: real_empty(
        1, dtype=dtype, device=device).expand(*(shape[0] if len(shape) == 1 and not isinstance(shape[0], int)
                                                else shape)))
    for config in space.configs:
        monkeypatch.setattr(space, "configs", (config,))  # one candidate: launched as is, nothing timed
        monkeypatch.setattr(space, "default", config)
        grids.clear()
        call()
        assert grids, f"{name}: no launch captured"
        for grid in grids:
            assert 1 <= len(grid) <= 3 and all(isinstance(g, int) and g >= 1 for g in grid), f"{config}: {grid}"
            assert all(g <= limit for g, limit in zip(grid, CUDA_GRID_LIMITS)), \
                f"{name} with {config}: grid {grid} exceeds CUDA's limits {CUDA_GRID_LIMITS}"
