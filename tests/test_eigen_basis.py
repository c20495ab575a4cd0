"""eigen_precondition (grouped Triton GEMMs, interpreted on CPU) against the float64 unfused sequence."""

import math

import pytest
import torch
from checks import assert_rel_close, check_default_config_untimed, tune_with_fake_timings

from kfopt.kernels import eigen_basis as eigen_module
from kfopt.kernels.eigen_basis import EIGEN_CONFIGS, eigen_precondition, eigen_precondition_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def eigen_data(n, dtype, device):
    """Eigenvectors (dtype) and clamped fp32 eigenvalues of a random K-FAC-like factor."""
    a = torch.randn(2 * n + 3, n, dtype=torch.float64) + 0.3
    d, q = torch.linalg.eigh(a.T @ a / a.shape[0])
    return q.to(device=device, dtype=dtype), d.clamp_min(0).to(device=device, dtype=torch.float32)


def make_layers(specs, device):
    """specs: (m, n, grad dtype, eigenvector dtype) per layer -> (grads, qa, da, qg, dg)."""
    grads, qa, da, qg, dg = [], [], [], [], []
    for m, n, v_dtype, q_dtype in specs:
        grads.append(torch.randn(m, n, device=device).to(v_dtype))
        q, d = eigen_data(n, q_dtype, device)
        qa.append(q)
        da.append(d)
        q, d = eigen_data(m, q_dtype, device)
        qg.append(q)
        dg.append(d)
    return grads, qa, da, qg, dg


def reference(layers, damping):
    return eigen_precondition_reference(*([t.double() for t in seq] for seq in layers), damping)


def check(got, ref, dtypes):
    for i, (p, r, dtype) in enumerate(zip(got, ref, dtypes)):
        assert p.dtype == dtype, f"layer {i}: dtype {p.dtype}, expected {dtype}"
        assert_rel_close(p, r, dtype, name=f"layer {i} {tuple(p.shape)}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n", [(1, 1), (7, 17), (17, 33), (65, 17), (33, 65)])
def test_one_layer_matches_float64(m, n, dtype, device, seed, poison_empty):
    layers = make_layers([(m, n, dtype, dtype)], device)
    check(eigen_precondition(*layers, 1e-3), reference(layers, 1e-3), [dtype])


def test_mixed_layers_in_one_call(device, seed, poison_empty):
    specs = [(17, 33, torch.float32, torch.float32), (1, 7, torch.bfloat16, torch.float32),
             (65, 18, torch.float16, torch.float16), (33, 33, torch.bfloat16, torch.bfloat16),
             (129, 9, torch.float32, torch.float32), (7, 1, torch.bfloat16, torch.float32)]
    layers = make_layers(specs, device)
    damping = [1e-3, 1e-2, 0.1, 1e-3, 3e-3, 0.5]
    check(eigen_precondition(*layers, damping), reference(layers, damping), [s[2] for s in specs])


def test_same_dtype_layers_share_one_launch_per_stage(monkeypatch, device, seed, poison_empty):
    launches = []
    real_launch = eigen_module._launch
    monkeypatch.setattr(eigen_module, "_launch", lambda *a: launches.append(a[2]) or real_launch(*a))
    specs = [(m, n, torch.float32, torch.float32) for m, n in [(17, 33), (1, 7), (65, 18), (33, 33)]]
    layers = make_layers(specs, device)
    check(eigen_precondition(*layers, 1e-3), reference(layers, 1e-3), [torch.float32] * 4)
    assert [launch.n_rows for launch in launches] == [4, 4, 4, 4]
    assert [launch.divide for launch in launches] == [False, True, False, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_equation_written_here(dtype, device, seed, poison_empty):
    """Against the module docstring's ``P = QG [(QG^T V QA) / (dG dA^T + damping)] QA^T`` in float64,
    written here (not the library's reference), for two layers in one call with their own dampings;
    and the meaning of P: it solves the damped Kronecker system ``G P A + damping P = V`` for
    ``A = QA diag(dA) QA^T``, ``G = QG diag(dG) QG^T``."""
    specs = [(7, 17, dtype, dtype), (13, 5, dtype, torch.float32)]
    layers = make_layers(specs, device)
    dampings = [0.1, 0.03]
    got = eigen_precondition(*layers, dampings)
    for i, (v, qa, da, qg, dg) in enumerate(zip(*layers)):
        v, qa, da, qg, dg = (t.double().cpu() for t in (v, qa, da, qg, dg))
        scaled = (qg.T @ v @ qa) / (dg[:, None] * da[None, :] + dampings[i])
        want = qg @ scaled @ qa.T
        assert got[i].dtype == dtype
        assert_rel_close(got[i], want, dtype, name=f"layer {i}")
        if specs[i][3] == torch.float32:  # eigenvectors orthogonal to fp32 accuracy
            g, a = qg @ torch.diag(dg) @ qg.T, qa @ torch.diag(da) @ qa.T
            assert_rel_close(g @ want @ a + dampings[i] * want, v, tol=1e-5, name=f"layer {i}: G P A + damping P")


def test_damping(device, seed):
    layers = make_layers([(17, 33, torch.float32, torch.float32), (7, 9, torch.float32, torch.float32)], device)
    # a scalar damping and one per layer give the same result
    for p, q in zip(eigen_precondition(*layers, 0.01), eigen_precondition(*layers, [0.01, 0.01])):
        assert torch.equal(p, q)
    # damping dominating the eigenvalues: P ~= V / damping (orthogonal Q), independently of the reference
    for p, v in zip(eigen_precondition(*layers, 1e6), layers[0]):
        assert_rel_close(p * 1e6, v, tol=1e-5)
    # damping 0 with positive eigenvalues is the exact inverse: P = G^-1 V A^-1
    grads, qa, da, qg, dg = layers
    da = [d + 0.1 for d in da]
    dg = [d + 0.1 for d in dg]
    for p, v, q_a, d_a, q_g, d_g in zip(eigen_precondition(grads, qa, da, qg, dg, 0.0), grads, qa, da, qg, dg):
        a, g = (q_a.double() * d_a.double()) @ q_a.double().T, (q_g.double() * d_g.double()) @ q_g.double().T
        assert_rel_close(p, torch.linalg.solve(g, v.double()) @ torch.linalg.inv(a), tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place(dtype, device, seed):
    layers = make_layers([(17, 33, dtype, torch.float32), (33, 7, dtype, dtype)], device)
    ref = reference(layers, 1e-2)
    grads = layers[0]
    got = eigen_precondition(*layers, 1e-2, out=grads)
    assert all(p is g for p, g in zip(got, grads))
    check(got, ref, [dtype, dtype])


def test_out_given_poisoned_with_another_dtype(device, seed):
    layers = make_layers([(17, 33, torch.bfloat16, torch.float32), (1, 65, torch.float16, torch.float16)], device)
    out = [torch.full(v.shape, math.nan, device=device) for v in layers[0]]
    got = eigen_precondition(*layers, 1e-3, out=out)
    assert all(p is o for p, o in zip(got, out))
    check(got, reference(layers, 1e-3), [torch.float32, torch.float32])


def test_strided_inputs(device, seed):
    grads, qa, da, qg, dg = make_layers([(17, 33, torch.float32, torch.float32),
                                         (9, 20, torch.float32, torch.float32)], device)
    strided = [
        torch.randn(33, 17, device=device).T,                   # transposed
        torch.randn(9, 40, device=device)[:, ::2],              # column stride 2
    ]
    qa = [q.T.contiguous().T for q in qa]                       # column-major eigenvectors
    da = [torch.stack([d, d], dim=1)[:, 0] for d in da]         # stride 2 eigenvalues
    qg = [torch.empty(len(q), len(q) + 3, device=device)[:, 1:-2].copy_(q) for q in qg]  # row stride m + 3
    dg = [torch.stack([d, d, d], dim=1)[:, 1] for d in dg]      # stride 3 and an offset
    layers = (strided, qa, da, qg, dg)
    check(eigen_precondition(*layers, 1e-3), reference(layers, 1e-3), [torch.float32] * 2)


def test_no_layers():
    assert eigen_precondition([], [], [], [], [], 1e-3) == []


def test_reference_backend(monkeypatch, device, seed):
    monkeypatch.setenv("KFOPT_BACKEND", "torch")
    layers = make_layers([(7, 17, torch.float32, torch.float32)], device)
    (got,) = eigen_precondition(*layers, 1e-3)
    (ref,) = eigen_precondition_reference(*layers, 1e-3)
    assert torch.equal(got, ref)


def bad_calls(device):
    grads, qa, da, qg, dg = make_layers([(5, 3, torch.float32, torch.float32)], device)

    def call(**change):
        args = dict(grads=grads, qa=qa, da=da, qg=qg, dg=dg, damping=1e-3)
        args.update(change)
        out = args.pop("out", None)
        return lambda: eigen_precondition(**args, out=out)

    return [
        (ValueError, "qa", call(qa=qa * 2)),
        (ValueError, "out", call(out=[])),
        (TypeError, r"grads\[0\]", call(grads=[grads[0].numpy()])),
        (ValueError, r"grads\[0\]", call(grads=[grads[0][0]])),
        (ValueError, r"grads\[0\]", call(grads=[grads[0][:0]])),
        (TypeError, r"grads\[0\]", call(grads=[grads[0].to(torch.int32)])),
        (TypeError, r"grads\[0\]", call(grads=[grads[0].double()])),
        (ValueError, r"qa\[0\]", call(qa=qg)),
        (ValueError, r"dg\[0\]", call(dg=da)),
        (TypeError, r"da\[0\]", call(da=[da[0].half()])),
        (TypeError, r"qg\[0\]", call(qg=[qg[0].double()])),
        (ValueError, r"qa\[0\]", call(qa=[qa[0].to("meta")])),
        (ValueError, r"damping\[0\]", call(damping=-1.0)),
        (ValueError, r"damping\[0\]", call(damping=math.inf)),
        (TypeError, r"damping\[0\]", call(damping=torch.tensor(1e-3))),
        (ValueError, "damping", call(damping=[1e-3, 1e-3])),
        (ValueError, r"out\[0\]", call(out=[torch.zeros(3, 5, device=device)])),
        (ValueError, r"out\[0\]", call(out=[torch.zeros(5, 6, device=device)[:, ::2]])),
        (TypeError, r"out\[0\]", call(out=[torch.zeros(5, 3, device=device, dtype=torch.float64)])),
    ]


def test_bad_inputs(device, seed):
    for error, name, call in bad_calls(device):
        with pytest.raises(error, match=rf"^{name}[: ]"):
            call()


def test_default_config_under_interpreter(monkeypatch, device, seed):
    layers = make_layers([(7, 17, torch.float32, torch.float32)], device)
    check_default_config_untimed(monkeypatch, EIGEN_CONFIGS, lambda: eigen_precondition(*layers, 1e-3))


def test_autotune_restores_in_place_grads(monkeypatch, tmp_path, device, seed):
    """Tuning runs every candidate with out=grads: ``restore`` must leave exactly one preconditioning."""
    layers = make_layers([(7, 17, torch.float32, torch.float32), (17, 5, torch.float32, torch.float32)], device)
    ref = reference(layers, 1e-2)
    tune_with_fake_timings(monkeypatch, tmp_path, EIGEN_CONFIGS,
                           lambda: eigen_precondition(*layers, 1e-2, out=layers[0]))
    check(layers[0], ref, [torch.float32] * 2)

