"""Contract 6: mixed precision without traps, for every optimizer of the registry.

* fp16 parameters under ``torch.amp.GradScaler`` (``scaler.step(opt)``) train like the fp32 run from the
  same start: every kfopt optimizer takes the scaler's ``grad_scale``/``found_inf``
  (``_step_supports_amp_scaling``) instead of having torch unscale fp16 gradients (which torch refuses).
* A step whose gradients overflowed changes no parameter, counts in ``skipped_steps``, and the scaler
  backs off.
* A Kronecker-factored optimizer built without ``grad_scaler=`` but stepped by a GradScaler either
  trains correctly (SINGD: statistics stay finite however large the scale grows) or raises a clear
  error at the first step naming ``grad_scaler=`` (K-FAC, MKOR).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kfopt.registry import REGISTRY

ENTRIES = list(REGISTRY.values())
IDS = [e.name for e in ENTRIES]


def tiny_model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)


def loss_of(model, dtype):
    x, y = batch()
    return (model(x.to(dtype)).float() - y).square().mean()


def build(entry, model, scaler=None, **overrides):
    kwargs = {"grad_scaler": scaler} if scaler is not None and entry.takes_model else {}
    return entry.build(model, **kwargs, **overrides)


def params_of(model):
    return [p.detach().float().clone() for p in model.parameters()]


def train(entry, dtype, steps, scaler=None):
    model = tiny_model(torch.float16)  # the same (fp16-representable) start for both dtypes
    model = model.to(dtype)
    start = params_of(model)
    opt = build(entry, model, scaler)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(model, dtype)
        losses.append(loss.item())
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return model, opt, start, losses


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_fp16_parameters_under_a_grad_scaler_train_like_fp32(entry):
    steps = 3
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    half, opt, start, losses16 = train(entry, torch.float16, steps, scaler)
    full, _, _, losses32 = train(entry, torch.float32, steps)
    assert opt.skipped_steps.item() == 0 and scaler.get_scale() == 2.0 ** 12
    assert all(p.dtype == torch.float16 for p in half.parameters())
    moved16 = torch.cat([(p - s).flatten() for p, s in zip(params_of(half), start)])
    moved32 = torch.cat([(p - s).flatten() for p, s in zip(params_of(full), start)])
    assert moved32.norm() > 0
    assert (moved16 - moved32).norm() <= 0.05 * moved32.norm() + 2e-3, (moved16 - moved32).norm() / moved32.norm()
    for a, b in zip(losses16, losses32):
        assert math.isclose(a, b, rel_tol=2e-2, abs_tol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_an_overflowed_step_is_skipped_and_the_scaler_backs_off(entry, dtype):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    model = tiny_model(dtype)
    opt = build(entry, model, scaler)
    for step in range(3):
        opt.zero_grad()
        scaler.scale(loss_of(model, dtype)).backward()
        if step == 1:
            next(model.parameters()).grad[0, 0] = float("inf")  # what an fp16 overflow leaves behind
            before = params_of(model)
        scaler.step(opt)
        scaler.update()
        if step == 1:
            assert all(torch.equal(p, q) for p, q in zip(params_of(model), before))
            assert opt.skipped_steps.item() == 1
            assert scaler.get_scale() == 2.0 ** 9
    assert opt.skipped_steps.item() == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


KRONECKER = [e for e in ENTRIES if e.takes_model]


@pytest.mark.parametrize("entry", KRONECKER, ids=[e.name for e in KRONECKER])
def test_without_grad_scaler_argument_train_correctly_or_raise_at_the_first_step(entry):
    """A scale that keeps growing (as it does while gradients stay finite): past 2^64 its square
    overflows fp32, which stalled SINGD (every step skipped, the scaler never backing off)."""

    stepped = []

    def run(with_argument: bool):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40, growth_factor=2.0 ** 8, growth_interval=1)
        model = tiny_model(torch.float32)
        every_step = {name: 1 for name in entry.intervals}  # statistics at every step
        opt = build(entry, model, scaler if with_argument else None, **every_step)
        for _ in range(5):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_of(model, torch.float32)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            stepped.append(with_argument)
        assert scaler.get_scale() == 2.0 ** 80
        return model, opt

    try:
        model, opt = run(with_argument=False)
    except RuntimeError as error:  # the other way to keep the promise: a clear error at the first step
        assert "grad_scaler=" in str(error) and not stepped
        return
    reference, _ = run(with_argument=True)
    assert opt.skipped_steps.item() == 0
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
