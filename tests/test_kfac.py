"""kfopt.KFAC / KFACPreconditioner on one process: steps against a float64 implementation of
docs/kfac.md (Linear with/without bias and 3-D inputs, Conv2d), intervals, KL clip, the inverse method,
capture edge cases, gradient accumulation, eigh fallback, AMP, base optimizers, KAISA's assignment, and a
convergence comparison with SGD. What every optimizer promises (checkpoints, hyperparameter checks,
closures...) is tested once for all in tests/contracts.

Most tests force the PyTorch kernel path (KFOPT_BACKEND=torch) for speed; the kernels themselves are
tested in test_covariance.py / test_eigen_basis.py, and ``test_end_to_end_through_triton_kernels``
runs K-FAC through the Triton kernels (interpreted on CPU).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from checks import assert_rel_close, digits_final_loss
from torch import nn

import kfopt
from kfopt.kernels.dispatch import use_triton
from kfopt.kaisa import KAISAPlan, grad_worker_count, lpt_assignment, receiver_groups, worker_groups
from kfopt.kfac import KFAC, KFACPreconditioner

# fp32 K-FAC vs float64 reference: the eigendecomposition and the division by (dG dA^T + damping)
# amplify fp32 rounding by up to ~1/damping
TOL = 2e-4


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("KFOPT_BACKEND", "torch")


# ------------------------------------------------------------------ float64 reference (docs/kfac.md)


class Reference:
    """K-FAC + SGD in float64, written from docs/kfac.md; autograd only for the gradients.

    Per layer: a = input rows [| 1], g = output-gradient rows; A_batch = a^T a / rows;
    G_batch = (1/N) sum_rows (N g)(N g)^T with N the loss-term count; A = f A + (1-f) A_batch from I;
    eigen: P = QG[(QG^T V QA) / (dG dA^T + damping)]QA^T; inverse: (G + damping I)^-1 V (A + damping I)^-1;
    nu = min(1, sqrt(kl_clip / |sum lr^2 <P, V>|)); torch SGD (weight decay on weights only) on P.
    """

    def __init__(self, model, *, lr=0.1, momentum=0.9, weight_decay=0.0, damping=1e-3, factor_decay=0.95,
                 kl_clip=1e-3, factor_update_steps=1, inv_update_steps=10, compute_method="eigen",
                 loss_average="batch"):
        self.model = copy.deepcopy(model).double().cpu()
        self.hp = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, damping=damping, f=factor_decay,
                       kl_clip=kl_clip, fus=factor_update_steps, ius=inv_update_steps, method=compute_method,
                       loss_average=loss_average)
        self.layers = {name: m for name, m in self.model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        self.A = {n: torch.eye(self._a_side(m), dtype=torch.float64) for n, m in self.layers.items()}
        self.G = {n: torch.eye(self._g_side(m), dtype=torch.float64) for n, m in self.layers.items()}
        self.second = {}
        self.buf = {}
        self.steps = 0
        self.nus = []
        self.vgs = []  # sum_layers lr^2 <P, V> of every step (the quantity the KL clip bounds)

    @staticmethod
    def _a_side(m):
        side = m.in_features if isinstance(m, nn.Linear) else m.in_channels * math.prod(m.kernel_size)
        return side + (m.bias is not None)

    @staticmethod
    def _g_side(m):
        return m.out_features if isinstance(m, nn.Linear) else m.out_channels

    @staticmethod
    def _rows(m, x, gy):
        if isinstance(m, nn.Linear):
            a, g = x.reshape(-1, m.in_features), gy.reshape(-1, m.out_features)
        else:
            patches = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            a = patches.transpose(1, 2).reshape(-1, patches.shape[1])
            g = gy.permute(0, 2, 3, 1).reshape(-1, m.out_channels)
        if m.bias is not None:
            a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
        return a, g

    def step(self, batches, loss_fn):
        """One step on micro-batches [(x, target)], each loss divided by their number."""
        hp = self.hp
        seen = {n: [] for n in self.layers}

        def hook(name):
            def fn(m, inputs, out):
                out.retain_grad()
                seen[name].append((inputs[0].detach(), out))
            return fn

        handles = [m.register_forward_hook(hook(n)) for n, m in self.layers.items()]
        self.model.zero_grad()
        for x, t in batches:
            (loss_fn(self.model(x.double()), t.double()) / len(batches)).backward()
        for h in handles:
            h.remove()
        if self.steps % hp["fus"] == 0:
            for n, m in self.layers.items():
                rows = [self._rows(m, x, out.grad) for x, out in seen[n]]
                a = torch.cat([r[0] for r in rows])
                g = torch.cat([r[1] for r in rows])
                if hp["loss_average"] == "batch":
                    terms = sum(x.shape[0] for x, _ in seen[n])
                else:  # "batch+sequence": every row of a Linear call is a loss term
                    terms = len(g)
                pe = terms * g  # per-term output gradients
                self.A[n] = hp["f"] * self.A[n] + (1 - hp["f"]) * a.T @ a / len(a)
                self.G[n] = hp["f"] * self.G[n] + (1 - hp["f"]) * pe.T @ pe / terms
        if self.steps % hp["ius"] == 0:
            for n in self.layers:
                if hp["method"] == "eigen":
                    da, qa = torch.linalg.eigh(self.A[n])
                    dg, qg = torch.linalg.eigh(self.G[n])
                    self.second[n] = (qa, da.clamp(min=0), qg, dg.clamp(min=0))
                else:
                    damped = [f + hp["damping"] * torch.eye(len(f), dtype=f.dtype) for f in (self.A[n], self.G[n])]
                    self.second[n] = tuple(torch.linalg.inv(f) for f in damped)
        precond, grads = {}, {}
        for n, m in self.layers.items():
            v = m.weight.grad.reshape(self._g_side(m), -1)
            if m.bias is not None:
                v = torch.cat([v, m.bias.grad[:, None]], 1)
            if hp["method"] == "eigen":
                qa, da, qg, dg = self.second[n]
                p = qg @ ((qg.T @ v @ qa) / (dg[:, None] * da[None, :] + hp["damping"])) @ qa.T
            else:
                a_inv, g_inv = self.second[n]
                p = g_inv @ v @ a_inv
            precond[n], grads[n] = p, v
        nu = 1.0
        vg = sum((precond[n] * grads[n]).sum() * hp["lr"] ** 2 for n in self.layers)
        self.vgs.append(vg.item())
        if hp["kl_clip"] is not None:
            nu = min(1.0, math.sqrt(hp["kl_clip"] / abs(vg.item())))
        self.nus.append(nu)
        with torch.no_grad():
            for n, m in self.layers.items():
                p = precond[n] * nu
                width = m.weight[0].numel()
                m.weight.grad.copy_(p[:, :width].reshape(m.weight.shape))
                if m.bias is not None:
                    m.bias.grad.copy_(p[:, width])
            for name, param in self.model.named_parameters():
                d = param.grad + (hp["weight_decay"] * param if param.dim() > 1 else 0)
                if hp["momentum"]:
                    self.buf[name] = d.clone() if name not in self.buf else hp["momentum"] * self.buf[name] + d
                    d = self.buf[name]
                param -= hp["lr"] * d
        self.steps += 1


# ------------------------------------------------------------------ models and problems


def batch_mean_loss(y, t):
    """Squared error summed per example, averaged over the batch (the first dimension)."""
    return ((y - t) ** 2).reshape(len(y), -1).sum(1).mean()


def token_mean_loss(y, t):
    """Squared error summed per token, averaged over batch x sequence."""
    return ((y - t) ** 2).sum(-1).mean()


CASES = {
    # name: (model builder, input shape, target shape, loss, loss_average)
    "linear": (lambda: nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4)), (12, 6), (12, 4),
               batch_mean_loss, "batch"),
    "linear_3d_no_bias": (lambda: nn.Sequential(nn.Linear(5, 8, bias=False), nn.Tanh(), nn.Linear(8, 3, bias=False)),
                          (4, 5, 5), (4, 5, 3), batch_mean_loss, "batch"),
    "linear_3d_tokens": (lambda: nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)), (4, 5, 5), (4, 5, 3),
                         token_mean_loss, "batch+sequence"),
    "conv": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 2, bias=False),
                                   nn.Flatten(), nn.Linear(27, 3)), (6, 2, 7, 7), (6, 3), batch_mean_loss, "batch"),
}

CONFIGS = {
    # the plain K-FAC step of the issue: w <- w - lr QG[(QG^T dW QA)/(dG dA^T + damping)]QA^T
    "plain": (dict(kl_clip=None, inv_update_steps=1, momentum=0.0), 1),
    # running averages across steps, eigen data reused between inverse updates, KL clip, momentum, decay
    "intervals": (dict(kl_clip=1e-4, inv_update_steps=2, momentum=0.9, weight_decay=0.01, damping=3e-2), 4),
    "factor_interval": (dict(factor_update_steps=2, inv_update_steps=3, kl_clip=None, damping=1e-2), 5),
    "inverse": (dict(compute_method="inverse", inv_update_steps=2, kl_clip=1e-3, damping=1e-2), 3),
}


def make_batches(case, steps, micro=1, generator=None):
    _, x_shape, t_shape, _, _ = CASES[case]
    return [[(torch.randn(x_shape, generator=generator), torch.randn(t_shape, generator=generator))
             for _ in range(micro)] for _ in range(steps)]


def train(opt, model, batches, loss_fn):
    for micro in batches:
        opt.zero_grad()
        for x, t in micro:
            (loss_fn(model(x), t) / len(micro)).backward()
        opt.step()


def assert_model_close(model, ref_model, tol=TOL):
    for (name, p), (_, r) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert_rel_close(p, r, tol=tol, name=name)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("case", list(CASES))
def test_steps_match_float64_equations(case, config, torch_backend, seed):
    build, _, _, loss_fn, loss_average = CASES[case]
    kwargs, steps = CONFIGS[config]
    model = build()
    kwargs = dict(lr=0.1, loss_average=loss_average, **kwargs)
    ref = Reference(model, **kwargs)
    opt = KFAC(model, **kwargs)
    for micro in make_batches(case, steps):
        train(opt, model, [micro], loss_fn)
        ref.step(micro, loss_fn)
        assert_model_close(model, ref.model)
    for name in ref.layers:
        a, g = opt.preconditioner.factors(name)
        assert a.dtype == g.dtype == torch.float32
        assert_rel_close(a, ref.A[name], tol=1e-5, name=f"{name}.A")
        assert_rel_close(g, ref.G[name], tol=1e-5, name=f"{name}.G")
    if config == "intervals":
        assert min(ref.nus) < 1  # the KL clip was active
    assert opt.preconditioner.steps == steps


@pytest.mark.parametrize("factor", [2.0, 0.5])
def test_kl_clip_scales_by_at_most_one(factor, torch_backend, seed):
    """The KL clip's nu = min(1, sqrt(kl_clip / |sum lr^2 <P, V>|)) with kl_clip set so that the unclipped
    factor sqrt(kl_clip / |vg|) is 2 (nu must be 1: a larger bound never enlarges the step) and 0.5 (the
    step is halved), against the float64 reference over two steps."""
    build, _, _, loss_fn, loss_average = CASES["linear"]
    model = build()
    batches = make_batches("linear", 2)
    kwargs = dict(lr=0.1, inv_update_steps=1, momentum=0.0, damping=1e-2, loss_average=loss_average)
    probe = Reference(model, kl_clip=None, **kwargs)
    probe.step(batches[0], loss_fn)
    kl_clip = factor ** 2 * abs(probe.vgs[0])
    ref = Reference(model, kl_clip=kl_clip, **kwargs)
    opt = KFAC(model, kl_clip=kl_clip, **kwargs)
    for micro in batches:
        train(opt, model, [micro], loss_fn)
        ref.step(micro, loss_fn)
        assert_model_close(model, ref.model)
    assert ref.nus[0] == pytest.approx(min(1.0, factor), rel=1e-12)
    assert ref.nus == [min(1.0, math.sqrt(kl_clip / abs(vg))) for vg in ref.vgs]


def test_end_to_end_through_triton_kernels(device, seed):
    """No KFOPT_BACKEND override: the covariance and eigen-basis kernels run through Triton (interpreted
    on CPU, compiled with KFOPT_TEST_DEVICE=cuda)."""
    assert use_triton(device)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3, bias=False))
    kwargs = dict(lr=0.1, kl_clip=1e-3, inv_update_steps=2, damping=1e-2)
    ref = Reference(model, **kwargs)
    model.to(device)
    opt = KFAC(model, **kwargs)
    for _ in range(3):
        x, t = torch.randn(9, 5), torch.randn(9, 3)
        train(opt, model, [[(x.to(device), t.to(device))]], batch_mean_loss)
        ref.step([(x, t)], batch_mean_loss)
    assert_model_close(model, ref.model, tol=TOL if device.type == "cpu" else 1e-3)


def test_gradient_accumulation_equals_the_big_batch(torch_backend, seed):
    build, _, _, loss_fn, _ = CASES["conv"]
    big_model = build()
    small_model = copy.deepcopy(big_model)
    kwargs = dict(lr=0.1, inv_update_steps=2, damping=1e-2)
    big, small = KFAC(big_model, **kwargs), KFAC(small_model, **kwargs)
    for micro in make_batches("conv", 3, micro=3):
        train(big, big_model, [[(torch.cat([x for x, _ in micro]), torch.cat([t for _, t in micro]))]], loss_fn)
        train(small, small_model, [micro], loss_fn)
    assert_model_close(small_model, big_model, tol=1e-5)
    for name in big.preconditioner.layers:
        for f_small, f_big in zip(small.preconditioner.factors(name), big.preconditioner.factors(name)):
            assert_rel_close(f_small, f_big, tol=1e-6)


# ------------------------------------------------------------------ capture edge cases


class Branchy(nn.Module):
    """Linear layers, one of them unused when ``use_extra`` is False, a frozen one, an embedding and a
    LayerNorm (first-order parameters)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.norm = nn.LayerNorm(6)
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.fc = nn.Linear(6, 5)
        self.extra = nn.Linear(5, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, tokens, use_extra=True):
        h = torch.tanh(self.fc(self.frozen(self.norm(self.embed(tokens)))))
        if use_extra:
            h = h + self.extra(h)
        return self.head(h)


def test_capture_edge_cases(torch_backend, seed):
    model = Branchy()
    opt = KFAC(model, lr=0.1, momentum=0.0, factor_update_steps=2, inv_update_steps=1, kl_clip=None)
    pre = opt.preconditioner
    assert list(pre.layers) == ["fc", "extra", "head"]  # the frozen layer is not preconditioned
    tokens, target = torch.randint(10, (8,)), torch.randn(8, 2)

    def factors():
        return {n: [f.clone() for f in pre.factors(n)] for n in pre.layers}

    # step 0 (factor step): "extra" is not called, so it gets no factor update and no gradient
    opt.zero_grad()
    batch_mean_loss(model(tokens, use_extra=False), target).backward()
    extra_before, first_order = model.extra.weight.clone(), {n: p.clone() for n, p in model.named_parameters()
                                                              if n.startswith(("embed", "norm"))}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith(("embed", "norm"))}
    opt.step()
    assert torch.equal(model.extra.weight, extra_before)
    assert all(torch.equal(f, torch.eye(len(f))) for f in pre.factors("extra"))
    assert not torch.equal(pre.factors("fc")[0], torch.eye(7))
    for n, p in model.named_parameters():  # embedding and norm: plain SGD on their raw gradients
        if n in first_order:
            torch.testing.assert_close(p, first_order[n] - 0.1 * grads[n], rtol=0, atol=1e-7)

    # step 1 is not a factor step: the capture is disarmed
    assert not pre.capture.armed
    before = factors()
    opt.zero_grad()
    batch_mean_loss(model(tokens), target).backward()
    assert all(layer.calls == 0 for layer in pre.layers.values())
    opt.step()
    assert all(torch.equal(a, b) for n in before for a, b in zip(before[n], pre.factors(n)))

    # step 2 is a factor step: eval-mode and no-grad forwards are not captured; an empty batch adds
    # no rows, so the factors keep their values
    assert pre.capture.armed
    model.eval()
    model(tokens)
    model.train()
    with torch.no_grad():
        model(tokens)
    assert all(layer.calls == 0 for layer in pre.layers.values())
    before = factors()
    opt.zero_grad()
    model(tokens[:0]).sum().backward()
    opt.step()
    assert all(torch.equal(a, b) for n in before for a, b in zip(before[n], pre.factors(n)))

    with pytest.raises(ValueError, match="bias is frozen"):
        broken = nn.Sequential(nn.Linear(3, 3))
        broken[0].bias.requires_grad_(False)
        KFAC(broken)


def test_eigh_falls_back_to_float64_then_keeps_the_last_good_data(torch_backend, monkeypatch, seed):
    build, _, _, loss_fn, _ = CASES["linear"]
    model = build()
    kwargs = dict(lr=0.1, inv_update_steps=1, damping=1e-2)
    ref, opt = Reference(model, **kwargs), KFAC(model, **kwargs)
    real_eigh = torch.linalg.eigh
    calls = []

    def fp32_fails(m, *args, **kw):
        calls.append(m.dtype)
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("forced failure")
        return real_eigh(m, *args, **kw)

    monkeypatch.setattr(torch.linalg, "eigh", fp32_fails)
    batches = make_batches("linear", 2)
    train(opt, model, [batches[0]], loss_fn)
    assert calls == [torch.float32, torch.float64] * 4  # A and G of two layers, each retried in float64
    ref.step(batches[0], loss_fn)
    assert_model_close(model, ref.model)
    assert opt.preconditioner.decomposition_failures == 0

    def nan_eigh(m, *args, **kw):  # both attempts return garbage: a failure for every layer
        values, vectors = real_eigh(m, *args, **kw)
        return values * float("nan"), vectors

    monkeypatch.setattr(torch.linalg, "eigh", nan_eigh)
    train(opt, model, [batches[1]], loss_fn)
    assert opt.preconditioner.decomposition_failures == 2
    ref.hp["ius"] = 2  # the reference keeps step 0's eigen data for step 1
    ref.step(batches[1], loss_fn)
    assert_model_close(model, ref.model)


# ------------------------------------------------------------------ base optimizers, standalone use


@pytest.mark.parametrize("base", ["sgd", "adamw", "lamb", "callable"])
def test_base_optimizers_and_the_standalone_preconditioner(base, torch_backend, seed):
    """KFAC(base=...) equals KFACPreconditioner in front of the same optimizer built by hand."""
    build, _, _, loss_fn, _ = CASES["linear"]
    model = build()
    hand = copy.deepcopy(model)
    kwargs = dict(lr=0.05, damping=1e-2, inv_update_steps=2, weight_decay=0.01)
    make = {"sgd": lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9),
            "adamw": lambda groups: torch.optim.AdamW(groups, lr=0.05),
            "lamb": lambda groups: kfopt.LAMB(groups, lr=0.05),
            "callable": lambda groups: torch.optim.Adam(groups, lr=0.05)}[base]
    opt = KFAC(model, base=make if base == "callable" else base, **kwargs)
    precond = KFACPreconditioner(hand, lr=0.05, damping=1e-2, inv_update_steps=2)
    user_opt = make(kfopt.param_groups(hand, 0.01))
    schedules = [torch.optim.lr_scheduler.StepLR(o, 1, 0.5) for o in (opt, user_opt)]
    for micro in make_batches("linear", 3):
        for o, m, pre in ((opt, model, None), (user_opt, hand, precond)):
            o.zero_grad()
            loss_fn(m(micro[0][0]), micro[0][1]).backward()
            if pre is not None:
                pre.step(lr=o.param_groups[0]["lr"])
            o.step()
        for s in schedules:
            s.step()
    for p, q in zip(model.parameters(), hand.parameters()):
        assert torch.equal(p, q)
    assert opt.base.param_groups[0]["lr"] == 0.05 / 8


# ------------------------------------------------------------------ AMP


def test_grad_scaler_unscales_g_and_skipped_steps_leave_everything_unchanged(torch_backend, seed):
    build, _, _, loss_fn, _ = CASES["linear"]
    model = build()
    plain_model = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    kwargs = dict(lr=0.1, damping=1e-2, inv_update_steps=1)
    opt, plain = KFAC(model, grad_scaler=scaler, **kwargs), KFAC(plain_model, **kwargs)
    x, t = torch.randn(12, 6), torch.randn(12, 4)

    def scaled_step(loss_scale=1.0, unscale_first=False):
        opt.zero_grad()
        scaler.scale(loss_fn(model(x), t) * loss_scale).backward()
        if unscale_first:  # the other GradScaler flow (e.g. to clip gradients before the step)
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()

    scaled_step()
    train(plain, plain_model, [[(x, t)]], loss_fn)
    assert_model_close(model, plain_model, tol=1e-5)
    for name in plain.preconditioner.layers:
        for f, f_plain in zip(opt.preconditioner.factors(name), plain.preconditioner.factors(name)):
            assert_rel_close(f, f_plain, tol=1e-5)

    before = {n: p.clone() for n, p in model.named_parameters()}
    factors = {n: [f.clone() for f in opt.preconditioner.factors(n)] for n in opt.preconditioner.layers}
    scaled_step(loss_scale=float("inf"))  # overflow: the scaler skips the step
    assert opt.skipped_steps.item() == 1 and scaler.get_scale() == 2.0 ** 11
    assert opt.preconditioner.steps == 1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(torch.equal(a, b) for n in factors for a, b in zip(factors[n], opt.preconditioner.factors(n)))

    for unscale_first in (False, True):
        scaled_step(unscale_first=unscale_first)
        train(plain, plain_model, [[(x, t)]], loss_fn)
        assert_model_close(model, plain_model, tol=1e-4)
    assert opt.state_dict()["kfac_skipped_steps"].item() == 1

    # a standalone preconditioner (user's optimizer, scaler.unscale_ first): an overflow's non-finite
    # statistics leave the factors unchanged
    precond = KFACPreconditioner(model, grad_scaler=scaler)
    user_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for loss_scale in (1.0, float("inf")):
        factors = {n: [f.clone() for f in precond.factors(n)] for n in precond.layers}
        user_opt.zero_grad()
        scaler.scale(loss_fn(model(x), t) * loss_scale).backward()
        scaler.unscale_(user_opt)
        precond.step()
        scaler.step(user_opt)
        scaler.update()
        changed = [not torch.equal(a, b) for n in factors for a, b in zip(factors[n], precond.factors(n))]
        assert all(changed) if loss_scale == 1.0 else not any(changed)
    precond.capture.remove()

    no_scaler = KFAC(copy.deepcopy(model), **kwargs)
    with pytest.raises(RuntimeError, match="grad_scaler"):
        scaler.scale(loss_fn(no_scaler.preconditioner.capture.model(x), t)).backward()
        scaler.step(no_scaler)


def test_autocast_bf16_matches_fp32(torch_backend, seed):
    build, _, _, loss_fn, _ = CASES["conv"]
    model = build()
    fp32_model = copy.deepcopy(model)
    kwargs = dict(lr=0.1, damping=1e-2, inv_update_steps=1)
    opt, fp32 = KFAC(model, **kwargs), KFAC(fp32_model, **kwargs)
    for micro in make_batches("conv", 2):
        x, t = micro[0]
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model(x).float(), t)
        loss.backward()
        opt.step()
        train(fp32, fp32_model, [micro], loss_fn)
    for name in opt.preconditioner.layers:
        for f, f32 in zip(opt.preconditioner.factors(name), fp32.preconditioner.factors(name)):
            assert f.dtype == torch.float32
            assert_rel_close(f, f32, tol=3e-2)
    assert_model_close(model, fp32_model, tol=5e-2)

    # bf16 parameters: factors and second-order data stay fp32
    bf16_model, fp32_model = build().bfloat16(), build()
    fp32_model.load_state_dict(bf16_model.state_dict())
    bf16, fp32 = KFAC(bf16_model, **kwargs), KFAC(fp32_model, **kwargs)
    x, t = make_batches("conv", 1)[0][0]
    train(bf16, bf16_model, [[(x.bfloat16(), t.bfloat16())]], loss_fn)
    train(fp32, fp32_model, [[(x, t)]], loss_fn)
    for name in bf16.preconditioner.layers:
        for f, f32 in zip(bf16.preconditioner.factors(name), fp32.preconditioner.factors(name)):
            assert f.dtype == torch.float32
            assert_rel_close(f, f32, tol=3e-2)
    assert_model_close(bf16_model, fp32_model, tol=1e-2)


# ------------------------------------------------------------------ KAISA plan (pure functions)


@pytest.mark.parametrize("n", [3, 8])
def test_output_gradient_factor_is_n_squared_times_kfac_pytorchs(n, torch_backend, seed):
    """docs/kfac.md, "Scale of G and damping from kfac-pytorch": for a mean loss over N terms (one row
    each), kfopt's G is N^2 times kfac-pytorch's ``g^T g / rows`` of the mean loss's output gradients
    (written here by hand), A is the same, and with the damping multiplied by N^2 the eigen method's
    preconditioned gradient is kfac-pytorch's divided by N^2."""
    damping = 0.1  # kfac-pytorch's value
    layer = nn.Linear(4, 3)
    precond = KFACPreconditioner(nn.Sequential(layer), damping=n * n * damping, factor_decay=0.0, kl_clip=None,
                                 inv_update_steps=1)
    x, t = torch.randn(n, 4), torch.randn(n, 3)
    y = layer(x)
    ((y - t) ** 2).sum(1).mean().backward()  # the mean of n loss terms
    g = 2 * (y.detach().double() - t.double()) / n  # d loss / d y of the mean loss, rows
    a = torch.cat([x.double(), torch.ones(n, 1, dtype=torch.float64)], 1)
    g_kp, a_kp = g.T @ g / n, a.T @ a / n  # kfac-pytorch's factors of this batch
    v = torch.cat([layer.weight.grad.double(), layer.bias.grad.double()[:, None]], 1)
    precond.step()
    a_got, g_got = precond.factors("0")
    assert_rel_close(a_got, a_kp, tol=1e-6, name="A")
    assert_rel_close(g_got, n * n * g_kp, tol=1e-6, name="G")
    assert not torch.allclose(g_got.double(), g_kp, rtol=0.5)  # the N^2 is there
    d_a, q_a = torch.linalg.eigh(a_kp)
    d_g, q_g = torch.linalg.eigh(g_kp)
    p_kp = q_g @ ((q_g.T @ v @ q_a) / (d_g.clamp(min=0)[:, None] * d_a.clamp(min=0)[None, :] + damping)) @ q_a.T
    got = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
    assert_rel_close(got, p_kp / (n * n), tol=1e-4, name="P")


def test_kaisa_grid_and_assignment():
    assert worker_groups(4, 2) == [[0, 2], [1, 3]]
    assert receiver_groups(4, 2) == [[0, 1], [2, 3]]
    assert worker_groups(4, 4) == [[0, 1, 2, 3]] and receiver_groups(4, 4) == [[0], [1], [2], [3]]
    assert worker_groups(4, 1) == [[0], [1], [2], [3]] and receiver_groups(4, 1) == [[0, 1, 2, 3]]
    assert grad_worker_count(8, 0.5) == 4 and grad_worker_count(4, 0.1) == 1
    with pytest.raises(ValueError, match="grad_worker_fraction"):
        grad_worker_count(4, 0.75)  # 3 grad workers do not divide 4 ranks

    # LPT: biggest first, to the least-loaded group, then its least-loaded rank; ties to the lowest index
    assert lpt_assignment([8, 1, 5, 4, 3], [[0, 2], [1, 3]]) == [0, 3, 1, 3, 2]
    dims = [(65, 64), (33, 10), (129, 16), (9, 9)]
    plan = KAISAPlan.build(dims, world=4, rank=1, fraction=0.5)
    assert plan.inverse_workers == (1, 3, 0, 3)
    # rank 1 is in grad-worker group [1, 3] and receiver group [0, 1]
    assert [plan.is_grad_worker(i) for i in range(4)] == [True, True, False, True]
    assert [plan.gradient_source(i) for i in range(4)] == [1, 1, 0, 1]
    for rank in range(4):  # every rank computes the same assignment
        assert KAISAPlan.build(dims, 4, rank, 0.5).inverse_workers == plan.inverse_workers
    # (100, 1) costs more flops than (75, 75) but less memory
    dims = [(100, 1), (75, 75), (10, 10)]
    assert KAISAPlan.build(dims, 2, 0, 1.0, "compute").inverse_workers == (0, 1, 1)
    assert KAISAPlan.build(dims, 2, 0, 1.0, "memory").inverse_workers == (1, 0, 1)


# ------------------------------------------------------------------ convergence


def test_converges_faster_per_step_than_sgd(torch_backend):
    """300 steps on scikit-learn's digits with the same lr schedule: K-FAC's loss falls much faster."""
    schedule = lambda s: 1 - s / 300  # noqa: E731
    kfac = digits_final_loss(lambda model: KFAC(model, lr=0.05, momentum=0.9, damping=1e-2, kl_clip=1e-2), schedule)
    sgd = digits_final_loss(lambda model: torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), schedule)
    assert kfac < 0.5 * sgd, (kfac, sgd)
