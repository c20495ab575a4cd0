"""Contract 1: hyperparameters are valid whenever a step runs.

A scheduler or a user may change ``param_groups`` at any time: an invalid value raises a ValueError
naming it at the next ``step()``, before anything changes (weights, state, captured statistics), and
the optimizer then continues exactly as one that never saw the bad value.
"""

import math
import numbers

import pytest
import torch

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


def test_tensor_or_non_number_lr_is_rejected_at_step(entry):
    model, opt = build(entry)
    train_step(model, opt, 0)
    for bad in ("0.1", None):
        opt.param_groups[-1]["lr"] = bad
        opt.zero_grad()
        backward(model, 1)
        with pytest.raises(ValueError, match="lr"):
            opt.step()
