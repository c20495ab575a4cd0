"""Contract 1: hyperparameters are valid whenever a step runs.

A scheduler or a user may change ``param_groups`` at any time: an invalid value raises a ValueError
naming it at the next ``step()``, before anything changes (weights, state, captured statistics), and
the optimizer then continues exactly as one that never saw the bad value. An ``lr`` given as a 0-d
tensor (entries with ``tensor_lr``) is checked on the device instead: a step with an invalid one is
skipped and counted; the other entries reject a tensor lr with that ValueError.
"""

import math
import numbers

import pytest
import torch

from kfopt.registry import REGISTRY

from .helpers import assert_same_params, assert_same_tree, backward, build, clone_tree, train_step

pytestmark = pytest.mark.usefixtures("torch_path")


def _float_hyperparameters(optimizer) -> list[str]:
    """The optimizer's real-valued hyperparameters (its ``defaults`` that are numbers, not bools)."""
    return [k for k, v in optimizer.defaults.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool) and k != "T"]


@pytest.mark.parametrize("bad", [math.nan, -1.0, math.inf], ids=["nan", "negative", "inf"])
def test_invalid_lr_set_after_construction_raises_at_step_before_anything_changes(entry, bad):
    model, opt = build(entry)
    twin_model, twin = build(entry)
    train_step(model, opt, 0)
    train_step(twin_model, twin, 0)
    before_params = [p.detach().clone() for p in model.parameters()]
    before_state = clone_tree(opt.state_dict())
    good = opt.param_groups[0]["lr"]
    opt.param_groups[0]["lr"] = bad
    opt.zero_grad()
    backward(model, 1)
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    for p, q in zip(model.parameters(), before_params):
        assert torch.equal(p, q), "a rejected step changed a weight"
    after_state = clone_tree(opt.state_dict())
    after_state["param_groups"][0]["lr"] = good
    assert_same_tree(after_state, before_state)
    # fixed: the step runs as that of an optimizer that never saw the bad value (statistics kept)
    opt.param_groups[0]["lr"] = good
    opt.step()
    twin.zero_grad()
    backward(twin_model, 1)
    twin.step()
    assert_same_params(model, twin_model)


def test_every_hyperparameter_made_invalid_is_named(entry):
    model, opt = build(entry)
    train_step(model, opt, 0)
    names = _float_hyperparameters(opt)
    assert "lr" in names
    for name in names:
        for group in opt.param_groups:
            good = group[name]
            group[name] = math.nan
            opt.zero_grad()
            backward(model, 1)
            with pytest.raises(ValueError, match=name):
                opt.step()
            group[name] = good


def test_non_number_lr_is_rejected_at_step(entry):
    model, opt = build(entry)
    train_step(model, opt, 0)
    for bad in ("0.1", None):
        opt.param_groups[-1]["lr"] = bad
        opt.zero_grad()
        backward(model, 1)
        with pytest.raises(ValueError, match="lr"):
            opt.step()


def _set_lr(optimizer, lr) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr.clone() if isinstance(lr, torch.Tensor) else lr


def _without_counters(tree):
    """A state dict without its step counters and param groups (the lr set in them)."""
    if isinstance(tree, dict):
        return {k: _without_counters(v) for k, v in tree.items()
                if k not in ("skipped_steps", "steps", "param_groups")}
    return tree


TENSOR_LR = [name for name, entry in REGISTRY.items() if entry.tensor_lr]
NO_TENSOR_LR = [name for name, entry in REGISTRY.items() if not entry.tensor_lr]


@pytest.mark.parametrize("name", TENSOR_LR)
def test_a_tensor_lr_steps_like_the_number_and_an_invalid_one_skips_the_step(name):
    entry = REGISTRY[name]
    (model, opt), (number_model, number_opt), (twin_model, twin) = build(entry), build(entry), build(entry)
    lr = torch.tensor(float(entry.default("lr")))
    _set_lr(opt, lr)
    _set_lr(twin, lr)
    for step in range(2):
        for m, o in ((model, opt), (number_model, number_opt), (twin_model, twin)):
            train_step(m, o, step)
    for p, q in zip(model.parameters(), number_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-8)  # w - (lr d) vs w + (-lr) d: rounding
    for bad in (math.nan, math.inf, -1.0):
        weights, state = [p.detach().clone() for p in model.parameters()], clone_tree(opt.state_dict())
        skipped = int(opt.skipped_steps)
        _set_lr(opt, torch.tensor(bad))
        train_step(model, opt, 2)
        assert int(opt.skipped_steps) == skipped + 1, f"lr {bad}: the step was not counted as skipped"
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights)), f"lr {bad} changed a weight"
        assert_same_tree(_without_counters(opt.state_dict()), _without_counters(state), f"lr {bad}: state_dict")
    for bad in (torch.tensor([0.1]), torch.tensor(1), torch.tensor(0.1, requires_grad=True)):
        _set_lr(opt, bad)
        opt.zero_grad()
        backward(model, 2)
        with pytest.raises(ValueError, match="lr"):
            opt.step()
    _set_lr(opt, lr)
    train_step(model, opt, 2)
    train_step(twin_model, twin, 2)
    assert_same_params(model, twin_model, "after the skipped steps: ")


@pytest.mark.parametrize("name", NO_TENSOR_LR)
def test_a_tensor_lr_is_rejected_where_not_supported(name):
    model, opt = build(name)
    train_step(model, opt, 0)
    _set_lr(opt, torch.tensor(0.1))
    opt.zero_grad()
    backward(model, 1)
    with pytest.raises(ValueError, match="lr"):
        opt.step()
