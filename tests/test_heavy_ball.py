"""kfopt.heavy_ball.HeavyBall (SINGD's default base) against its equations written here, alone and with a
caller's verdict."""

import io

import pytest
import torch

from kfopt.heavy_ball import HeavyBall


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    """float64 runs on the PyTorch path (the update has no kernel of its own)."""
    monkeypatch.setenv("KFOPT_BACKEND", "torch")


def params_and_grads(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(3, 4, generator=gen).to(dtype).requires_grad_(), torch.randn(5, generator=gen).to(dtype)
              .requires_grad_()]
    grads = [[torch.randn(p.shape, generator=gen).to(dtype) for p in params] for _ in range(3)]
    return params, grads


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_three_steps_follow_the_equations(momentum, tensor_lr):
    """``d = g + wd w; buf = momentum buf + d (none while momentum = 0); w -= lr (buf or d)`` in float64."""
    params, grads = params_and_grads()
    lr, wd = 0.1, 0.01
    opt = HeavyBall(params, lr=torch.tensor(lr, dtype=torch.float64) if tensor_lr else lr, momentum=momentum,
                    weight_decay=wd)
    w = [p.detach().clone() for p in params]
    buf = [torch.zeros_like(p) for p in w]
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(step_grads):
            d = g + wd * w[i]
            buf[i] = momentum * buf[i] + d
            w[i] = w[i] - lr * (buf[i] if momentum else d)
        for p, want in zip(params, w):
            torch.testing.assert_close(p.detach(), want, rtol=1e-14, atol=1e-14)
    assert all(("momentum_buffer" in opt.state[p]) == (momentum != 0) for p in params)
    assert int(opt.skipped_steps) == 0


def test_bf16_parameters_are_updated_in_fp32_with_fp32_buffers():
    params, grads = params_and_grads(torch.bfloat16)
    opt = HeavyBall(params, lr=0.1, momentum=0.9, weight_decay=0.01)
    for p, g in zip(params, grads[0]):
        p.grad = g
    w = [p.detach().float() for p in params]
    opt.step()
    for p, g, w0 in zip(params, grads[0], w):
        d = g.float() + 0.01 * w0
        assert opt.state[p]["momentum_buffer"].dtype == torch.float32
        assert torch.equal(opt.state[p]["momentum_buffer"], d)
        assert torch.equal(p.detach(), (w0 - 0.1 * d).to(torch.bfloat16))


@pytest.mark.parametrize("bad", ["nan-grad", "inf-grad", "nan-lr", "negative-lr"])
def test_a_non_finite_gradient_or_bad_tensor_lr_skips_the_step_and_counts_it(bad):
    params, grads = params_and_grads()
    opt = HeavyBall(params, lr=torch.tensor(0.1, dtype=torch.float64), momentum=0.9, weight_decay=0.01)
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    opt.step()
    before = [p.detach().clone() for p in params] + [opt.state[p]["momentum_buffer"].clone() for p in params]
    for p, g in zip(params, grads[1]):
        p.grad = g.clone()
    if bad.endswith("grad"):
        params[1].grad[2] = float("nan") if bad == "nan-grad" else float("inf")
    else:
        opt.param_groups[0]["lr"] = torch.tensor(float("nan") if bad == "nan-lr" else -0.1, dtype=torch.float64)
    opt.step()
    after = [p.detach() for p in params] + [opt.state[p]["momentum_buffer"] for p in params]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert int(opt.skipped_steps) == 1


def test_a_callers_false_verdict_changes_nothing_and_is_not_counted_here():
    """``step(verdict=...)`` (kfopt.composed): where False nothing changes, not even a buffer created in the
    step (zeros), and the caller, not this optimizer, counts the skip; ``directions`` replace the gradients."""
    params, grads = params_and_grads()
    opt = HeavyBall(params, lr=0.1, momentum=0.9)
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    before = [p.detach().clone() for p in params]
    opt.step(verdict=torch.tensor(False))
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and int(opt.skipped_steps) == 0
    assert all(torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in params)
    directions = {id(params[0]): grads[1][0]}
    opt.step(verdict=torch.tensor(True), directions=directions)
    torch.testing.assert_close(params[0].detach(), before[0] - 0.1 * grads[1][0], rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(params[1].detach(), before[1] - 0.1 * grads[0][1], rtol=1e-14, atol=1e-14)


def test_checkpoint_round_trip_continues_bit_identically():
    params, grads = params_and_grads(torch.float32)
    twin = [p.detach().clone().requires_grad_() for p in params]
    opt, other = HeavyBall(params, lr=0.1, momentum=0.9), HeavyBall(twin, lr=0.5)
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    opt.step()
    for t, p in zip(twin, params):
        t.data.copy_(p.detach())
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    for step_grads in grads[1:]:
        for ps in (params, twin):
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
        opt.step()
        other.step()
        assert all(torch.equal(p, t) for p, t in zip(params, twin))


@pytest.mark.parametrize(("kwargs", "name"), [({"lr": -1.0}, "lr"), ({"momentum": -0.1}, "momentum"),
                                              ({"weight_decay": -1.0}, "weight_decay")])
def test_bad_hyperparameters_raise_value_error_naming_them(kwargs, name):
    params, _ = params_and_grads()
    with pytest.raises(ValueError, match=name):
        HeavyBall(params, **kwargs)
