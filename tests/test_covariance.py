"""symmetric_covariance (Triton, interpreted on CPU) against a float64 reference."""

import math

import pytest
import torch
import triton
import triton.language as tl
from checks import assert_rel_close, check_default_config_untimed, tune_with_fake_timings

from kfopt.kernels.covariance import (
    COVARIANCE_CONFIGS,
    symmetric_covariance,
    symmetric_covariance_reference,
    upper_tile_pair,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# bf16/fp16 products are exact in fp32 and the result is fp32: every input dtype gets the fp32 tolerance
TOL = 1e-5


def activations(rows, d, dtype, device):
    """Random rows with a non-zero mean, so the ones column correlates with the features."""
    return (torch.randn(rows, d, device=device) + 0.5).to(dtype)


def random_factor(side, device, symmetric=True):
    s = torch.randn(side, side, device=device)
    return s + s.T if symmetric else s


def reference(x, ones_column, old=None, decay=None):
    out = None if old is None else old.double().clone()
    return symmetric_covariance_reference(x.double(), ones_column, out=out, decay=decay)


def assert_symmetric(a):
    assert torch.equal(a, a.T), "result is not exactly symmetric (or an element was left unwritten)"


@pytest.mark.parametrize("ones_column", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 17, 33, 65])
@pytest.mark.parametrize("rows", [1, 7, 129])
def test_matches_float64_reference(rows, d, dtype, ones_column, device, seed, poison_empty):
    x = activations(rows, d, dtype, device)
    got = symmetric_covariance(x, ones_column)
    assert got.dtype == torch.float32 and got.shape == (d + ones_column,) * 2
    assert_symmetric(got)
    assert_rel_close(got, reference(x, ones_column), tol=TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_equations_written_here(dtype, device, seed, poison_empty):
    """Against the module docstring's equations in float64, built here (not the library's reference):
    ``a = [x | 1]``, ``new = a^T a / rows``, then ``decay * sym(old) + (1 - decay) * new`` with ``sym``
    the symmetric matrix of old's upper triangle (old's lower triangle holds different values)."""
    rows, d, decay = 19, 40, 0.7
    x = activations(rows, d, dtype, device)
    a = torch.cat([x.double().cpu(), torch.ones(rows, 1, dtype=torch.float64)], dim=1)
    new = sum(torch.outer(row, row) for row in a) / rows
    assert_rel_close(symmetric_covariance(x, True), new, tol=TOL, name="a^T a / rows")
    old = random_factor(d + 1, device, symmetric=False)
    upper = torch.triu(old.double().cpu())
    want = decay * (upper + torch.triu(upper, 1).T) + (1 - decay) * new
    out = old.clone()
    symmetric_covariance(x, True, out=out, decay=decay)
    assert_symmetric(out)
    assert_rel_close(out, want, tol=TOL, name="fused running average")


@pytest.mark.parametrize("rows, d, ones_column", [(33, 64, True), (17, 200, False), (5, 191, True)])
def test_many_tiles(rows, d, ones_column, device, seed, poison_empty):
    """Ones column opening a new tile; 4 x 4 tile grids (10 tile pairs) at the default BLOCK_D=64."""
    x = activations(rows, d, torch.float32, device)
    got = symmetric_covariance(x, ones_column)
    assert_symmetric(got)
    assert_rel_close(got, reference(x, ones_column), tol=TOL)


@triton.jit
def _tile_pair_kernel(pid_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    i, j = upper_tile_pair(tl.load(pid_ptr + offs))
    tl.store(out_ptr + 2 * offs, i)
    tl.store(out_ptr + 2 * offs + 1, j)


def test_tile_pair_decoding_is_exact_for_large_grids(device):
    """Program ids next to triangular numbers up to j = 20000, where fp32 rounds 8 pid + 1."""
    cols = torch.linspace(1, 20000, 340).long()
    triangular = cols * (cols + 1) // 2
    pids = torch.cat([triangular - 1, triangular, triangular + 1, torch.arange(4)])[:1024]
    pids = torch.cat([pids, torch.arange(1024 - len(pids))]).to(device=device, dtype=torch.int32)
    out = torch.empty(1024, 2, dtype=torch.int32, device=device)
    _tile_pair_kernel[(1,)](pids, out, BLOCK=1024)
    for pid, (i, j) in zip(pids.tolist(), out.tolist()):
        true_j = (math.isqrt(8 * pid + 1) - 1) // 2
        assert (i, j) == (pid - true_j * (true_j + 1) // 2, true_j), f"pid {pid}"


def test_out_is_overwritten(device, seed):
    x = activations(33, 17, torch.bfloat16, device)
    out = torch.full((18, 18), math.nan, device=device)
    assert symmetric_covariance(x, True, out=out) is out
    assert_symmetric(out)
    assert_rel_close(out, reference(x, True), tol=TOL)


@pytest.mark.parametrize("decay", [0.0, 0.3, 0.95, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_decay_matches_unfused(decay, dtype, device, seed):
    x = activations(129, 65, dtype, device)
    old = random_factor(66, device)
    out = old.clone()
    assert symmetric_covariance(x, True, out=out, decay=decay) is out
    assert_symmetric(out)
    unfused = decay * old + (1 - decay) * symmetric_covariance(x, True)
    assert_rel_close(out, unfused, tol=TOL, name="fused vs unfused")
    assert_rel_close(out, reference(x, True, old, decay), tol=TOL, name="fused vs float64")
    if decay == 1.0:
        assert torch.equal(out, old)


def test_fused_decay_reads_only_the_upper_triangle(device, seed):
    x = activations(7, 33, torch.float16, device)
    old = random_factor(33, device, symmetric=False)
    out = old.clone()
    symmetric_covariance(x, out=out, decay=0.9)
    assert_symmetric(out)
    sym_old = torch.triu(old) + torch.triu(old, 1).T
    assert_rel_close(out, 0.9 * sym_old + 0.1 * reference(x, False), tol=TOL)


def test_strided_inputs_and_transposed_out(device, seed):
    base = torch.randn(40, 33, device=device) + 0.5
    cases = [
        base.T[::2],                                   # (20, 40): row stride 2, column stride 33
        base[:, 1::2],                                 # (40, 16): column stride 2
        base[:1].expand(9, 33),                        # row stride 0
    ]
    for x in cases:
        side = x.shape[1] + 1
        old = random_factor(side, device)
        out = old.clone().T                            # dense, column-major
        symmetric_covariance(x, True, out=out, decay=0.5)
        assert_symmetric(out)
        assert_rel_close(out, reference(x, True, old, 0.5), tol=TOL, name=f"x strides {x.stride()}")


def test_reference_backend(monkeypatch, device, seed):
    monkeypatch.setenv("KFOPT_BACKEND", "torch")
    x = activations(7, 17, torch.float32, device)
    old = random_factor(18, device)
    out = old.clone()
    symmetric_covariance(x, True, out=out, decay=0.9)
    assert torch.equal(out, symmetric_covariance_reference(x, True, out=old.clone(), decay=0.9))


def bad_calls(device):
    x = torch.randn(7, 5, device=device)
    ok_out = torch.zeros(6, 6, device=device)
    return [
        (TypeError, "x", lambda: symmetric_covariance(x.numpy())),
        (ValueError, "x", lambda: symmetric_covariance(x[0])),
        (TypeError, "x", lambda: symmetric_covariance(x.to(torch.int32))),
        (TypeError, "x", lambda: symmetric_covariance(x.double())),
        (ValueError, "x", lambda: symmetric_covariance(x[:0])),
        (TypeError, "ones_column", lambda: symmetric_covariance(x, "yes")),
        (TypeError, "out", lambda: symmetric_covariance(x, True, out=ok_out.half())),
        (ValueError, "out", lambda: symmetric_covariance(x, False, out=ok_out)),
        (ValueError, "out", lambda: symmetric_covariance(x, True, out=torch.zeros(6, 12, device=device)[:, ::2])),
        (ValueError, "out", lambda: symmetric_covariance(x, True, out=torch.zeros(6, 6, device="meta"))),
        (ValueError, "out", lambda: symmetric_covariance(x, True, decay=0.9)),
        (ValueError, "decay", lambda: symmetric_covariance(x, True, out=ok_out, decay=1.5)),
        (ValueError, "decay", lambda: symmetric_covariance(x, True, out=ok_out, decay=-0.1)),
        (ValueError, "decay", lambda: symmetric_covariance(x, True, out=ok_out, decay=math.nan)),
        (TypeError, "decay", lambda: symmetric_covariance(x, True, out=ok_out, decay=torch.tensor(0.9))),
    ]


def test_bad_inputs(device):
    for error, name, call in bad_calls(device):
        with pytest.raises(error, match=rf"^{name}[: ]"):
            call()


def test_default_config_under_interpreter(monkeypatch, device, seed):
    x = activations(7, 17, torch.float32, device)
    check_default_config_untimed(monkeypatch, COVARIANCE_CONFIGS, lambda: symmetric_covariance(x, True))


def test_autotune_restores_the_fused_out(monkeypatch, tmp_path, device, seed):
    """Tuning runs every candidate on ``out`` in place: ``restore`` must leave exactly one update."""
    x = activations(7, 17, torch.float32, device)
    old = random_factor(18, device)
    out = old.clone()
    tune_with_fake_timings(monkeypatch, tmp_path, COVARIANCE_CONFIGS,
                           lambda: symmetric_covariance(x, True, out=out, decay=0.9))
    assert_symmetric(out)
    assert_rel_close(out, reference(x, True, old, 0.9), tol=TOL, name="out after tuning")
