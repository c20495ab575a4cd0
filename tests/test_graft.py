"""Grafting in K-FAC, MKOR and SINGD (``kfopt.graft``) against the equations written here: the grafted step
of an optimizer equals the AdamW step length along the same optimizer's preconditioned gradient, taken
from a twin without grafting (float64, PyTorch path)."""

import pytest
import torch
from torch import nn

import kfopt


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("KFOPT_BACKEND", "torch")


class Net(nn.Module):
    """Two preconditioned Linear layers and a LayerNorm (first-order parameters)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.norm, self.fc2 = nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


#: per method: (build with grafting, build of the plain twin whose step with lr=1 is w - P)
METHODS = {
    "kfac": (lambda m, **kw: kfopt.KFAC(m, momentum=0.0, kl_clip=None, inv_update_steps=1, **kw),
             lambda m: kfopt.KFAC(m, lr=1.0, momentum=0.0, kl_clip=None, inv_update_steps=1)),
    "mkor": (lambda m, **kw: kfopt.MKOR(m, inv_freq=1, **kw),
             lambda m: kfopt.MKOR(m, lr=1.0, inv_freq=1, base="sgd", weight_decay=0.0)),
    "singd": (lambda m, **kw: kfopt.SINGD(m, momentum=0.0, T=1, **kw),
              lambda m: kfopt.SINGD(m, lr=1.0, momentum=0.0, T=1)),
}


def one_step(model, opt, x, y):
    opt.zero_grad()
    (model(x) - y).square().mean().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    opt.step()
    return grads


@pytest.mark.parametrize("method", list(METHODS))
def test_first_grafted_step_follows_the_equations(method, torch_backend):
    """``w <- w - lr ((||a|| / ||P||) P + wd w)`` for preconditioned weights and biases (``P`` from the twin),
    ``w <- w - lr (a + wd w)`` for the LayerNorm; at step 1 ``a = g / (|g| + eps)``."""
    build, build_plain = METHODS[method]
    lr, wd, eps = 0.05, 0.1, 1e-8
    grafted, plain = Net().double(), Net().double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    before = {name: p.detach().clone() for name, p in grafted.named_parameters()}
    opt = build(grafted, lr=lr, weight_decay=wd, graft="adam", graft_eps=eps)
    twin = build_plain(plain)
    grads = one_step(grafted, opt, x, y)
    one_step(plain, twin, x, y)
    assert {group["weight_decay"] for group in opt.param_groups} >= {wd}
    decay = {id(p): group["weight_decay"] for group in opt.param_groups for p in group["params"]}
    for (name, p), q in zip(grafted.named_parameters(), plain.parameters()):
        w, g = before[name], grads[name]
        a = g / (g.abs() + eps)
        if name.startswith("norm"):
            d = a
        else:
            direction = w - q.detach()  # the twin's step with lr 1: P
            d = a.norm() / direction.norm() * direction
        want = w - lr * (d + decay[id(p)] * w)
        err = ((p.detach() - want).norm() / (want - w).norm()).item()
        assert err < 1e-8, f"{method} {name}: relative error {err:.2e} of the step"
    state = opt.state[grafted.fc1.weight]
    assert state["graft_exp_avg"].dtype == torch.float32 and state["graft_step"].item() == 1.0


def test_momentum_acts_on_the_preconditioned_direction(torch_backend):
    """K-FAC with momentum mu: the buffer is ``mu buf + P`` and the step takes its direction."""
    model = Net()
    opt = kfopt.KFAC(model, lr=0.01, momentum=0.5, kl_clip=None, graft="adam")
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    one_step(model, opt, x, y)
    first = opt.state[model.fc1.weight]["graft_momentum_buffer"].clone()
    assert first.abs().sum() > 0
    assert "graft_momentum_buffer" not in opt.state[model.norm.weight]  # first-order: AdamW, no buffer
    one_step(model, opt, x, y)
    second = opt.state[model.fc1.weight]["graft_momentum_buffer"]
    assert not torch.allclose(second, 0.5 * first)  # a new P was added


@pytest.mark.parametrize("build", [lambda m: kfopt.KFAC(m, graft="adam", lr=1e-3),
                                   lambda m: kfopt.SINGD(m, graft="adam")], ids=["kfac", "singd"])
def test_graft_is_global_and_checked(build):
    """``graft`` is one value for every group: a group changing it, or a bad value, raises naming it."""
    model = Net()
    with pytest.raises(ValueError, match="graft"):
        kfopt.KFAC(model, graft="lion")
    opt = build(Net())
    opt.param_groups[0]["graft"] = "none"
    with pytest.raises(ValueError, match="graft is global"):
        opt.step()
    opt.param_groups[0]["graft"] = "adam"
    opt.param_groups[0]["graft_betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match="graft_betas"):
        opt.step()


#: per method: (build with grafting, build of the plain twin whose step with lr=1 is w - P), the
#: preconditioner refreshed at step 0 only within the three steps of the test
FIXED = {
    "kfac": (lambda m, **kw: kfopt.KFAC(m, momentum=0.0, kl_clip=None, inv_update_steps=10, **kw),
             lambda m: kfopt.KFAC(m, lr=1.0, momentum=0.0, kl_clip=None, inv_update_steps=10)),
    "mkor": (lambda m, **kw: kfopt.MKOR(m, inv_freq=10, **kw),
             lambda m: kfopt.MKOR(m, lr=1.0, inv_freq=10, base="sgd", weight_decay=0.0)),
    "singd": (lambda m, **kw: kfopt.SINGD(m, momentum=0.0, T=10, **kw),
              lambda m: kfopt.SINGD(m, lr=1.0, momentum=0.0, T=10)),
}


@pytest.mark.parametrize("graft", ["adam", "rmsprop"])
@pytest.mark.parametrize("method", list(FIXED))
def test_adam_grafting_preconditions_the_first_moment(method, graft, torch_backend):
    """With the preconditioner P fixed after step 0, the second step's direction is that of P applied to
    Adam's new first moment ``m = b1 (1 - b1) g1 + (1 - b1) g2`` for "adam", to the gradient ``g2`` for
    "rmsprop" (P from a plain twin stepped with that input and lr 1)."""
    build, build_plain = FIXED[method]
    b1 = 0.9
    grafted, plain = Net().double(), Net().double()
    opt = build(grafted, lr=0.05, weight_decay=0.0, graft=graft, graft_betas=(b1, 0.999))
    twin = build_plain(plain)
    xs = [torch.randn(16, 5, dtype=torch.float64) for _ in range(2)]
    y = torch.randn(16, 3, dtype=torch.float64)
    g1 = one_step(grafted, opt, xs[0], y)
    one_step(plain, twin, xs[0], y)  # the same step-0 factors: the same P until step 10
    before = {name: p.detach().clone() for name, p in grafted.named_parameters()}
    g2 = one_step(grafted, opt, xs[1], y)
    fed = {name: b1 * (1 - b1) * g1[name] + (1 - b1) * g2[name] if graft == "adam" else g2[name] for name in g2}
    twin.zero_grad()
    for name, p in plain.named_parameters():
        p.grad = fed[name].clone()
    start = {name: p.detach().clone() for name, p in plain.named_parameters()}
    twin.step()
    for name, p in grafted.named_parameters():
        if name.startswith("norm"):
            continue
        d, want = before[name] - p.detach(), start[name] - plain.get_parameter(name).detach()
        cosine = float((d * want).sum() / (d.norm() * want.norm()))
        assert cosine > 1 - 1e-10, f"{method} {graft} {name}: the step is not along P of the expected input " \
                                   f"(cosine {cosine:.8f})"


@pytest.mark.parametrize("method", ["kfac", "mkor"])
def test_without_preconditioned_layers_the_grafted_step_is_adamw(method, torch_backend):
    """Every layer skipped: each parameter takes AdamW's step (torch.optim.AdamW on a twin)."""
    build = {"kfac": kfopt.KFAC, "mkor": kfopt.MKOR}[method]
    grafted, twin = Net().double(), Net().double()
    opt = build(grafted, lr=0.01, weight_decay=0.0, skip_layers=(nn.Linear,), graft="adam")
    adamw = torch.optim.AdamW(twin.parameters(), lr=0.01, weight_decay=0.0)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    for _ in range(2):
        one_step(grafted, opt, x, y)
        one_step(twin, adamw, x, y)
    for p, q in zip(grafted.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9)  # (the graft moments are fp32)
