"""kfopt.SINGD against an independent float64 implementation of docs/singd.md's equations.

The reference below works on dense float64 matrices only: its own hooks collect the layers' inputs and
output gradients, its own projections (masks and diagonal sums) stand for the structures, and the
update is docs/singd.md's, written out. Optimizer-level tests run on the PyTorch path
(KFOPT_BACKEND=torch) unless they are about the kernels.
"""

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_structures import project
from torch import nn

from kfopt.singd import SINGD, SINGDPreconditioner

STRUCTURE_PAIRS = [
    ("dense", "dense"),
    ("diagonal", "diagonal"),
    ("block4diagonal", "block2diagonal"),
    ("block30diagonal", "dense"),
    ("tril", "triu"),
    ("triltoeplitz", "triutoeplitz"),
    ("hierarchical2_3", "hierarchical1_1"),
    ("hierarchical15_15", "triltoeplitz"),
]


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("KFOPT_BACKEND", "torch")


# -- the independent reference ---------------------------------------------------------------------


def rows_of(module, x, g, kfac_approx):
    """(a, g, positions): input rows (bias column added later) and output-gradient rows of one call."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        a = patches.transpose(1, 2)  # (B, L, C k k)
        gg = g.flatten(2).transpose(1, 2)  # (B, L, C_out)
    else:
        a = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() > 1 else x[None, None]
        gg = g.reshape(g.shape[0], -1, g.shape[-1]) if g.dim() > 1 else g[None, None]
    positions = a.shape[1]
    if kfac_approx == "expand":
        return a.reshape(-1, a.shape[-1]), gg.reshape(-1, gg.shape[-1]), positions
    return a.mean(1), gg.sum(1), positions


class ReferenceSINGD:
    """Dense float64 SINGD (docs/singd.md) on a model; hooks of its own collect the rows."""

    def __init__(self, model, lr, momentum, damping, alpha1, weight_decay, T, loss_average, lr_cov, structures,
                 kfac_approx="expand", kfac_like=False, normalize_lr_cov=True):
        self.hp = dict(lr=lr, momentum=momentum, damping=damping, alpha1=0.0 if kfac_like else alpha1,
                       weight_decay=weight_decay, T=T, loss_average=loss_average, lr_cov=lr_cov,
                       kfac_approx=kfac_approx, kfac_like=kfac_like, normalize=normalize_lr_cov)
        self.structures = structures
        self.layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        owned = {id(p) for m in self.layers for p in m.parameters()}
        self.others = [p for p in model.parameters() if id(p) not in owned]
        self.state = {}
        for m in self.layers:
            d_k = m.weight[0].numel() + (m.bias is not None)
            d_c = m.weight.shape[0]
            self.state[m] = dict(K=torch.eye(d_k, dtype=torch.float64), C=torch.eye(d_c, dtype=torch.float64),
                                 mK=torch.zeros(d_k, d_k, dtype=torch.float64),
                                 mC=torch.zeros(d_c, d_c, dtype=torch.float64), calls=[])
            m.register_forward_hook(self._hook)
        self.buffers = {}
        self.steps = 0

    def _hook(self, module, inputs, output):
        if self.steps % self.hp["T"] != 0:
            return
        call = {"x": inputs[0].detach()}
        self.state[module]["calls"].append(call)
        output.register_hook(lambda g: call.__setitem__("g", g.detach()))

    def _statistics(self, m):
        st, hp = self.state[m], self.hp
        K, C = st["K"], st["C"]
        h_k = torch.zeros_like(K)
        h_c = torch.zeros_like(C)
        for call in st["calls"]:
            a, g, positions = rows_of(m, call["x"], call["g"], hp["kfac_approx"])
            if m.bias is not None:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
            batch = call["x"].shape[0]
            n = {None: 1, "batch": batch, "batch+sequence": batch * positions}[hp["loss_average"]]
            h_k += project(self.structures[0], K.T @ a.T @ a @ K) / a.shape[0]
            h_c += n * project(self.structures[1], C.T @ g.T @ g @ C)
        return h_k, h_c

    def step(self):
        hp = self.hp
        for m in self.layers:
            st = self.state[m]
            if self.steps % hp["T"] == 0 and st["calls"]:
                h_k, h_c = self._statistics(m)
                K, C = st["K"], st["C"]
                ktk = project(self.structures[0], K.T @ K)
                ctc = project(self.structures[1], C.T @ C)
                avg = lambda x: torch.trace(x) / x.shape[0]  # noqa: E731
                s = 0.5 * ((1 - hp["alpha1"]) if hp["normalize"] else 1.0)
                if hp["kfac_like"]:
                    step_k = h_k + hp["damping"] * ktk - torch.eye(len(K), dtype=K.dtype)
                    step_c = h_c + hp["damping"] * ctc - torch.eye(len(C), dtype=C.dtype)
                else:
                    step_k = avg(h_c) * h_k + hp["damping"] * avg(ctc) * ktk - torch.eye(len(K), dtype=K.dtype)
                    step_c = avg(h_k) * h_c + hp["damping"] * avg(ktk) * ctc - torch.eye(len(C), dtype=C.dtype)
                st["mK"] = hp["alpha1"] * st["mK"] + s * step_k
                st["mC"] = hp["alpha1"] * st["mC"] + s * step_c
                beta = hp["lr_cov"](self.steps) if callable(hp["lr_cov"]) else hp["lr_cov"]
                beta_k = beta / max(1.0, st["mK"].abs().max().item()) if hp["normalize"] else beta
                beta_c = beta / max(1.0, st["mC"].abs().max().item()) if hp["normalize"] else beta
                st["K"] = K @ (torch.eye(len(K), dtype=K.dtype) - beta_k * st["mK"])
                st["C"] = C @ (torch.eye(len(C), dtype=C.dtype) - beta_c * st["mC"])
            st["calls"] = []
            G = m.weight.grad.reshape(m.weight.shape[0], -1)
            if m.bias is not None:
                G = torch.cat([G, m.bias.grad[:, None]], dim=1)
            N = st["C"] @ st["C"].T @ G @ st["K"] @ st["K"].T
            parts = [(m.weight, N[:, :m.weight[0].numel()].reshape(m.weight.shape))]
            if m.bias is not None:
                parts.append((m.bias, N[:, -1]))
            for p, n in parts:
                self._sgd(p, n)
        for p in self.others:
            if p.grad is not None:
                self._sgd(p, p.grad)
        self.steps += 1

    def _sgd(self, p, direction):
        hp = self.hp
        d = direction + hp["weight_decay"] * p.detach()
        if hp["momentum"]:
            buf = self.buffers.get(p)
            buf = d if buf is None else hp["momentum"] * buf + d
            self.buffers[p] = buf
            d = buf
        with torch.no_grad():
            p -= hp["lr"] * d


# -- helpers -----------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, bias=True, d_in=5, hidden=6, d_out=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden, bias=bias)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, d_out, bias=bias)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


class SmallCNN(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2, bias=bias)
        self.fc = nn.Linear(3 * 3 * 3, 4, bias=bias)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def batches(steps, shape, d_out, seed=1, target_shape=None):
    """Random (inputs, targets); targets of shape ``target_shape`` or the inputs' with d_out features."""
    gen = torch.Generator().manual_seed(seed)
    target_shape = target_shape or (*shape[:-1], d_out)
    return [(torch.randn(*shape, generator=gen, dtype=torch.float64),
             torch.randn(*target_shape, generator=gen, dtype=torch.float64)) for _ in range(steps)]


def loss_fn(out, y, loss_average):
    err = (out - y).square().sum(-1)
    if loss_average is None:
        return err.sum()
    if loss_average == "batch":
        return err.sum() / err.shape[0]
    return err.mean()


def run_both(model, data, hp, steps_between_checks=1, loss_average="batch"):
    """Train a copy with SINGD and one with the reference on the same data; compare after every step."""
    ours = copy.deepcopy(model)
    ref_model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = SINGD(ours, loss_average=loss_average, **hp)
    ref = ReferenceSINGD(ref_model, loss_average=loss_average, **{k: v for k, v in hp.items()
                                                                  if k not in ("preconditioner_dtype",)})
    for x, y in data:
        for m, step in ((ours, opt.step), (ref_model, ref.step)):
            m.zero_grad()
            loss_fn(m(x), y, loss_average).backward()
            step()
        for (name, p), q in zip(ours.named_parameters(), ref_model.parameters()):
            err = ((p - q).norm() / q.norm()).item()
            assert err < 1e-10, f"{name}: relative difference {err:.2e} from the float64 equations"
    for name, layer in zip(opt.layers, ref.layers):
        K, C = opt.factors(name)
        for ours_f, ref_f in ((K.to_dense(), ref.state[layer]["K"]), (C.to_dense(), ref.state[layer]["C"])):
            assert torch.allclose(ours_f, ref_f, rtol=1e-10, atol=1e-12)
    return opt


# -- equations -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kfac_like", [False, True])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("structures", STRUCTURE_PAIRS, ids="-".join)
def test_matches_float64_equations(structures, bias, T, kfac_like, torch_backend):
    torch.manual_seed(0)
    model = MLP(bias=bias).double()
    hp = dict(lr=0.05, momentum=0.9, damping=5e-2, alpha1=0.5, weight_decay=1e-2, T=T, lr_cov=0.05,
              structures=structures, kfac_like=kfac_like, normalize_lr_cov=False)  # singd's factor step
    opt = run_both(model, batches(5, (8, 5), 3), hp)
    assert len(opt.layers) == 2
    K, _ = opt.factors("fc1")
    assert not torch.allclose(K.to_dense(), torch.eye(K.dim, dtype=torch.float64)), "K was never updated"


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("loss_average", [None, "batch", "batch+sequence"])
@pytest.mark.parametrize("structures", [("dense", "dense"), ("triltoeplitz", "block2diagonal")], ids="-".join)
def test_sequences_loss_average_and_kfac_approx(structures, loss_average, kfac_approx, torch_backend):
    """Linear layers on (batch, sequence, features) inputs: the shared dimension, both approximations."""
    torch.manual_seed(1)
    hp = dict(lr=0.01 if loss_average else 5e-4, momentum=0.5, damping=5e-2, alpha1=0.3, weight_decay=0.0, T=1,
              lr_cov=0.05, structures=structures, kfac_approx=kfac_approx)
    run_both(MLP().double(), batches(3, (4, 5, 5), 3), hp, loss_average=loss_average)


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d(bias, kfac_approx, torch_backend):
    torch.manual_seed(2)
    hp = dict(lr=0.05, momentum=0.9, damping=1e-3, alpha1=0.5, weight_decay=0.0, T=1, lr_cov=0.1,
              structures=("block5diagonal", "diagonal"), kfac_approx=kfac_approx)
    run_both(SmallCNN(bias).double(), batches(3, (4, 2, 6, 6), 4, target_shape=(4, 4)), hp,
             loss_average="batch+sequence" if kfac_approx == "expand" else "batch")


def test_normalized_and_scheduled_lr_cov(torch_backend):
    torch.manual_seed(3)
    hp = dict(lr=0.05, momentum=0.0, damping=1e-2, alpha1=0.5, weight_decay=1e-3, T=2,
              lr_cov=lambda step: 0.5 / (1 + step), structures=("tril", "hierarchical1_1"), normalize_lr_cov=True)
    run_both(MLP().double(), batches(5, (8, 5), 3), hp)


def test_kfac_like_converges_to_damped_inverse(torch_backend):
    """Design page's sanity result: with kfac_like and a fixed batch, K K^T -> (A + damping I)^{-1} (a
    mean loss keeps C's update stable and its statistics finite: no step is skipped)."""
    torch.manual_seed(4)
    layer = nn.Linear(4, 2, bias=False).double()
    x = torch.randn(32, 4, dtype=torch.float64)
    opt = SINGD(layer, lr=0.0, momentum=0.0, damping=0.1, kfac_like=True, alpha1=0.0, T=1, lr_cov=0.2)
    for _ in range(300):
        opt.zero_grad()
        (layer(x).sum() / 32).backward()
        opt.step()
    assert opt.skipped_steps.item() == 0
    K, _ = opt.factors("")
    kkt = K.to_dense() @ K.to_dense().T
    target = torch.linalg.inv(x.T @ x / 32 + 0.1 * torch.eye(4, dtype=torch.float64))
    assert torch.allclose(kkt, target, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("loss_average", [None, "batch"])
def test_rank_average_of_statistics_equals_the_global_batch(loss_average, torch_backend, monkeypatch):
    """Two ranks holding the same local batch x, simulated in one process (the all-reduce average of
    equal tensors is the tensor itself), against the single-process run on the global batch [x; x]:
    for a mean loss the averaged statistics are the global ones; for a summed loss (loss_average=None)
    H_C must be summed over the ranks (the global H_C is twice a rank's). DDP averages the gradients,
    so the single-process run of a summed loss takes lr / world (N is linear in the gradient, no
    weight decay): factors and parameters then agree after every step."""
    from kfopt import collectives

    hp = dict(momentum=0.9, damping=5e-2, alpha1=0.5, weight_decay=0.0, T=1, lr_cov=0.01,
              structures=("dense", "triltoeplitz"), loss_average=loss_average)
    lr, world = 0.01 if loss_average else 5e-4, 2
    torch.manual_seed(4)
    model = MLP().double()
    data = batches(3, (4, 5), 3, seed=5)
    single = copy.deepcopy(model)
    single_opt = SINGD(single, lr=lr / world if loss_average is None else lr, **hp)
    for x, y in data:
        single.zero_grad()
        loss_fn(single(torch.cat([x, x])), torch.cat([y, y]), loss_average).backward()
        single_opt.step()

    class Done:
        def wait(self):
            return None

    monkeypatch.setattr(collectives, "is_distributed", lambda: True)
    monkeypatch.setattr(collectives, "world_size", lambda group=None: world)
    monkeypatch.setattr(collectives, "all_reduce_average_async", lambda tensors, *args, **kwargs: Done())
    opt = SINGD(model, lr=lr, **hp)
    for x, y in data:
        model.zero_grad()
        loss_fn(model(x), y, loss_average).backward()
        opt.step()
    for name in opt.layers:
        for ours, want in zip(opt.factors(name), single_opt.factors(name)):
            ours, want = ours.to_dense(), want.to_dense()
            assert torch.isfinite(want).all() and not torch.allclose(want, torch.eye(len(want), dtype=want.dtype))
            assert torch.allclose(ours, want, rtol=1e-10, atol=1e-12), f"{name}: factors"
    for p, q in zip(model.parameters(), single.parameters()):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-12), "parameters differ from the global batch run"


@pytest.mark.parametrize("structures", [("dense", "dense"), ("block2diagonal", "triltoeplitz")])
def test_the_standalone_preconditioner_with_torch_sgd_is_singd(structures, torch_backend):
    """SINGDPreconditioner in front of torch.optim.SGD (momentum, weight decay) takes SINGD's steps bit for
    bit (factor updates at steps 0 and 2; LayerNorm's parameters raw SGD in both); its state_dict round
    trip continues bit-identically."""
    torch.manual_seed(3)
    model = MLP()
    hand, resumed = copy.deepcopy(model), copy.deepcopy(model)
    hp = dict(damping=1e-2, alpha1=0.5, T=2, lr_cov=0.05, structures=structures)
    opt = SINGD(model, lr=0.05, momentum=0.9, weight_decay=1e-3, **hp)
    precond = SINGDPreconditioner(hand, **hp)
    sgd = torch.optim.SGD(hand.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    data = [(x.float(), y.float()) for x, y in batches(5, (6, 5), 3, seed=8)]
    for step, (x, y) in enumerate(data):
        if step == 3:  # resume from a checkpoint of the standalone pair
            resumed.load_state_dict(hand.state_dict())
            other = SINGDPreconditioner(resumed, **hp)
            other.load_state_dict(precond.state_dict())
            other_sgd = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
            other_sgd.load_state_dict(copy.deepcopy(sgd.state_dict()))  # torch's load aliases the buffers
        pairs = [(opt, model, None), (sgd, hand, precond)] + ([(other_sgd, resumed, other)] if step >= 3 else [])
        for o, m, pre in pairs:
            o.zero_grad()
            loss_fn(m(x), y, "batch").backward()
            if pre is not None:
                pre.step()
            o.step()
    assert precond.steps == opt.steps == 5
    for name in opt.layers:
        ours, theirs = opt.factors(name), precond.factors(name)
        assert not torch.equal(theirs[0].to_dense(), torch.eye(len(theirs[0].to_dense())))
        for a, b in zip(ours, theirs):
            assert torch.equal(a.to_dense(), b.to_dense())
    for p, q, r in zip(model.parameters(), hand.parameters(), resumed.parameters()):
        assert torch.equal(p, q) and torch.equal(q, r)


def test_the_standalone_preconditioner_changes_nothing_on_a_non_finite_step(torch_backend):
    """A NaN gradient: factors and the raw gradients stay as they were (a step counted all the same)."""
    torch.manual_seed(3)
    model = MLP()
    precond = SINGDPreconditioner(model, T=1)
    x, y = batches(1, (6, 5), 3)[0]
    loss_fn(model(x.float()), y.float(), "batch").backward()
    model.fc1.weight.grad[0, 0] = math.nan
    grads = [p.grad.clone() for p in model.parameters()]
    factors = [f.to_dense().clone() for name in precond.layers for f in precond.factors(name)]
    precond.step()
    assert precond.steps == 1
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad.isnan(), g.isnan()) and torch.equal(p.grad.nan_to_num(), g.nan_to_num())
    for f, before in zip([f.to_dense() for name in precond.layers for f in precond.factors(name)], factors):
        assert torch.equal(f, before)


def test_micro_batches_and_repeated_calls_sum_statistics(torch_backend):
    """Two micro-batches before one step: H sums over the captured calls (as the reference does)."""
    torch.manual_seed(5)
    model = MLP().double()
    ours, ref_model = copy.deepcopy(model), copy.deepcopy(model)
    hp = dict(lr=0.05, momentum=0.9, damping=1e-2, alpha1=0.5, weight_decay=0.0, T=1, lr_cov=0.1,
              structures=("block3diagonal", "tril"))
    opt = SINGD(ours, **hp)
    ref = ReferenceSINGD(ref_model, loss_average="batch", **hp)
    for x, y in batches(3, (8, 5), 3):
        for m, step in ((ours, opt.step), (ref_model, ref.step)):
            m.zero_grad()
            for xs, ys in zip(x.split(4), y.split(4)):
                (loss_fn(m(xs), ys, "batch") / 2).backward()
            step()
        for p, q in zip(ours.parameters(), ref_model.parameters()):
            assert torch.allclose(p, q, rtol=1e-10, atol=1e-12)


# -- param groups, other parameters, validation --------------------------------------------------------


def test_param_groups_other_params_and_skip_layers(torch_backend):
    """Per-group structures and hyperparameters; parameters outside preconditioned layers (the norm, a
    skipped layer) take SGD with momentum on their raw gradients."""
    torch.manual_seed(6)
    model = MLP().double()
    groups = [{"params": list(model.fc1.parameters()), "structures": ("diagonal", "tril"), "lr": 0.1},
              {"params": list(model.fc2.parameters()) + list(model.norm.parameters()), "momentum": 0.5}]
    opt = SINGD(model, groups, lr=0.05, momentum=0.9, skip_layers=["fc2"], T=1)
    assert opt.layers == ["fc1"]
    assert opt.factors("fc1")[0].spec.name == "diagonal"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = batches(1, (8, 5), 3)[0]
    loss_fn(model(x), y, "batch").backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for name in ("fc2.weight", "fc2.bias", "norm.weight", "norm.bias"):  # first step: buf = g, w -= lr g
        assert torch.allclose(model.get_parameter(name), before[name] - 0.05 * grads[name], rtol=1e-12)
    assert not torch.allclose(model.fc1.weight, before["fc1.weight"] - 0.1 * grads["fc1.weight"])


def test_layers_outside_params_are_not_hooked(torch_backend):
    model = MLP().double()
    opt = SINGD(model, params=list(model.fc2.parameters()))
    assert opt.layers == ["fc2"]
    x, y = batches(1, (8, 5), 3)[0]
    before = model.fc1.weight.detach().clone()
    loss_fn(model(x), y, "batch").backward()
    opt.step()
    assert torch.equal(model.fc1.weight, before)


def test_weight_and_bias_in_different_groups_raise():
    model = MLP()
    with pytest.raises(ValueError, match="weight and bias"):
        SINGD(model, [{"params": [model.fc1.weight]}, {"params": [model.fc1.bias]}])


def test_kfac_like_forces_alpha1_zero_with_a_warning():
    with pytest.warns(UserWarning, match="alpha1"):
        opt = SINGD(MLP(), kfac_like=True, alpha1=0.5)
    assert opt.param_groups[0]["alpha1"] == 0.0


# -- state_dict -----------------------------------------------------------------------------------------


def test_state_dict_callable_lr_cov_and_mismatched_structures(torch_backend):
    schedule = lambda step: 0.1  # noqa: E731
    opt = SINGD(MLP(), lr_cov=schedule)
    state = opt.state_dict()
    assert state["param_groups"][0]["lr_cov"] is None
    opt.load_state_dict(state)
    assert opt.param_groups[0]["lr_cov"] is schedule
    other = SINGD(MLP(), structures=("diagonal", "dense"))
    with pytest.raises(ValueError, match="structures"):
        other.load_state_dict(state)


# -- dtypes, kernels, AMP ---------------------------------------------------------------------------------


def char_batches(steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 4, generator=gen)
    out = []
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen)
        out.append((x, torch.tanh(x @ w)))
    return out


@pytest.mark.parametrize("structures, model_dtype", [(("dense", "dense"), torch.float32),
                                                     (("triltoeplitz", "diagonal"), torch.float32),
                                                     (("block8diagonal", "triu"), torch.bfloat16)],
                         ids=["dense", "toeplitz-diagonal", "bf16-model"])
def test_bf16_factors_200_steps_stay_finite_and_reduce_the_loss(structures, model_dtype, torch_backend):
    """Factors (and momenta) stored in bf16 -- with an fp32 model via preconditioner_dtype, or a bf16 model."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 4)).to(model_dtype)
    factor_dtype = torch.bfloat16 if model_dtype == torch.float32 else None
    opt = SINGD(model, lr=0.02, momentum=0.9, T=1, lr_cov=0.05, damping=0.1, structures=structures,
                preconditioner_dtype=(factor_dtype, factor_dtype))
    losses = []
    for x, y in char_batches(200):
        opt.zero_grad()
        loss = (model(x.to(model_dtype)).float() - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    K, C = opt.factors("0")
    m_k, m_c = opt.momenta("0")
    assert {t.dtype for s in (K, C, m_k, m_c) for t in s.tensors} == {torch.bfloat16}
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(t).all() for s in (K, C, m_k, m_c) for t in s.tensors)
    assert sum(losses[-20:]) / 20 < 0.1 * sum(losses[:20]) / 20


@pytest.mark.parametrize("structures", [("dense", "block3diagonal"), ("tril", "triutoeplitz"),
                                        ("hierarchical2_2", "diagonal")], ids="-".join)
def test_triton_kernels_path_matches_torch_path(structures, monkeypatch):
    """The optimizer on the kernels (interpreted) equals the PyTorch path within fp32 accuracy."""
    torch.manual_seed(9)
    model = MLP(d_in=5, hidden=7, d_out=3)
    data = [(x.float(), y.float()) for x, y in batches(3, (6, 5), 3)]
    params = []
    for backend in ("triton", "torch"):
        monkeypatch.setenv("KFOPT_BACKEND", backend)
        m = copy.deepcopy(model)
        opt = SINGD(m, lr=0.1, T=1, lr_cov=0.2, damping=1e-2, structures=structures)
        for x, y in data:
            m.zero_grad()
            loss_fn(m(x), y, "batch").backward()
            opt.step()
        params.append([p.detach().clone() for p in m.parameters()])
    for p, q in zip(*params):
        assert ((p - q).norm() / q.norm()).item() < 1e-5


def test_grad_scaler_skips_inf_steps_and_unscales(torch_backend):
    """A GradScaler run equals the unscaled run; an inf step changes nothing and drops its statistics."""
    torch.manual_seed(10)
    model = MLP().double()
    data = batches(4, (8, 5), 3)
    hp = dict(lr=0.05, T=1, lr_cov=0.1, damping=1e-2, structures=("block2diagonal", "dense"))
    plain = copy.deepcopy(model)
    opt_plain = SINGD(plain, **hp)
    for x, y in data:
        plain.zero_grad()
        loss_fn(plain(x), y, "batch").backward()
        opt_plain.step()

    for with_scaler_arg in (False, True):
        scaled = copy.deepcopy(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
        opt = SINGD(scaled, grad_scaler=scaler if with_scaler_arg else None, **hp)
        x0, y0 = data[0]
        scaled.zero_grad()
        scaler.scale(loss_fn(scaled(x0), y0, "batch") * float("inf")).backward()
        before = [p.detach().clone() for p in scaled.parameters()]
        scaler.step(opt)
        scaler.update()
        assert int(opt.skipped_steps) == 1 and opt.steps == 1
        assert all(torch.equal(p, q) for p, q in zip(scaled.parameters(), before))
        assert torch.equal(opt.factors("fc1")[0].to_dense(), torch.eye(6, dtype=torch.float64))
        for x, y in data:
            scaled.zero_grad()
            scaler.scale(loss_fn(scaled(x), y, "batch")).backward()
            if with_scaler_arg:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        # grad_scaler=: the capture hands over unscaled output gradients in fp32 (kfopt.capture, AMP)
        rtol = 1e-6 if with_scaler_arg else 1e-12
        for p, q in zip(scaled.parameters(), plain.parameters()):
            assert torch.allclose(p, q, rtol=rtol, atol=1e-12)


def snapshot(model, opt):
    """Parameters and every optimizer state tensor, cloned."""
    state = {(i, k): v.clone() for i, values in opt.state_dict()["state"].items() for k, v in values.items()}
    return [p.detach().clone() for p in model.parameters()], state


def assert_unchanged(model, opt, before):
    params, state = snapshot(model, opt)
    assert all(torch.equal(p, q) for p, q in zip(params, before[0])), "a parameter changed"
    assert state.keys() == before[1].keys()
    changed = [key for key, t in state.items() if not torch.equal(t, before[1][key])]
    assert not changed, f"optimizer state changed: {changed}"


def train_step(model, opt, x, y, poison=None):
    """One step on (x, y); ``poison(model)`` edits the gradients before it."""
    opt.zero_grad()
    loss_fn(model(x), y, "batch").backward()
    if poison is not None:
        poison(model)
    opt.step()


def test_non_finite_statistics_skip_the_step(torch_backend):
    """An input of 1e200: finite gradients (a linear loss), but ``H_K`` overflows to inf; nothing changes."""
    torch.manual_seed(14)
    layer = nn.Linear(3, 2).double()
    opt = SINGD(layer, lr=0.1, momentum=0.9, alpha1=0.5, T=1, lr_cov=0.1)
    x = torch.randn(4, 3, dtype=torch.float64)
    for rows in (x, torch.cat([x[:1] * 1e200, x[1:]])):
        before = snapshot(layer, opt)
        opt.zero_grad()
        layer(rows).sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
        opt.step()
    assert_unchanged(layer, opt, before)
    assert opt.skipped_steps.item() == 1 and opt.steps == 2


def test_unscale_without_grad_scaler_argument_raises(torch_backend):
    model = MLP().double()
    opt = SINGD(model, T=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    x, y = batches(1, (8, 5), 3)[0]
    scaler.scale(loss_fn(model(x), y, "batch")).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="grad_scaler"):
        scaler.step(opt)


def test_autocast_bf16_trains(torch_backend):
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = SINGD(model, lr=0.02, T=2, lr_cov=0.05, damping=0.1, structures=("block8diagonal", "triutoeplitz"))
    losses = []
    for x, y in char_batches(60):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        loss = (out.float() - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) < 0.6 * sum(losses[:10])


@pytest.mark.parametrize("with_scaler_arg", [False, True], ids=["u-correction", "grad_scaler"])
def test_autocast_fp16_with_grad_scaler_trains(with_scaler_arg, torch_backend):
    """fp16 autocast and a GradScaler at 2^16: statistics unscaled exactly (grad_scaler=) or corrected by
    u = 1 / scale^2 in the momentum update; training stays finite and the loss falls."""
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 4))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    opt = SINGD(model, lr=0.02, T=1, lr_cov=0.05, damping=0.1, structures=("dense", "triltoeplitz"),
                grad_scaler=scaler if with_scaler_arg else None)
    losses = []
    for x, y in char_batches(60):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
        loss = (out.float() - y).square().mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    K, C = opt.factors("2")
    assert all(torch.isfinite(t).all() for t in K.tensors + C.tensors)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) < 0.3 * sum(losses[:10])


def test_float64_factors_need_the_pytorch_path():
    """Under the interpreter the kernels run: they take fp32/bf16/fp16 factors only."""
    with pytest.raises(ValueError, match="preconditioner_dtype"):
        SINGD(MLP(), preconditioner_dtype=(torch.float64, None))


# ----------------------------------------------------------------------------- robust defaults


def ill_conditioned_least_squares(cond=1e4, d=20, k=5, n=256):
    """Inputs whose Gram matrix ``x^T x / n`` has condition number ~``cond`` (singular values of x spread
    geometrically over ``sqrt(cond)``, largest ~``sqrt(cond)``), exact linear targets."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    x = torch.randn(n, d, generator=gen) @ torch.diag(torch.logspace(0, 0.5 * math.log10(cond), d)) @ q.T
    return x, x @ torch.randn(d, k, generator=gen)


def train_least_squares(steps, **hp):
    x, y = ill_conditioned_least_squares()
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], y.shape[1])
    opt = SINGD(model, **hp)
    losses, weights_finite, factors_finite = [], [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        weights_finite.append(all(bool(torch.isfinite(p).all()) for p in model.parameters()))
        K, C = opt.factors("")
        factors_finite.append(all(bool(torch.isfinite(t).all()) for t in K.tensors + C.tensors))
    return opt, losses, weights_finite, factors_finite


@pytest.mark.parametrize("graft", ["none", "adam"])
def test_singd_defaults_on_an_ill_conditioned_problem_never_write_non_finite_values(graft, torch_backend):
    """singd 0.0.5's defaults (normalize_lr_cov=False) on least squares with condition number 1e4: the first
    factor update overflows (the reference turns the weights into NaN). Weights and factors stay finite at
    every step, the blown-up steps are counted, and reading ``skipped_steps`` warns once."""
    opt, losses, weights_finite, factors_finite = train_least_squares(30, normalize_lr_cov=False, graft=graft)
    assert all(weights_finite) and all(factors_finite)
    assert int(opt.blown_up_steps) > 0
    with pytest.warns(RuntimeWarning, match="update was not finite"):
        skipped = int(opt.skipped_steps)
    assert skipped >= int(opt.blown_up_steps)  # (plus steps whose gradients overflowed: the inputs' skips)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        int(opt.skipped_steps)  # once only
    assert torch.equal(opt.state_dict()["blown_up_steps"], opt.blown_up_steps)  # checkpointed


def test_a_blown_up_factor_update_keeps_the_last_finite_factors(torch_backend):
    """The first step whose factor update overflows (the factors themselves or the natural gradient they
    give) changes neither the factors, their momenta nor the weights."""
    x, y = ill_conditioned_least_squares()
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], y.shape[1])
    opt = SINGD(model, normalize_lr_cov=False, graft="adam")  # (grafted: the weights stay moderate)

    def everything():
        m_K, m_C = opt.momenta("")
        return [*model.parameters(), *opt.factors("")[0].tensors, *opt.factors("")[1].tensors,
                *(m_K.tensors if m_K is not None else []), *(m_C.tensors if m_C is not None else [])]

    for step in range(30):
        before = [t.clone() for t in everything()]
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
        if int(opt.blown_up_steps):
            break
    assert int(opt.blown_up_steps) == 1, "no factor update blew up"
    after = everything()
    assert len(before) >= 4
    for t, b in zip(after, before):
        assert torch.equal(t, b)
    for m in after[len(before):]:  # factor momenta first needed in the skipped step: created as zeros
        assert torch.equal(m, torch.zeros_like(m))


def test_default_settings_train_the_ill_conditioned_problem(torch_backend):
    """kfopt's defaults (normalize_lr_cov=True, everything else singd's) train it without tuning."""
    opt, losses, weights_finite, _ = train_least_squares(200)
    assert all(weights_finite) and int(opt.skipped_steps) == 0
    assert losses[-1] < 1e-4 * losses[0], (losses[0], losses[-1])


# -- the base optimizer (kfopt.composed) ------------------------------------------------------------------


def test_torch_sgd_as_base_takes_the_default_bases_update(torch_backend):
    """``base="sgd"``: torch's SGD behind the same preconditioner is the default base's update (float64:
    ``N`` in ``.grad`` is not rounded), its buffer in the base's state, the factors in SINGD's own dict."""
    torch.manual_seed(0)
    model = MLP().double()
    twin = copy.deepcopy(model)
    hp = dict(lr=0.05, momentum=0.9, weight_decay=1e-2, T=2, lr_cov=0.1, damping=1e-2)
    default, sgd = SINGD(model, **hp), SINGD(twin, base="sgd", **hp)
    assert isinstance(sgd.base, torch.optim.SGD) and sgd.base.state is sgd.state
    for x, y in batches(5, (8, 5), 3):
        for m, o in ((model, default), (twin, sgd)):
            o.zero_grad()
            loss_fn(m(x), y, "batch").backward()
            o.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert set(sgd.state[twin.fc1.weight]) == {"momentum_buffer"}
    saved = sgd.state_dict()
    assert saved["base_optimizer"] == "SGD" and "K.mat" in saved["state"][0]


@pytest.mark.parametrize("base", ["sgd", "adamw", "lamb"])
def test_a_base_without_a_device_verdict_is_not_stepped_on_a_skipped_step(base, torch_backend):
    """Torch's bases (and LAMB) take no verdict: SINGD reads it on the host and does not step them, so a
    NaN gradient and a blown-up factor update change nothing (weights, the base's state, factors, momenta)
    and count once in ``skipped_steps`` (the blow-up in ``blown_up_steps`` too)."""
    torch.manual_seed(0)
    model = MLP()
    opt = SINGD(model, base=base, lr=0.01, T=1, lr_cov=0.1, damping=1e-2)
    data = [(x.float(), y.float()) for x, y in batches(4, (8, 5), 3)]
    train_step(model, opt, *data[0])
    before = snapshot(model, opt)
    train_step(model, opt, *data[1], poison=lambda m: m.fc2.weight.grad.view(-1)[0].fill_(float("nan")))
    assert_unchanged(model, opt, before)
    assert int(opt.skipped_steps) == 1 and int(opt.blown_up_steps) == 0
    opt.param_groups[0]["lr_cov"] = 1e30  # with normalize_lr_cov=False: the new factors overflow
    opt.param_groups[0]["normalize_lr_cov"] = False
    train_step(model, opt, *data[2])
    assert_unchanged(model, opt, before)
    with pytest.warns(RuntimeWarning, match="not finite"):
        assert int(opt.skipped_steps) == 2
    assert int(opt.blown_up_steps) == 1
    opt.param_groups[0]["lr_cov"] = 0.1
    train_step(model, opt, *data[3])
    assert not torch.equal(model.fc1.weight, before[0][0])


def test_a_checkpoint_with_another_base_round_trips_and_loads_into_that_base_only(torch_backend):
    torch.manual_seed(0)
    model = MLP()
    twin = copy.deepcopy(model)
    opt = SINGD(model, base="adamw", lr=0.01, T=1, lr_cov=0.1)
    data = [(x.float(), y.float()) for x, y in batches(4, (8, 5), 3)]
    for x, y in data[:2]:
        train_step(model, opt, x, y)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    with pytest.raises(ValueError, match="base optimizer is 'AdamW'"):
        SINGD(copy.deepcopy(twin), lr=0.01, T=1, lr_cov=0.1).load_state_dict(saved["opt"])
    with pytest.raises(ValueError, match="base optimizer is 'HeavyBall'"):
        opt.load_state_dict({k: v for k, v in saved["opt"].items() if k != "base_optimizer"})
    twin.load_state_dict(saved["model"])
    resumed = SINGD(twin, base="adamw", lr=0.05, T=1, lr_cov=0.1)
    resumed.load_state_dict(saved["opt"])
    assert set(resumed.state[twin.fc1.weight]) == {"step", "exp_avg", "exp_avg_sq"}
    for x, y in data[2:]:
        train_step(model, opt, x, y)
        train_step(twin, resumed, x, y)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_the_default_bases_checkpoint_is_singds_format_from_before_base(torch_backend):
    """With the default base the checkpoint holds exactly the entries SINGD's held before it had a base
    (factors and momenta beside ``momentum_buffer`` in the weight's state; no ``base_optimizer``), so those
    checkpoints load (``tests/contracts`` resumes them bit-identically)."""
    torch.manual_seed(0)
    model = MLP()
    opt = SINGD(model, T=1)
    train_step(model, opt, *[(x.float(), y.float()) for x, y in batches(1, (8, 5), 3)][0])
    saved = opt.state_dict()
    assert set(saved) == {"state", "param_groups", "kfopt_optimizer", "skipped_steps", "blown_up_steps", "steps",
                          "last_grad_scale"}
    assert set(saved["state"][0]) == {"momentum_buffer", "K.mat", "C.mat", "m_K.mat", "m_C.mat"}
    assert set(saved["state"][1]) == {"momentum_buffer"}
    assert opt.state[model.fc1.weight]["K.mat"] is opt.factors("fc1")[0].tensors[0]


def test_distributed_state_dict_of_a_singd_without_state_takes_no_step(torch_backend):
    """No preconditioned layer and momentum 0 leave the state empty, so DCP's ``get_optimizer_state_dict``
    takes its zero step (zero gradients, lr 0) to create it: the base optimizer's alone, not a SINGD step
    (``steps`` stays 0, no statistics consumed)."""
    torch.manual_seed(0)
    model = MLP()
    opt = SINGD(model, momentum=0.0, skip_layers=(nn.Linear,))
    before = [p.detach().clone() for p in model.parameters()]
    saved = opt.distributed_state_dict()
    assert opt.steps == 0 and saved["singd"]["steps"] == 0 and int(opt.skipped_steps) == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_a_param_group_added_later_gets_the_first_order_rule(torch_backend):
    """Layers are selected at construction; a group added afterwards is stepped by the base optimizer
    (``d = g``: momentum 0 and no weight decay in the new group), the base's defaults filling it."""
    torch.manual_seed(0)
    model = MLP()
    extra = nn.Parameter(torch.randn(4))
    opt = SINGD(model, T=1)
    opt.add_param_group({"params": [extra], "lr": 0.5, "momentum": 0.0})
    assert opt.base.param_groups is opt.param_groups and opt.layers == ["fc1", "fc2"]
    x, y = [(x.float(), y.float()) for x, y in batches(1, (8, 5), 3)][0]
    opt.zero_grad()
    (loss_fn(model(x), y, "batch") + extra.square().sum()).backward()
    before, grad = extra.detach().clone(), extra.grad.clone()
    opt.step()
    assert torch.equal(extra.detach(), before - 0.5 * grad)
