"""kfopt.MKOR / MKORH on one process: steps against a float64 implementation of docs/mkor.md
(Linear with/without bias, 3-D inputs, Conv2d; with and without stabiliser blends), the factors
against the inverse of the explicitly formed running average, a NaN factor, 16-bit factors,
gradient accumulation, channels-last gradients, AMP, base optimizers, MKOR-H's switch criterion on
synthetic loss curves and its hand-over, and a convergence comparison with LAMB. What every optimizer
promises (checkpoints, hyperparameter checks, closures...) is tested once for all in tests/contracts.

Most tests force the PyTorch kernel path (KFOPT_BACKEND=torch) for speed; the kernels themselves are
tested in test_rank1_inverse.py / test_kronecker_precondition.py, and
``test_end_to_end_through_triton_kernels`` runs MKOR through the Triton kernels (interpreted on CPU).
"""

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from checks import assert_rel_close, digits_final_loss
from torch import nn

import kfopt
from kfopt.mkor import MKOR, MKORH, MKORPreconditioner

TOL = 1e-4  # fp32 MKOR vs float64: the inverses amplify fp32 rounding


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("KFOPT_BACKEND", "torch")


def mse(y, t):
    return ((y - t) ** 2).sum(-1).mean()


CASES = {
    # name: (model builder, input shape, target shape, loss_average)
    "linear": (lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4, bias=False), nn.Tanh(),
                                     nn.Linear(4, 3)), (12, 6), (12, 3), "batch"),
    "sequence": (lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), (4, 6, 5), (4, 6, 3),
                 "batch+sequence"),
    "conv": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(75, 4)),
             (6, 2, 5, 5), (6, 4), "batch"),
}


def make_case(name, steps, seed=0):
    build, x_shape, t_shape, loss_average = CASES[name]
    torch.manual_seed(seed)
    model = build()
    g = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(x_shape, generator=g), torch.randn(t_shape, generator=g)) for _ in range(steps)]
    return model, data, loss_average


def train(opt, model, data, loss_fn=mse):
    for x, t in data:
        opt.zero_grad()
        loss_fn(model(x), t).backward()
        opt.step()


def assert_models_close(a, b, tol, name=""):
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert_rel_close(p, q.to(p.dtype), tol=tol, name=f"{name}{n}")


# ------------------------------------------------------------------ float64 reference (docs/mkor.md)


class Reference:
    """MKOR + torch SGD in float64, written from docs/mkor.md. The inverses are kept explicitly and
    updated by inverting the running average of their inverses (never by Sherman-Morrison)::

        J <- zeta J + (1 - zeta) I   if max|J| > threshold
        J <- inv(gamma inv(J) + (1 - gamma) v v^T)
        a = mean of [x | 1] rows;  g = N sum(g rows) / rows;  D = JL V JR * ||V|| / ||D||
    """

    def __init__(self, model, *, lr, momentum, weight_decay, inv_freq, stat_decay, threshold, blend, loss_average):
        self.model = copy.deepcopy(model).double()
        self.layers = [m for m in self.model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        self.JL = [torch.eye(m.weight.shape[0], dtype=torch.float64) for m in self.layers]
        self.JR = [torch.eye(m.weight[0].numel() + (m.bias is not None), dtype=torch.float64) for m in self.layers]
        decayed = [p for p in self.model.parameters() if p.dim() >= 2]
        biases = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.SGD([{"params": decayed, "weight_decay": weight_decay},
                                    {"params": biases, "weight_decay": 0.0}], lr=lr, momentum=momentum)
        self.hp = dict(inv_freq=inv_freq, gamma=stat_decay, threshold=threshold, blend=blend,
                       loss_average=loss_average)
        self.steps = 0

    def _update(self, j, v):
        if j.abs().max() > self.hp["threshold"]:
            j = self.hp["blend"] * j + (1 - self.hp["blend"]) * torch.eye(len(j), dtype=j.dtype)
        gamma = self.hp["gamma"]
        return torch.linalg.inv(gamma * torch.linalg.inv(j) + (1 - gamma) * torch.outer(v, v))

    def step(self, x, t, loss_fn=mse):
        seen = {}

        def hook(module, inputs, output):
            output.retain_grad()
            seen[module] = (inputs[0], output)

        handles = [m.register_forward_hook(hook) for m in self.layers]
        loss_fn(self.model(x.double()), t.double()).backward()
        for h in handles:
            h.remove()
        if self.steps % self.hp["inv_freq"] == 0:
            for i, m in enumerate(self.layers):
                x_in, y = seen[m]
                if isinstance(m, nn.Conv2d):
                    a_rows = F.unfold(x_in, m.kernel_size, padding=m.padding, stride=m.stride)
                    a_rows = a_rows.transpose(1, 2).reshape(-1, m.weight[0].numel())
                    g_rows = y.grad.permute(0, 2, 3, 1).reshape(-1, m.out_channels)
                else:
                    a_rows, g_rows = x_in.reshape(-1, m.in_features), y.grad.reshape(-1, m.out_features)
                if m.bias is not None:
                    a_rows = torch.cat([a_rows, torch.ones(len(a_rows), 1, dtype=a_rows.dtype)], 1)
                rows = len(a_rows)
                n_terms = x_in.shape[0] if self.hp["loss_average"] == "batch" else rows
                self.JL[i] = self._update(self.JL[i], n_terms * g_rows.sum(0) / rows)
                self.JR[i] = self._update(self.JR[i], a_rows.mean(0))
        for i, m in enumerate(self.layers):
            v = m.weight.grad.reshape(len(self.JL[i]), -1)
            if m.bias is not None:
                v = torch.cat([v, m.bias.grad[:, None]], 1)
            d = self.JL[i] @ v @ self.JR[i]
            d = d * v.norm() / d.norm()
            m.weight.grad.copy_(d[:, :m.weight[0].numel()].reshape(m.weight.shape))
            if m.bias is not None:
                m.bias.grad.copy_(d[:, -1])
        self.opt.step()
        self.opt.zero_grad()
        self.steps += 1


CONFIGS = {
    "no-blend": dict(inv_freq=2, stabilizer_threshold=math.inf),
    "blend": dict(inv_freq=1, stabilizer_threshold=1.05, stabilizer_blend=0.8),
}


def run_against_reference(case, config, steps=4):
    model, data, loss_average = make_case(case, steps)
    hp = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, stat_decay=0.9, **CONFIGS[config])
    ref = Reference(model, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"],
                    inv_freq=hp["inv_freq"], stat_decay=hp["stat_decay"], threshold=hp["stabilizer_threshold"],
                    blend=hp.get("stabilizer_blend", 0.9), loss_average=loss_average)
    opt = MKOR(model, base="sgd", loss_average=loss_average, **hp)
    for x, t in data:
        ref.step(x, t)
    train(opt, model, data)
    assert_models_close(model, ref.model, TOL)
    for i, name in enumerate(opt.layers):
        jl, jr = opt.inverse_factors(name)
        assert_rel_close(jl, ref.JL[i], tol=TOL, name=f"{name} JL")
        assert_rel_close(jr, ref.JR[i], tol=TOL, name=f"{name} JR")
    blends = opt.factor_events[..., 0].sum().item()
    assert (blends > 0) == (config == "blend")
    assert opt.factor_events[..., 1:].sum().item() == 0
    return opt


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("case", CASES)
def test_steps_match_float64_equations(case, config, torch_backend):
    run_against_reference(case, config)


def test_end_to_end_through_triton_kernels():
    """The same comparison with the rank-1 and preconditioning kernels interpreted."""
    run_against_reference("conv", "blend", steps=2)


def test_factors_equal_the_inverse_of_the_explicit_average(torch_backend):
    """Without blends, after k updates JL == inv(L_k), L_k = gamma^k I + (1 - gamma) sum gamma^(k-i) g_i g_i^T
    (and JR with a), the vectors recomputed here from the layer's rows."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    opt = MKOR(layer, lr=0.0, base="sgd", inv_freq=1, stat_decay=0.8, stabilizer_threshold=math.inf)
    ema_l, ema_r = torch.eye(3, dtype=torch.float64), torch.eye(5, dtype=torch.float64)
    for k in range(6):
        x = torch.randn(10, 4) + 0.5
        out = layer(x)
        out.retain_grad()
        out.pow(2).sum(1).mean().backward()
        g = 10 * out.grad.double().sum(0) / 10
        a = torch.cat([x.double(), torch.ones(10, 1, dtype=torch.float64)], 1).mean(0)
        ema_l = 0.8 * ema_l + 0.2 * torch.outer(g, g)
        ema_r = 0.8 * ema_r + 0.2 * torch.outer(a, a)
        opt.step()
        opt.zero_grad()
    jl, jr = opt.inverse_factors("")
    assert_rel_close(jl, torch.linalg.inv(ema_l), tol=1e-5)
    assert_rel_close(jr, torch.linalg.inv(ema_r), tol=1e-5)


def test_nan_in_a_factor_is_reset_and_counted(torch_backend):
    model, data, loss_average = make_case("linear", 3)
    opt = MKOR(model, lr=0.05, base="sgd", inv_freq=1)
    train(opt, model, data[:1])
    opt.preconditioner._layers[1].JR[0, 0] = math.nan
    train(opt, model, data[1:])
    assert opt.factor_events[1, 1].tolist() == [0, 1, 0]  # JR of layer "2": one reset
    assert opt.factor_events[:, :, 1].sum().item() == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(f).all() for name in opt.layers for f in opt.inverse_factors(name))


@pytest.mark.parametrize("factor_dtype", [torch.bfloat16, torch.float16])
def test_16_bit_factors_follow_the_fp32_run(factor_dtype, torch_backend):
    model, data, loss_average = make_case("conv", 4)
    model32 = copy.deepcopy(model)
    opt = MKOR(model, lr=0.05, base="sgd", inv_freq=1, factor_dtype=factor_dtype)
    opt32 = MKOR(model32, lr=0.05, base="sgd", inv_freq=1)
    train(opt, model, data)
    train(opt32, model32, data)
    for name in opt.layers:
        assert opt.preconditioner._layers[opt.layers.index(name)].JL.dtype == factor_dtype
        for f, f32 in zip(opt.inverse_factors(name), opt32.inverse_factors(name)):
            assert_rel_close(f, f32, tol=3e-2, name=name)
    assert_models_close(model, model32, 3e-2)


def test_gradient_accumulation_equals_the_big_batch(torch_backend):
    """Two micro-batches with halved losses give the factors and parameters of the whole batch."""
    model, data, loss_average = make_case("sequence", 3)
    big = copy.deepcopy(model)
    kwargs = dict(lr=0.05, base="sgd", inv_freq=1, loss_average=loss_average)
    opt, big_opt = MKOR(model, **kwargs), MKOR(big, **kwargs)
    for x, t in data:
        opt.zero_grad()
        for part in (slice(0, 1), slice(1, 4)):  # unequal micro-batches: 1 and 3 sequences
            (mse(model(x[part]), t[part]) * (part.stop - part.start) / 4).backward()
        opt.step()
    train(big_opt, big, data)
    assert_models_close(model, big, 1e-5)
    for name in opt.layers:
        for f, f_big in zip(opt.inverse_factors(name), big_opt.inverse_factors(name)):
            assert_rel_close(f, f_big, tol=1e-5)


def test_channels_last_conv_gradients(torch_backend):
    model, data, _ = make_case("conv", 2)
    other = copy.deepcopy(model).to(memory_format=torch.channels_last)
    opt, other_opt = MKOR(model, lr=0.05, base="sgd"), MKOR(other, lr=0.05, base="sgd")
    train(opt, model, data)
    train(other_opt, other, [(x.to(memory_format=torch.channels_last), t) for x, t in data])
    assert not other[0].weight.grad.is_contiguous()
    assert_models_close(model, other, 1e-6)


# ------------------------------------------------------------------ AMP


def test_grad_scaler_unscales_g_and_skipped_steps_leave_everything_unchanged(torch_backend):
    model, data, _ = make_case("linear", 4)
    plain_model = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    kwargs = dict(lr=0.05, base="sgd", inv_freq=2)
    opt, plain = MKOR(model, grad_scaler=scaler, **kwargs), MKOR(plain_model, **kwargs)

    def scaled_step(x, t, loss_scale=1.0):
        opt.zero_grad()
        scaler.scale(mse(model(x), t) * loss_scale).backward()
        scaler.step(opt)
        scaler.update()

    scaled_step(*data[0])
    train(plain, plain_model, data[:1])
    assert_models_close(model, plain_model, 1e-5)

    before = {n: p.clone() for n, p in model.named_parameters()}
    factors = {n: opt.inverse_factors(n) for n in opt.layers}
    scaled_step(*data[1], loss_scale=math.inf)  # overflow: the scaler skips the step
    assert opt.skipped_steps.item() == 1 and opt.steps == 1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(torch.equal(a, b) for n in factors for a, b in zip(factors[n], opt.inverse_factors(n)))
    assert opt.factor_events.sum().item() == 0

    for x, t in data[1:]:
        scaled_step(x, t)
    train(plain, plain_model, data[1:])
    assert_models_close(model, plain_model, 1e-4)
    for n in opt.layers:
        for f, g in zip(opt.inverse_factors(n), plain.inverse_factors(n)):
            assert_rel_close(f, g, tol=1e-4)
    assert opt.state_dict()["mkor_skipped_steps"].item() == 1

    no_scaler = MKOR(copy.deepcopy(model), **kwargs)
    with pytest.raises(RuntimeError, match="grad_scaler"):
        scaler.scale(mse(no_scaler.capture.model(data[0][0]), data[0][1])).backward()
        scaler.step(no_scaler)


def test_autocast_bf16_matches_fp32(torch_backend):
    model, data, _ = make_case("conv", 3)
    fp32_model = copy.deepcopy(model)
    opt, fp32 = MKOR(model, lr=0.05, base="sgd", inv_freq=1), MKOR(fp32_model, lr=0.05, base="sgd", inv_freq=1)
    for x, t in data:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = mse(model(x).float(), t)
        loss.backward()
        opt.step()
    train(fp32, fp32_model, data)
    for name in opt.layers:
        for f, f32 in zip(opt.inverse_factors(name), fp32.inverse_factors(name)):
            assert_rel_close(f, f32, tol=3e-2, name=name)
    assert_models_close(model, fp32_model, 5e-2)


# ------------------------------------------------------------------ construction, bases, layers


def test_bases_and_their_param_groups(torch_backend):
    model, data, _ = make_case("linear", 2)
    opt = MKOR(model, lr=0.1, base="sgd", momentum=0.9, weight_decay=1e-2)
    assert isinstance(opt.base, torch.optim.SGD) and opt.base.param_groups is opt.param_groups
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-2, 0.0]
    assert opt.param_groups[0]["momentum"] == 0.9

    assert isinstance(MKOR(copy.deepcopy(model)).base, kfopt.LAMB)
    adamw = MKOR(copy.deepcopy(model), base="adamw", betas=(0.8, 0.9))
    assert isinstance(adamw.base, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.8, 0.9)
    assert adamw.param_groups[0]["weight_decay"] == 0.01
    custom = MKOR(copy.deepcopy(model), base=lambda groups: torch.optim.Adam(groups))
    assert isinstance(custom.base, torch.optim.Adam) and custom.param_groups[0]["weight_decay"] == 0.0
    train(custom, custom.capture.model, data)
    with pytest.raises(ValueError, match="base"):
        MKOR(copy.deepcopy(model), base=lambda groups: torch.optim.Adam(groups), betas=(0.9, 0.9))


@pytest.mark.parametrize("base", ["sgd", "lamb"])
def test_the_standalone_preconditioner_in_front_of_any_optimizer(base, torch_backend):
    """MKOR(base=...) equals MKORPreconditioner in front of the same optimizer built by hand, bit for bit
    (factor updates at steps 0 and 2, a channels-last Conv2d whose gradient is preconditioned as a copy)."""
    model, data, loss_average = make_case("conv", 4)
    model[0].to(memory_format=torch.channels_last)
    hand = copy.deepcopy(model)
    make = {"sgd": lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9),
            "lamb": lambda groups: kfopt.LAMB(groups, lr=0.05)}[base]
    opt = MKOR(model, lr=0.05, base=base, inv_freq=2, **({"momentum": 0.9} if base == "sgd" else {}))
    precond = MKORPreconditioner(hand, inv_freq=2)
    user_opt = make(kfopt.param_groups(hand, opt.param_groups[0]["weight_decay"]))
    for x, t in data:
        for o, m, pre in ((opt, model, None), (user_opt, hand, precond)):
            o.zero_grad()
            mse(m(x), t).backward()
            if pre is not None:
                pre.step()
            o.step()
    assert precond.steps == opt.steps == 4 and not torch.equal(model[0].weight, make_case("conv", 0)[0][0].weight)
    for p, q in zip(model.parameters(), hand.parameters()):
        assert torch.equal(p, q)
    for name in opt.layers:
        for ours, theirs in zip(opt.inverse_factors(name), precond.inverse_factors(name)):
            assert torch.equal(ours, theirs)


def test_closure_skipped_layers_and_other_parameters(torch_backend):
    """Embedding and LayerNorm (not preconditioned) and a skipped Linear get the base optimizer's
    update on their raw gradients; step(closure) returns the closure's loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 6), nn.LayerNorm(6), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    plain = copy.deepcopy(model)
    opt = MKOR(model, lr=0.1, base="sgd", skip_layers=["4"])
    sgd = torch.optim.SGD(kfopt.param_groups(plain, 0.0), lr=0.1)
    assert opt.layers == ["2"]
    x, t = torch.randint(10, (8,)), torch.randn(8, 3)

    def closure():
        opt.zero_grad()
        loss = mse(model(x), t)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(mse(plain(x), t).item())
    sgd.zero_grad()
    mse(plain(x), t).backward()
    sgd.step()
    for i in ("0", "1", "4"):
        for p, q in zip(model.get_submodule(i).parameters(), plain.get_submodule(i).parameters()):
            assert torch.equal(p, q), i
    assert not torch.equal(model[2].weight, plain[2].weight)


# ------------------------------------------------------------------ MKOR-H


def expected_switch_window(losses, window, fraction, patience):
    """The criterion of the MKORH docstring, on a plain list: the number of window means formed when
    it switches, or None."""
    means, best, flat = [], -math.inf, 0
    for j in range(len(losses) // window):
        means.append(sum(losses[j * window:(j + 1) * window]) / window)
        if len(means) < 2:
            continue
        rate = (means[-2] - means[-1]) / abs(means[-2])
        best = max(best, rate)
        flat = flat + 1 if best > 0 and rate < fraction * best else 0
        if flat >= patience:
            return len(means)
    return None


def synthetic(kind, steps=3000):
    g = torch.Generator().manual_seed(0)
    noise = (torch.rand(steps, generator=g, dtype=torch.float64) - 0.5).tolist()
    if kind == "plateau":  # fast decrease that flattens out
        return [1.0 + 3.0 * math.exp(-t / 300) + 0.02 * n for t, n in zip(range(steps), noise)]
    if kind == "linear":  # steady decrease: the relative rate even grows
        return [5.0 - 0.0015 * t + 0.02 * n for t, n in zip(range(steps), noise)]
    if kind == "accelerating":
        return [5.0 - 5e-7 * t * t + 0.02 * n for t, n in zip(range(steps), noise)]
    # a steady decrease with one flat stretch of one window: patience 2 must not switch on it
    values, level = [], 5.0
    for t in range(steps):
        level -= 0.0 if 1000 <= t < 1050 else 0.001
        values.append(level + 0.001 * noise[t])
    return values


@pytest.mark.parametrize("kind", ["plateau", "linear", "accelerating", "one-flat-window"])
def test_switch_criterion_on_synthetic_losses(kind):
    opt = MKORH(nn.Linear(3, 2), switch_window=50, switch_fraction=0.1, switch_patience=2)
    losses = synthetic(kind)
    switched_after = None
    for i, loss in enumerate(losses):
        opt.observe(torch.tensor(loss) if i % 2 else loss)
        if opt.switched and switched_after is None:
            switched_after = len(opt.window_means)
    want = expected_switch_window(losses, 50, 0.1, 2)
    assert switched_after == want
    if kind == "plateau":
        assert want is not None
        # it waited until the curve had flattened: the true rate is below a tenth of the initial one
        t = 50 * want
        assert math.exp(-t / 300) < 0.1 * math.exp(-50 / 300) * 1.5
    else:
        assert want is None and not opt.switched


def test_switch_frees_the_factors_and_continues_the_base_state(torch_backend, caplog):
    model, data, _ = make_case("linear", 6)
    opt = MKORH(model, lr=0.01, inv_freq=1, switch_window=2)

    def closure(x, t):
        def run():
            opt.zero_grad()
            loss = mse(model(x), t)
            loss.backward()
            return loss
        return run

    for x, t in data[:3]:
        opt.step(closure(x, t))
    assert opt.window_means and not opt.switched  # closure losses are observed
    with caplog.at_level(logging.INFO, logger="kfopt.mkor"):
        opt.switch()
    assert opt.switched_at == 3 and "after 3 steps" in caplog.text
    assert opt.layers == [] and opt.capture._handles == []
    assert torch.equal(opt.state[model[0].weight]["step"], torch.tensor(3.0))

    base_model = copy.deepcopy(model)
    base = kfopt.LAMB(kfopt.param_groups(base_model, 0.01), lr=0.01)
    base.load_state_dict(opt.base.state_dict())
    for x, t in data[3:]:
        opt.step(closure(x, t))
        base.zero_grad()
        mse(base_model(x), t).backward()
        base.step()
    for p, q in zip(model.parameters(), base_model.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(opt.state[model[0].weight]["step"], torch.tensor(6.0))

    saved = opt.state_dict()
    assert saved["mkor"]["switched_at"] == 3 and saved["mkor"]["factors"] == {}
    fresh = MKORH(copy.deepcopy(model), lr=0.01)
    fresh.load_state_dict(saved)
    assert fresh.switched and fresh.switched_at == 3 and fresh.layers == []
    with pytest.raises(ValueError, match="switched"):
        fresh.load_state_dict(MKORH(copy.deepcopy(model)).state_dict())


def test_mkor_checkpoint_continues_as_mkorh(torch_backend):
    """An MKOR state dict loads into MKORH (the criterion starts afresh) and both continue alike."""
    model, data, _ = make_case("linear", 4)
    opt = MKOR(model, lr=0.01, inv_freq=2)
    train(opt, model, data[:2])
    other_model = copy.deepcopy(model)
    hybrid = MKORH(other_model, lr=0.01, inv_freq=2)
    hybrid.load_state_dict(opt.state_dict())
    assert hybrid.steps == 2 and not hybrid.switched and hybrid.window_means == []
    train(opt, model, data[2:])
    train(hybrid, other_model, data[2:])
    for p, q in zip(model.parameters(), other_model.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------ convergence


def test_converges_at_least_as_fast_per_step_as_lamb(torch_backend):
    """300 steps on scikit-learn's digits, same lr and batches: MKOR (LAMB base, defaults) ends lower."""
    mkor = digits_final_loss(lambda model: MKOR(model, lr=0.01))
    lamb = digits_final_loss(lambda model: kfopt.LAMB(kfopt.param_groups(model, 0.01), lr=0.01))
    assert mkor <= lamb, (mkor, lamb)
