"""kfopt.LAMB and kfopt.LARS as torch optimizers: equations step by step, bad input specific to them
(what every optimizer promises is tested once for all in tests/contracts)."""

import math

import pytest
import torch
from checks import assert_rel_close
from torch import nn

import kfopt


# ------------------------------------------------------------------ independent float64 equations


def lamb_equations(params, grads, state, groups, t, max_grad_norm):
    """One LAMB step in float64 written straight from docs/lamb-lars.md (lists of tensors)."""
    total = math.sqrt(sum(float((g * g).sum()) for g in grads))
    coef = min(1.0, max_grad_norm / total) if max_grad_norm else 1.0
    for i, (w, g) in enumerate(zip(params, grads)):
        hp = groups[i]
        b1, b2 = hp["betas"]
        g = g * coef
        m, v = state[i]
        m.mul_(b1).add_((1 - b1) * g)
        v.mul_(b2).add_((1 - b2) * g * g)
        bc1, bc2 = (1 - b1 ** t, 1 - b2 ** t) if hp.get("bias_correction", True) else (1, 1)
        u = (m / bc1) / ((v / bc2).sqrt() + hp["eps"]) + hp["weight_decay"] * w
        wn, un = float(w.norm()), float(u.norm())
        r = wn / un if wn > 0 and un > 0 else 1.0
        if wn > 0 and un > 0 and hp.get("trust_clip"):
            r = min(max(r, hp["trust_clip"][0]), hp["trust_clip"][1])
        if not (hp["weight_decay"] != 0 or hp.get("always_adapt", False)):
            r = 1.0
        w.sub_(hp["lr"] * r * u)


def lars_equations(params, grads, state, groups, t, max_grad_norm):
    """One LARS step in float64 from docs/lamb-lars.md."""
    total = math.sqrt(sum(float((g * g).sum()) for g in grads))
    coef = min(1.0, max_grad_norm / total) if max_grad_norm else 1.0
    for i, (w, g) in enumerate(zip(params, grads)):
        hp = groups[i]
        d = g * coef + hp["weight_decay"] * w
        wn, dn = float(w.norm()), float(d.norm())
        r = hp["eta"] * wn / dn if wn > 0 and dn > 0 else 1.0
        if wn > 0 and dn > 0 and hp.get("trust_clip"):
            r = min(max(r, hp["trust_clip"][0]), hp["trust_clip"][1])
        if not (hp["weight_decay"] != 0 or hp.get("always_adapt", False)):
            r = 1.0
        (m,) = state[i]
        m.mul_(hp["momentum"]).add_(hp["lr"] * r * d)
        w.sub_(hp["momentum"] * m + hp["lr"] * r * d if hp.get("nesterov") else m)


EQUATIONS = {"lamb": lamb_equations, "lars": lars_equations}
STATE_SIZE = {"lamb": 2, "lars": 1}
DEFAULTS = {
    "lamb": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01),
    "lars": dict(lr=1.0, momentum=0.9, weight_decay=0.0, eta=0.001),
}
OPTIMIZERS = {"lamb": kfopt.LAMB, "lars": kfopt.LARS}

CASES = [
    # (method, groups (overrides per group), optimizer kwargs)
    ("lamb", [dict(lr=0.01, weight_decay=0.01), dict(lr=0.02, weight_decay=0.0)], dict(max_grad_norm=1.0)),
    ("lamb", [dict(lr=0.01, weight_decay=0.0, always_adapt=True), dict(lr=0.005, weight_decay=0.1, betas=(0.8, 0.99))],
     dict(max_grad_norm=None)),
    ("lamb", [dict(lr=0.01, weight_decay=0.05, trust_clip=(0.1, 0.9)), dict(lr=0.01, weight_decay=0.0,
                                                                            bias_correction=False)],
     dict(max_grad_norm=0.05)),
    ("lars", [dict(lr=0.5, weight_decay=1e-3), dict(lr=0.1, weight_decay=0.0)], dict(max_grad_norm=None)),
    ("lars", [dict(lr=0.5, weight_decay=1e-3, nesterov=True, trust_clip=(0.0, 0.002)),
              dict(lr=0.1, weight_decay=0.0, always_adapt=True, eta=0.01)], dict(max_grad_norm=0.1)),
]


@pytest.mark.parametrize("method,group_overrides,opt_kwargs", CASES)
def test_steps_follow_the_equations(method, group_overrides, opt_kwargs, seed):
    shapes = [[(17, 9), (9,)], [(129,), (3, 5, 7)]]
    params = [[torch.randn(s) for s in group] for group in shapes]
    model_params = [[nn.Parameter(p.clone()) for p in group] for group in params]
    opt = OPTIMIZERS[method]([{"params": ps, **ov} for ps, ov in zip(model_params, group_overrides)], **opt_kwargs)
    ref = [p.double() for group in params for p in group]
    hp = [{**DEFAULTS[method], **ov} for ov, group in zip(group_overrides, shapes) for _ in group]
    state = [[torch.zeros_like(p) for _ in range(STATE_SIZE[method])] for p in ref]
    flat = [p for group in model_params for p in group]
    for t in range(1, 6):
        grads = [torch.randn(p.shape) for p in flat]
        for p, g in zip(flat, grads):
            p.grad = g.clone()
        opt.step()
        EQUATIONS[method](ref, [g.double() for g in grads], state, hp, t, opt_kwargs["max_grad_norm"])
        for i, (p, r) in enumerate(zip(flat, ref)):
            assert_rel_close(p.detach(), r, torch.float32, tol=2e-5, name=f"step {t} param {i}")


@pytest.mark.parametrize("nesterov", [True, False])
def test_lars_nesterov_follows_the_equations(nesterov, seed):
    """A configuration where the Nesterov and the heavy-ball updates differ by far more than the tolerance
    (no clipping, trust ratio ~0.02, lr 1: each step moves the weights by a few percent)."""
    shapes = [(17, 9), (129,)]
    params = [torch.randn(s) for s in shapes]
    model_params = [nn.Parameter(p.clone()) for p in params]
    opt = kfopt.LARS(model_params, lr=1.0, momentum=0.9, weight_decay=1e-3, eta=0.02, nesterov=nesterov)
    hp = [dict(DEFAULTS["lars"], lr=1.0, weight_decay=1e-3, eta=0.02, nesterov=nesterov)] * len(shapes)
    ref = {nes: [p.double() for p in params] for nes in (True, False)}
    state = {nes: [[torch.zeros_like(p)] for p in ref[nes]] for nes in (True, False)}
    for t in range(1, 4):
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(model_params, grads):
            p.grad = g.clone()
        opt.step()
        for nes in (True, False):
            lars_equations(ref[nes], [g.double() for g in grads], state[nes], [dict(h, nesterov=nes) for h in hp], t,
                           None)
        for i, (p, r, other) in enumerate(zip(model_params, ref[nesterov], ref[not nesterov])):
            assert_rel_close(p.detach(), r, tol=2e-5, name=f"step {t} param {i}")
            gap = ((r - other).norm() / r.norm()).item()
            assert gap > 100 * 2e-5, f"nesterov={nesterov} is not distinguishable ({gap:.1e})"


@pytest.mark.parametrize("method", ["lamb", "lars"])
def test_reference_backend_matches_triton_backend(method, monkeypatch, seed):
    model = nn.Sequential(nn.Linear(7, 13), nn.LayerNorm(13), nn.Linear(13, 3))
    twin = nn.Sequential(nn.Linear(7, 13), nn.LayerNorm(13), nn.Linear(13, 3))
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(32, 7), torch.randn(32, 3)
    opts = [OPTIMIZERS[method](kfopt.param_groups(m, 0.01), lr=0.01) for m in (model, twin)]
    for step in range(3):
        for backend, m, opt in (("triton", model, opts[0]), ("torch", twin, opts[1])):
            monkeypatch.setenv("KFOPT_BACKEND", backend)
            opt.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert_rel_close(a.detach(), b.detach().double(), torch.float32)


@pytest.mark.parametrize("method", ["lamb", "lars"])
def test_bad_param_group_added_later_is_rejected_without_change(method):
    opt = OPTIMIZERS[method](nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": nn.Linear(2, 2).parameters(), "lr": -0.5})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="max_grad_norm"):
        opt.add_param_group({"params": nn.Linear(2, 2).parameters(), "max_grad_norm": 5.0})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("method", ["lamb", "lars"])
def test_bad_tensors_raise_before_any_state_changes(method):
    with pytest.raises(TypeError, match="params"):
        OPTIMIZERS[method]([torch.zeros(3, dtype=torch.int64)], lr=0.1)
    with pytest.raises(TypeError, match="params"):
        OPTIMIZERS[method]([torch.zeros(3, dtype=torch.complex64)], lr=0.1)

    emb = nn.Embedding(10, 4, sparse=True)
    lin = nn.Linear(4, 1)
    opt = OPTIMIZERS[method](list(lin.parameters()) + list(emb.parameters()), lr=0.1)
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    before = [p.clone() for p in lin.parameters()]
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert len(opt.state) == 0 and all(torch.equal(a, b) for a, b in zip(before, lin.parameters()))

    p64 = nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = OPTIMIZERS[method]([p64], lr=0.1)
    p64.grad = torch.randn(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        opt.step()  # the Triton kernels take fp32/bf16/fp16 (float64 runs on the PyTorch path)
    assert len(opt.state) == 0


def test_param_groups_split():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 8), nn.LayerNorm(8), nn.Conv1d(8, 2, 3),
                          nn.BatchNorm1d(2))
    decay, no_decay = kfopt.param_groups(model, weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[1].weight), id(model[3].weight)}
    assert len(no_decay["params"]) == 6  # linear bias, LN w+b, conv bias, BN w+b


@pytest.mark.parametrize("method", ["lamb", "lars"])
def test_trains_a_small_real_problem(method, monkeypatch, seed):
    """A few hundred steps on a small regression: the loss falls by orders of magnitude."""
    monkeypatch.setenv("KFOPT_BACKEND", "torch")  # kernels are covered above; keep this fast
    x = torch.randn(256, 8)
    y = torch.sin(x @ torch.randn(8, 1))
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    kwargs = {"lamb": dict(lr=0.01), "lars": dict(lr=1.0, eta=0.02, always_adapt=True)}[method]
    opt = OPTIMIZERS[method](kfopt.param_groups(model, 1e-4), **kwargs)
    first = None
    for _ in range(300):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.1 * first
