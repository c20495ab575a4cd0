"""kfopt.structures: every operation against the dense float64 computation, projected with an independent
implementation of the projection; kernels interpreted (fp32/bf16/fp16 storage), the PyTorch path in
float64; O(d) memory of the Toeplitz and diagonal factor updates at d = 4096."""

import ctypes
import re

import pytest
import torch
from checks import REL_TOL, assert_rel_close
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kfopt.structures import STRUCTURE_NAMES, StructureSpec, parse_structure

SPECS = ["dense", "diagonal", "block4diagonal", "block30diagonal", "tril", "triu", "triltoeplitz", "triutoeplitz",
         "hierarchical3_2", "hierarchical15_15"]
SIZES = [1, 2, 29, 30, 31, 65, 129]
HALF = [torch.bfloat16, torch.float16]
#: results are fp32 whatever the storage dtype (fp32 accumulation of exact products)
TOL = 2e-5


def project(name: str, m: torch.Tensor) -> torch.Tensor:
    """Dense Proj(M) of a symmetric float64 M (kfopt.structures' docstring, written independently): free
    entries keep M, plus the mirror entry where the mirror is not free; Toeplitz: the mean over each
    pair of diagonals."""
    d = m.shape[0]
    i = torch.arange(d)
    if name == "dense":
        return m.clone()
    if name == "diagonal":
        return torch.diag(torch.diagonal(m))
    block = re.fullmatch(r"block(\d+)diagonal", name)
    if block:
        b = int(block.group(1))
        return torch.where((i[:, None] // b) == (i[None, :] // b), m, 0.0)
    if name in ("tril", "triu"):
        lower = torch.tril(m + m.T, -1) + torch.diag(torch.diagonal(m))
        return lower if name == "tril" else lower.T
    if name in ("triltoeplitz", "triutoeplitz"):
        c = torch.zeros(d, dtype=m.dtype)
        for k in range(d):
            c[k] = (torch.diagonal(m).sum() / d if k == 0
                    else (torch.diagonal(m, -k).sum() + torch.diagonal(m, k).sum()) / (d - k))
        lag = i[:, None] - i[None, :]
        lower = torch.where(lag >= 0, c[lag.clamp(min=0)], 0.0)
        return lower if name == "triltoeplitz" else lower.T
    k1, k2 = (int(g) for g in re.fullmatch(r"hierarchical(\d+)_(\d+)", name).groups())
    if d <= k1:
        k1, mid = d, 0
    else:
        mid = max(d - k1 - k2, 0)
    s = k1 + mid
    out = torch.zeros_like(m)
    out[:k1, :k1] = m[:k1, :k1]
    out[:k1, k1:] = m[:k1, k1:] + m[k1:, :k1].T
    out[k1:s, k1:s] = torch.diag(torch.diagonal(m)[k1:s])
    out[s:, k1:s] = m[s:, k1:s] + m[k1:s, s:].T
    out[s:, s:] = m[s:, s:]
    return out


def random_structure(name, d, dtype=torch.float32, seed=0):
    spec = parse_structure(name)
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape in spec.shapes(d)]
    return spec.from_tensors(d, tensors)


def dense(s):
    return s.to_dense().double()


def size_dtype_cases(sizes=SIZES):
    """Every size in fp32, each 16-bit dtype at one odd size (the kernels' own tests cover the rest)."""
    return [(d, torch.float32) for d in sizes] + [(29, torch.bfloat16), (31, torch.float16)]


# -- the matrix each structure stands for -------------------------------------------------------------


@pytest.mark.parametrize("name", SPECS)
def test_to_dense_has_the_structure_and_from_dense_projects(name):
    """to_dense has zeros exactly where the structure has no free entries (its projection keeps it
    where it is one), and from_dense equals the independent projection."""
    for d in (1, 7, 31, 40):
        s = random_structure(name, d, torch.float64)
        m = dense(s)
        assert m.shape == (d, d)
        if name not in ("triltoeplitz", "triutoeplitz"):  # Toeplitz: free entries are shared per diagonal
            support = project(name, torch.ones(d, d, dtype=torch.float64)) != 0
            assert torch.all(m[~support] == 0)
        sym = torch.randn(d, d, dtype=torch.float64)
        sym = sym + sym.T
        got = parse_structure(name).from_dense(sym).to_dense()
        assert torch.allclose(got, project(name, sym), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", SPECS)
def test_eye_zeros_and_free_parameter_counts(name):
    spec = parse_structure(name)
    for d in (1, 2, 31):
        assert torch.equal(spec.eye(d, torch.float64).to_dense(), torch.eye(d, dtype=torch.float64))
        assert torch.equal(spec.zeros(d, torch.bfloat16).to_dense(), torch.zeros(d, d, dtype=torch.bfloat16))
    d = 31
    params = sum(torch.Size(s).numel() for s in spec.shapes(d))
    expected = {"dense": d * d, "diagonal": d, "block4diagonal": 7 * 16 + 9, "block30diagonal": 900 + 1,
                "tril": d * (d + 1) // 2, "triu": d * (d + 1) // 2, "triltoeplitz": d, "triutoeplitz": d,
                "hierarchical3_2": 9 + 3 * 28 + 26 + 2 * 26 + 4, "hierarchical15_15": 225 + 15 * 16 + 1 + 15 + 225}
    assert params == expected[name]


# -- products -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d, dtype", size_dtype_cases(), ids=str)
@pytest.mark.parametrize("name", SPECS)
def test_matmul_left_right_transposed(name, d, dtype, device, poison_empty):
    s = random_structure(name, d, dtype)
    m = dense(s)
    gen = torch.Generator().manual_seed(1)
    for right in (False, True):
        x = torch.randn((3, d) if right else (d, 3), generator=gen).to(dtype)
        if right:
            x = x.T.contiguous().T  # a column-major view
        for transpose in (False, True):
            op = m.T if transpose else m
            want = x.double() @ op if right else op @ x.double()
            got = s.matmul(x, transpose=transpose, right=right)
            assert got.dtype == torch.float32
            assert_rel_close(got, want, tol=TOL, name=f"matmul(transpose={transpose}, right={right})")


@pytest.mark.parametrize("d, dtype", size_dtype_cases(SIZES[:-1]), ids=str)
@pytest.mark.parametrize("name", SPECS)
def test_compose_is_the_product_and_stays_in_the_structure(name, d, dtype, poison_empty):
    a, b = random_structure(name, d, dtype, seed=2), random_structure(name, d, torch.float32, seed=3)
    got = a.compose(b)
    assert type(got) is type(a) and got.dtype == torch.float32
    assert_rel_close(got.to_dense(), dense(a) @ dense(b), tol=TOL)


# -- projections of inner products ----------------------------------------------------------------------


@pytest.mark.parametrize("d, dtype", size_dtype_cases(SIZES[:-1]), ids=str)
@pytest.mark.parametrize("name", SPECS)
def test_from_inner_is_the_projected_inner_product(name, d, dtype, poison_empty):
    s = random_structure(name, d, dtype)
    m = dense(s)
    gen = torch.Generator().manual_seed(4)
    for ones_column, rows in ((False, 7), (True, 17)):
        x = (torch.randn(rows, d - ones_column, generator=gen) + 0.3).to(dtype)
        a = torch.cat([x.double(), torch.ones(rows, 1, dtype=torch.float64)], 1) if ones_column else x.double()
        got = s.from_inner(x, ones_column=ones_column, scale=0.25)
        assert got.dtype == torch.float32 and type(got) is type(s)
        assert_rel_close(got.to_dense(), project(name, 0.25 * m.T @ a.T @ a @ m), tol=TOL,
                         name=f"from_inner(ones_column={ones_column})")
    got = s.from_inner()
    assert_rel_close(got.to_dense(), project(name, m.T @ m), tol=TOL, name="from_inner()")


@pytest.mark.parametrize("name", ["block4diagonal", "block30diagonal"])
def test_block_diagonal_from_inner_multiplies_by_k_transpose_first(name):
    """docs/singd.md: H_K = Proj(K^T a^T a K) with a non-symmetric block-diagonal K, not singd 0.0.5's
    Proj(K a^T a K^T) (its ``BlockDiagonalMatrixTemplate.rmatmat`` multiplies by K where K^T belongs)."""
    d = 37
    s = random_structure(name, d, torch.float32, seed=11)
    k = dense(s)
    assert not torch.allclose(k, k.T)
    x = torch.randn(9, d, dtype=torch.float64)
    got = s.from_inner(x.float()).to_dense().double()
    assert_rel_close(got, project(name, k.T @ x.T @ x @ k), tol=TOL)
    singd_005 = project(name, k @ x.T @ x @ k.T)
    assert (got - singd_005).norm() > 0.1 * singd_005.norm()


@pytest.mark.parametrize("name", SPECS)
def test_from_inner_of_no_rows_is_zero(name):
    s = random_structure(name, 9)
    got = s.from_inner(torch.zeros(0, 8), ones_column=True)
    assert torch.equal(got.to_dense(), torch.zeros(9, 9))


# -- scalars and in-place updates -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("name", SPECS)
def test_traces_norms_and_in_place_updates(name, dtype):
    for d in (1, 30, 31):
        s, t = random_structure(name, d, dtype, seed=5), random_structure(name, d, torch.float32, seed=6)
        m, n = dense(s), dense(t)
        assert_rel_close(s.trace(), torch.trace(m), tol=TOL)
        assert_rel_close(s.average_trace(), torch.trace(m) / d, tol=TOL)
        assert s.abs_max().item() == max(x.abs().max().item() for x in s.tensors if x.numel())
        clone = s.clone()
        alpha = torch.tensor(-0.75)
        clone.add_(t, alpha).mul_(torch.tensor(2.0)).diag_add_(0.5).add_(t, 0.25)
        want = 2 * (m - 0.75 * n) + 0.5 * torch.eye(d, dtype=torch.float64) + 0.25 * n
        assert clone.dtype == dtype
        assert_rel_close(clone.to_dense(), want, tol=REL_TOL[dtype])
        assert torch.equal(dense(s), m), "clone shares storage with the original"
        copied = parse_structure(name).zeros(d, dtype).copy_(t)
        assert_rel_close(copied.to_dense(), n, tol=REL_TOL[dtype])
        assert s.to(dtype) is s and s.to(torch.float64).dtype == torch.float64


# -- PyTorch path in float64 ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", SPECS)
def test_reference_path_float64_is_exact(name, monkeypatch):
    monkeypatch.setenv("KFOPT_BACKEND", "torch")
    for d in (1, 31, 130):
        s, t = random_structure(name, d, torch.float64, seed=7), random_structure(name, d, torch.float64, seed=8)
        m = dense(s)
        x = torch.randn(11, d - 1, dtype=torch.float64)
        a = torch.cat([x, torch.ones(11, 1, dtype=torch.float64)], 1)
        checks = [
            (s.matmul(a.T, transpose=True), m.T @ a.T),
            (s.matmul(a, right=True), a @ m),
            (s.from_inner(x, ones_column=True, scale=0.5).to_dense(), project(name, 0.5 * m.T @ a.T @ a @ m)),
            (s.from_inner().to_dense(), project(name, m.T @ m)),
            (s.compose(t).to_dense(), m @ dense(t)),
        ]
        for got, want in checks:
            assert got.dtype == torch.float64
            assert_rel_close(got, want, tol=1e-12)


# -- names and errors ---------------------------------------------------------------------------------


def test_parse_structure_names():
    assert parse_structure("block30diagonal") == StructureSpec("block_diagonal", block=30)
    assert parse_structure("block7diagonal").name == "block7diagonal"
    assert parse_structure("hierarchical15_15") == StructureSpec("hierarchical", k1=15, k2=15)
    assert parse_structure("triutoeplitz").upper and not parse_structure("tril").upper
    assert len(STRUCTURE_NAMES) == 8
    for bad in ("block0diagonal", "blockdiagonal", "hierarchical15", "toeplitz", "Dense", 3):
        with pytest.raises(ValueError, match="unknown structure"):
            parse_structure(bad)


def test_from_tensors_checks_shapes():
    spec = parse_structure("block4diagonal")
    with pytest.raises(ValueError, match=r"block4diagonal of side 10"):
        spec.from_tensors(10, [torch.zeros(2, 4, 4), torch.zeros(3, 3)])


# -- memory -----------------------------------------------------------------------------------------------


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(fn) -> int:
    """Peak resident memory above the current one while ``fn`` runs: free heap memory is returned to the
    system first (malloc_trim) and the kernel's high-water mark is reset (clear_refs 5), so every new
    page ``fn`` touches counts."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status("VmRSS")
    fn()
    return _status("VmHWM") - base


def factor_update(spec_name, d, rows=8):
    """One factor update of SINGD (kfopt.singd) on a d x d factor: H from rows, Proj(K^T K), m, K <- K - b K m."""
    k = parse_structure(spec_name).eye(d)
    k.tensors[0].add_(0.01 * torch.randn_like(k.tensors[0]))
    x = torch.randn(rows, d - 1)

    def update():
        h = k.from_inner(x, ones_column=True, scale=1.0 / rows)
        m = h.mul_(0.5).add_(k.from_inner(), 1e-3).diag_add_(-1.0).mul_(0.5)
        k.add_(k.compose(m), -0.01)

    return update


def test_memory_probe_sees_a_dense_intermediate():
    d = 4096
    extra = peak_extra_bytes(lambda: torch.ones(d, d).sum())
    assert extra >= 0.9 * 4 * d * d


@pytest.mark.parametrize("name", ["triltoeplitz", "triutoeplitz", "diagonal"])
def test_factor_update_at_d4096_allocates_o_of_d(name, monkeypatch):
    """Toeplitz and diagonal factor updates need O(d) extra memory (the reference package's Toeplitz
    projection builds a d x d matrix: 64 MiB here). PyTorch path; the kernels allocate only their
    outputs and an O(d) partial-sum buffer (kernels.toeplitz)."""
    monkeypatch.setenv("KFOPT_BACKEND", "torch")
    d = 4096
    update = factor_update(name, d)
    update()  # warm-up: lazily initialised library state is not the update's memory
    extra = peak_extra_bytes(update)
    assert extra < 4 * d * d // 16, f"{name}: {extra / 2**20:.1f} MiB extra for d={d} (d x d fp32 is 64 MiB)"


class LargestTensor(TorchDispatchMode):
    """Records the largest storage of any tensor an aten op returns (factories included) while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("name", ["triltoeplitz", "triutoeplitz", "diagonal"])
def test_factor_update_kernels_allocate_o_of_d(name):
    """The same on the kernels (interpreted; d = 256 to keep the interpreter's time small): no tensor
    the update creates is larger than the rows (8 x d), far from d x d."""
    d = 128
    update = factor_update(name, d)
    with LargestTensor() as probe:
        update()
    assert probe.largest <= 4 * 8 * d, f"{name}: a tensor of {probe.largest} bytes for d={d}"
    with LargestTensor() as probe:
        parse_structure("tril").eye(d).from_inner(torch.randn(8, d))
    assert probe.largest >= 4 * d * d // 2, "the probe misses a triangular factor's own O(d^2) tensors"
