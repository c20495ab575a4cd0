"""The ``torch.optim.Optimizer`` contract: closures, LR schedulers, ``zero_grad``, parameters that get
no gradient, and (where the entry promises it) a non-finite gradient that skips the whole step.

Every entry of the registry, on the PyTorch path (the kernels' own equivalence to it is tested per
kernel family); the non-finite skip also under the Triton interpreter, once per optimizer module.
"""

import inspect

import pytest
import torch
from torch import nn

from kfopt.registry import REGISTRY

from .conftest import use_backend
from .helpers import assert_same_params, assert_same_tree, backward, batch, clone_tree, one_per_module, train_step

pytestmark = pytest.mark.usefixtures("torch_path")

SKIPPING = [name for name, entry in REGISTRY.items() if entry.skips_non_finite]


class WithUnusedHead(nn.Module):
    """Two Linear layers in use, a ``gain`` outside any layer (first-order for the Kronecker-factored
    optimizers), and a layer (``unused``) that is never called: its parameters are in the optimizer but
    never get a gradient, as a frozen or unused head in a real model."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 3))
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        return self.body(x) * self.gain


def without_counters(tree):
    """A state dict without its step counters: the skip counts (checked on their own) and the
    preconditioners' ``steps`` (SINGD's and MKOR's count skipped steps too, as SINGD's reference does:
    their update intervals run on steps taken)."""
    if isinstance(tree, dict):
        return {k: without_counters(v) for k, v in tree.items()
                if not (isinstance(k, str) and (k.endswith("skipped_steps") or k == "steps"))}
    return tree


def test_closure_scheduler_zero_grad_and_parameters_without_gradients(entry):
    model = WithUnusedHead()
    opt = entry.build(model)
    lrs = [group["lr"] for group in opt.param_groups]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    unused_before = [p.detach().clone() for p in model.unused.parameters()]
    x, y = batch(0)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    losses = []
    for _ in range(4):
        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor), "step(closure) returns the closure's loss"
        losses.append(float(loss.detach()))
        sched.step()
    assert len(calls) >= 4
    assert [group["lr"] for group in opt.param_groups] == pytest.approx([lr * 0.5 ** 4 for lr in lrs])
    for p, before in zip(model.unused.parameters(), unused_before):
        assert torch.equal(p, before), "a parameter without a gradient changed"
        if entry.kind == "elementwise":  # (a Kronecker-factored layer's factors exist from construction)
            assert not opt.state.get(p), "a parameter without a gradient got optimizer state"
    assert losses[-1] < losses[0], f"{entry.name} did not reduce the loss of a tiny problem: {losses}"
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_a_step_with_a_closure_equals_a_step_after_backward(entry):
    """``step(closure)`` returns the closure's loss, and the weights are those of ``backward(); step()``."""
    model, twin_model = WithUnusedHead(), WithUnusedHead()
    opt, twin = entry.build(model), entry.build(twin_model)
    for step in range(2):
        x, y = batch(step)

        def closure():
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss

        loss = opt.step(closure)
        twin.zero_grad()
        twin_loss = ((twin_model(x) - y) ** 2).mean()
        twin_loss.backward()
        twin.step()
        assert torch.equal(loss, twin_loss)
        assert_same_params(model, twin_model, f"step {step}: ")


@pytest.mark.parametrize("name", [name for name, entry in REGISTRY.items() if entry.composed])
def test_a_composed_optimizer_takes_its_param_groups_from_the_model(name):
    """``add_param_group`` raises (parameters come from the model; SINGD, whose ``params`` are the user's,
    takes a later group into the list its base shares), and a callable base must build its optimizer from
    the param groups it is given."""
    entry = REGISTRY[name]
    model = WithUnusedHead()
    opt = entry.build(model)
    if "params" in inspect.signature(entry.cls).parameters:
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))]})
        assert opt.base.param_groups is opt.param_groups and len(opt.param_groups) == 2
    else:
        with pytest.raises(NotImplementedError, match="model"):
            opt.add_param_group({"params": [nn.Parameter(torch.ones(2))]})
    with pytest.raises(ValueError, match="param groups it is given"):
        entry.build(WithUnusedHead(), base=lambda groups: torch.optim.SGD(model.parameters(), lr=0.1))


def test_the_scheduled_lr_is_the_lr_the_step_uses(entry):
    """A scheduler's lr and the same lr set by hand give bit-identical steps (the step reads the group)."""
    scheduled_model, hand_model = WithUnusedHead(), WithUnusedHead()
    scheduled, hand = entry.build(scheduled_model), entry.build(hand_model)
    lr0 = scheduled.param_groups[0]["lr"]
    sched = torch.optim.lr_scheduler.LambdaLR(scheduled, lambda t: 1.0 / (1 + t))
    for t in range(3):
        for group in hand.param_groups:
            group["lr"] = lr0 / (1 + t)
        train_step(scheduled_model, scheduled, t)
        train_step(hand_model, hand, t)
        sched.step()
    assert_same_params(scheduled_model, hand_model)


def _steps_counters(tree, found=None):
    """The ``steps`` counters of a state dict (the preconditioners' step counts)."""
    found = [] if found is None else found
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == "steps":
                found.append(v)
            else:
                _steps_counters(v, found)
    return found


#: the poisoned gradient: of a preconditioned layer's weight, of a bias, of a parameter outside any layer
POISONED = ["body.2.weight", "body.0.bias", "gain"]
NON_FINITE_CASES = (
    [(name, "torch", bad, param, intervals) for name in SKIPPING for bad in ("nan", "inf") for param in POISONED
     for intervals in ("default", "every-step")]
    + [(name, "triton", "nan", "body.0.bias", "every-step") for name in one_per_module() if name in SKIPPING])


@pytest.mark.parametrize(("name", "backend", "bad", "param", "intervals"), NON_FINITE_CASES,
                         ids=["-".join(case) for case in NON_FINITE_CASES])
def test_a_non_finite_gradient_skips_the_whole_step_and_counts(name, backend, bad, param, intervals, monkeypatch):
    """Weights and state unchanged bit for bit but for the counters (``skipped_steps`` + 1, the
    preconditioners' ``steps`` + 1: their intervals run on steps taken), and the next step that of an
    optimizer that never saw the bad gradient (weights and state). ``every-step`` intervals make the
    skipped step one that updates factors and second-order data."""
    use_backend(monkeypatch, backend)
    entry = REGISTRY[name]
    overrides = {key: 1 for key in entry.intervals} if intervals == "every-step" else {}
    model, twin_model = WithUnusedHead(), WithUnusedHead()
    opt, twin = entry.build(model, **overrides), entry.build(twin_model, **overrides)
    train_step(model, opt, 0)
    train_step(twin_model, twin, 0)
    params_before = [p.detach().clone() for p in model.parameters()]
    state_before = clone_tree(opt.state_dict())
    opt.zero_grad()
    backward(model, 1)
    model.get_parameter(param).grad.view(-1)[0] = float(bad)
    opt.step()
    assert int(opt.skipped_steps) == 1
    for p, before in zip(model.parameters(), params_before):
        assert torch.equal(p, before), "a skipped step changed a weight"
    state_after = opt.state_dict()
    assert_same_tree(without_counters(state_after), without_counters(state_before))
    # one skip in the checkpoint's counters (a composed optimizer's base and own parts add up)
    assert sum(int(v) for k, v in state_after.items() if k == "skipped_steps" or k.endswith("_skipped_steps")) == 1
    assert _steps_counters(state_after) == [steps + 1 for steps in _steps_counters(state_before)]
    # the next finite step is the step of an optimizer that never saw the bad gradient
    train_step(model, opt, 2)
    train_step(twin_model, twin, 2)
    assert_same_params(model, twin_model)
    assert_same_tree(without_counters(opt.state_dict()), without_counters(twin.state_dict()))
