"""Every kernel that writes a tensor (in place or through ``out=``) rejects aliasing, on both paths.

A kernel writes its outputs from many programs at once while other programs still read their inputs
tile by tile: an output that shares memory with an input, or two outputs sharing memory (one ``out``
for two layers, a factor passed twice, the same gradient twice), gives silently wrong results on a GPU
(the sequential interpreter and the references can hide it). Every launcher runs one shared check,
``kfopt.kernels.aliasing.check_no_overlap``, before it dispatches, so the Triton path and the PyTorch
reference reject the same calls with a ``ValueError`` naming both arguments. Disjoint views of one
buffer stay allowed.
"""

from __future__ import annotations

import pytest
import torch

from kfopt.kernels import (
    block_diagonal_matmul,
    diagonal_matmul,
    eigen_precondition,
    hierarchical_matmul,
    kronecker_precondition,
    lamb_step,
    lars_step,
    rank1_inverse_update,
    sonew_step,
    symmetric_covariance,
    toeplitz_matmul,
    triangular_matmul,
)


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    """Both paths: the Triton kernels (interpreted on the CPU) and the PyTorch references."""
    monkeypatch.setenv("KFOPT_BACKEND", request.param)
    return request.param


def randn(*shape, device):
    return torch.randn(*shape, device=device)


def spd(d, device):
    a = torch.randn(d, d, device=device)
    return a @ a.T / d + torch.eye(d, device=device)


def orthogonal(d, device):
    return torch.linalg.qr(torch.randn(d, d)).Q.to(device)


# -- the calls that must raise: (name, call(device), pattern naming both arguments) -------------------


def _covariance_out_is_x(device):
    x = randn(4, 4, device=device)
    symmetric_covariance(x, out=x)


def _covariance_out_overlaps_x(device):
    buf = randn(40, device=device)
    x = buf[:15].view(5, 3)  # ones column: out is (4, 4)
    symmetric_covariance(x, ones_column=True, out=buf[10:26].view(4, 4), decay=0.5)


def _eigen_args(device, layers=2, m=3, n=4):
    grads = [randn(m, n, device=device) for _ in range(layers)]
    qa = [orthogonal(n, device) for _ in range(layers)]
    qg = [orthogonal(m, device) for _ in range(layers)]
    da = [torch.rand(n, device=device) for _ in range(layers)]
    dg = [torch.rand(m, device=device) for _ in range(layers)]
    return grads, qa, da, qg, dg


def _eigen_out_is_qa(device):
    grads, qa, da, qg, dg = _eigen_args(device, layers=1, m=4, n=4)
    eigen_precondition(grads, qa, da, qg, dg, 0.1, out=[qa[0]])


def _eigen_out_is_qg(device):
    grads, qa, da, qg, dg = _eigen_args(device, layers=1, m=4, n=4)
    eigen_precondition(grads, qa, da, qg, dg, 0.1, out=[qg[0].T])


def _eigen_out_overlaps_eigenvalues(device):
    grads, qa, da, qg, dg = _eigen_args(device, layers=1, m=1, n=4)
    eigen_precondition(grads, qa, da, qg, dg, 0.1, out=[da[0].view(1, 4)])


def _eigen_one_out_for_two_layers(device):
    grads, qa, da, qg, dg = _eigen_args(device)
    out = torch.empty(3, 4, device=device)
    eigen_precondition(grads, qa, da, qg, dg, 0.1, out=[out, out])


def _rank1_factor_twice(device):
    f = spd(4, device)
    rank1_inverse_update([f, f], [randn(4, device=device), randn(4, device=device)],
                         torch.ones(2, device=device), decay=0.9)


def _rank1_vector_in_factor(device):
    f = spd(4, device)
    rank1_inverse_update([f], [f[1]], torch.ones(1, device=device), decay=0.9)


def _rank1_counts_over_scales(device):
    f, v = spd(4, device), randn(4, device=device)
    scales = torch.ones(3, device=device)
    counts = scales.view(torch.int32).view(1, 3)
    rank1_inverse_update([f], [v], scales[:1], decay=0.9, counts=counts)


def _kronecker_same_gradient_twice(device):
    g = randn(3, 4, device=device)
    kronecker_precondition([spd(3, device)] * 2, [g, g], [spd(4, device)] * 2)


def _kronecker_bias_in_gradient(device):
    g = randn(3, 4, device=device)
    kronecker_precondition([spd(3, device)], [g], [spd(5, device)], biases=[g[:, 1]])


def _kronecker_factor_is_gradient(device):
    g = spd(4, device)
    kronecker_precondition([g], [g], [spd(4, device)])


def _structured(product):
    def call(device):
        x = randn(6, 6, device=device)
        args = {
            "triangular": lambda: triangular_matmul(randn(21, device=device), x, out=x),
            "toeplitz": lambda: toeplitz_matmul(randn(6, device=device), x, True, True, x.T.T),
            "block_diagonal": lambda: block_diagonal_matmul(randn(2, 3, 3, device=device), x, out=x[:, :]),
            "diagonal": lambda: diagonal_matmul(randn(6, device=device), x, out=x),
            "hierarchical": lambda: hierarchical_matmul(
                *[randn(*s, device=device) for s in [(2, 2), (2, 4), (2,), (2, 2), (2, 2)]], x, out=x),
        }
        args[product]()
    return call


def _lamb_param_twice(device):
    p = randn(5, device=device)
    lamb_step([p, p], [randn(5, device=device)] * 2, [torch.zeros(5, device=device) for _ in range(2)],
              [torch.zeros(5, device=device) for _ in range(2)], [torch.zeros((), device=device) for _ in range(2)],
              lr=0.1)


def _lars_grad_is_buffer(device):
    p, m = randn(5, device=device), torch.zeros(5, device=device)
    lars_step([p], [m], [m], lr=0.1)


def _sonew_shared_step(device):
    s = torch.zeros((), device=device)
    params = [randn(2, 3, device=device) for _ in range(2)]
    sonew_step(params, [randn(2, 3, device=device) for _ in range(2)],
               [torch.zeros(2, 3, device=device) for _ in range(2)], [torch.zeros(6, device=device) for _ in range(2)],
               [torch.zeros(1, 6, device=device) for _ in range(2)], [s, s], lr=0.1)


REJECTED = [
    ("covariance out=x", _covariance_out_is_x, r"x.*out|out.*\bx\b"),
    ("covariance out overlaps x", _covariance_out_overlaps_x, r"x.*out|out.*\bx\b"),
    ("eigen out aliases qa", _eigen_out_is_qa, r"qa\[0\].*out\[0\]|out\[0\].*qa\[0\]"),
    ("eigen out aliases qg", _eigen_out_is_qg, r"qg\[0\].*out\[0\]|out\[0\].*qg\[0\]"),
    ("eigen out aliases da", _eigen_out_overlaps_eigenvalues, r"da\[0\].*out\[0\]|out\[0\].*da\[0\]"),
    ("eigen one out, two layers", _eigen_one_out_for_two_layers, r"out\[1\] is the same tensor as out\[0\]"),
    ("rank1 [F, F]", _rank1_factor_twice, r"factors\[1\] is the same tensor as factors\[0\]"),
    ("rank1 vector in factor", _rank1_vector_in_factor, r"vectors\[0\] overlaps the memory of factors\[0\]"),
    ("rank1 counts over scales", _rank1_counts_over_scales, r"counts.*scales|scales.*counts"),
    ("kronecker same gradient twice", _kronecker_same_gradient_twice,
     r"grads\[1\] is the same tensor as grads\[0\]"),
    ("kronecker bias in gradient", _kronecker_bias_in_gradient, r"biases\[0\] overlaps the memory of grads\[0\]"),
    ("kronecker factor is gradient", _kronecker_factor_is_gradient, r"left\[0\] is the same tensor as grads\[0\]"),
    *[(f"{p} out=x", _structured(p), r"\bx\b.*\bout\b|\bout\b.*\bx\b")
      for p in ("triangular", "toeplitz", "block_diagonal", "diagonal", "hierarchical")],
    ("lamb param twice", _lamb_param_twice, r"params\[1\] is the same tensor as params\[0\]"),
    ("lars grad is buffer", _lars_grad_is_buffer, r"grads\[0\] is the same tensor as momentum_buffers\[0\]"),
    ("sonew shared step", _sonew_shared_step, r"steps\[1\] is the same tensor as steps\[0\]"),
]


@pytest.mark.parametrize("name,call,pattern", REJECTED, ids=[r[0] for r in REJECTED])
def test_aliased_writes_are_rejected(name, call, pattern, backend, device, seed):
    with pytest.raises(ValueError, match=pattern):
        call(device)


# -- disjoint views of one buffer stay allowed, and give the results of separate tensors ------------------


def test_covariance_out_in_the_same_buffer_as_x(backend, device, seed):
    buf = randn(32, device=device)
    x, out = buf[:16].view(4, 4), buf[16:].view(4, 4)
    expected = symmetric_covariance(x.clone())
    symmetric_covariance(x, out=out)
    torch.testing.assert_close(out, expected)


def test_eigen_in_place_and_outs_in_one_buffer(backend, device, seed):
    grads, qa, da, qg, dg = _eigen_args(device)
    expected = eigen_precondition([g.clone() for g in grads], qa, da, qg, dg, 0.1)
    buf = torch.empty(2, 3, 4, device=device)
    eigen_precondition(grads, qa, da, qg, dg, 0.1, out=list(buf.unbind(0)))
    for got, want in zip(buf.unbind(0), expected):
        torch.testing.assert_close(got, want)
    eigen_precondition(grads, qa, da, qg, dg, 0.1, out=grads)  # out=grads: in place
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_rank1_factors_in_one_buffer(backend, device, seed):
    a, b = spd(4, device), spd(4, device)
    vectors = [randn(4, device=device), randn(4, device=device)]
    separate = [a.clone(), b.clone()]
    rank1_inverse_update(separate, vectors, torch.ones(2, device=device), decay=0.9)
    buf = torch.stack([a, b])
    rank1_inverse_update(list(buf.unbind(0)), vectors, torch.ones(2, device=device), decay=0.9)
    torch.testing.assert_close(buf, torch.stack(separate))


def test_kronecker_gradients_in_one_buffer_and_a_shared_factor(backend, device, seed):
    left, right = spd(3, device), spd(5, device)
    flat = randn(2 * (3 * 4 + 3), device=device)
    grads = [flat[:12].view(3, 4), flat[15:27].view(3, 4)]
    biases = [flat[12:15], flat[27:30]]
    expected = [t.clone() for t in (*grads, *biases)]
    kronecker_precondition([left, left], expected[:2], [right, right], biases=expected[2:])
    kronecker_precondition([left, left], grads, [right, right], biases=biases)  # one factor read twice
    for got, want in zip((*grads, *biases), expected):
        torch.testing.assert_close(got, want)


def test_the_check_needs_no_device_sync():
    """Address arithmetic only: works on meta tensors (no data), where any read of values would fail."""
    from kfopt.kernels.aliasing import check_no_overlap

    w = torch.empty(4, 6, device="meta")
    with pytest.raises(ValueError, match=r"x overlaps the memory of out \(out is written by the kernel\)"):
        check_no_overlap([("out", w[:, 2:5])], [("x", w[:, :3])], writer="the kernel")
    check_no_overlap([("out", w[:, 3:])], [("x", w[:, :3])])
