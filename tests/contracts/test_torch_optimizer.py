"""The ``torch.optim.Optimizer`` contract: closures, LR schedulers, ``zero_grad``, parameters that get
no gradient, and (where the entry promises it) a non-finite gradient that skips the whole step.

Every entry of the registry, on the PyTorch path (the kernels' own equivalence to it is tested per
kernel family).
"""

import pytest
import torch
from torch import nn

from kfopt.registry import REGISTRY

from .helpers import assert_same_params, assert_same_tree, backward, batch, clone_tree, train_step

pytestmark = pytest.mark.usefixtures("torch_path")

SKIPPING = [name for name, entry in REGISTRY.items() if entry.skips_non_finite]


class WithUnusedHead(nn.Module):
    """Two Linear layers in use and one (``unused``) that is never called: its parameters are in the
    optimizer but never get a gradient, as a frozen or unused head in a real model."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        return self.body(x)


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


@pytest.mark.parametrize("name", SKIPPING)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_gradient_skips_the_whole_step_and_counts(name, bad):
    entry = REGISTRY[name]
    model, twin_model = WithUnusedHead(), WithUnusedHead()
    opt, twin = entry.build(model), entry.build(twin_model)
    train_step(model, opt, 0)
    train_step(twin_model, twin, 0)
    params_before = [p.detach().clone() for p in model.parameters()]
    state_before = clone_tree(opt.state_dict())
    opt.zero_grad()
    backward(model, 1)
    model.body[2].weight.grad[0, 0] = bad
    opt.step()
    assert int(opt.skipped_steps) == 1
    for p, before in zip(model.parameters(), params_before):
        assert torch.equal(p, before), "a skipped step changed a weight"
    assert_same_tree(without_counters(opt.state_dict()), without_counters(state_before))
    # the next finite step is the step of an optimizer that never saw the bad gradient
    train_step(model, opt, 2)
    train_step(twin_model, twin, 2)
    assert_same_params(model, twin_model)
