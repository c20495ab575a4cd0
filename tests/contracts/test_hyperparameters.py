"""Contract 1: hyperparameters are valid whenever a step runs.

A scheduler or a user may change ``param_groups`` at any time: an invalid value raises a ValueError
naming it at the next ``step()``, before anything changes (weights, state, captured statistics), and
the optimizer then continues exactly as one that never saw the bad value. An ``lr`` given as a
one-element tensor (optimizers with ``device_lr``) is checked on the device instead: a step with an
invalid one is skipped and counted; the others reject a tensor lr with that ValueError.
"""

import math
import numbers

import pytest
import torch

from kfopt.registry import REGISTRY

from .conftest import use_backend
from .helpers import assert_same_params, assert_same_tree, backward, build, clone_tree, one_per_module, train_step

pytestmark = pytest.mark.usefixtures("torch_path")


def _float_hyperparameters(optimizer) -> list[str]:
    """The optimizer's real-valued hyperparameters (its ``defaults`` that are numbers, not bools)."""
    return [k for k, v in optimizer.defaults.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool) and k != "T"]


@pytest.mark.parametrize("bad", [math.nan, -1.0, math.inf], ids=["nan", "negative", "inf"])
def test_invalid_lr_set_after_construction_raises_at_step_before_anything_changes(entry, bad):
    _check_rejected_at_step(entry, lambda good: bad)


def _check_rejected_at_step(entry, bad_for) -> None:
    """The lr ``bad_for(good lr)`` set after a step raises a ValueError naming ``lr`` at the next step,
    before anything changes; with the good lr back, the step equals that of an optimizer that never saw
    the bad one."""
    model, opt = build(entry)
    twin_model, twin = build(entry)
    train_step(model, opt, 0)
    train_step(twin_model, twin, 0)
    before_params = [p.detach().clone() for p in model.parameters()]
    before_state = clone_tree(opt.state_dict())
    good = opt.param_groups[0]["lr"]
    opt.param_groups[0]["lr"] = bad_for(good)
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


def _device_lr(name: str) -> bool:
    return REGISTRY[name].cls.device_lr


def _set_lr(optimizer, lr) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr.clone() if isinstance(lr, torch.Tensor) else lr


def _without_counters(tree):
    """A state dict without its step counters (the skip counts; the preconditioners' ``steps`` count
    skipped steps too) and param groups (the lr set in them)."""
    if isinstance(tree, dict):
        return {k: _without_counters(v) for k, v in tree.items()
                if not (isinstance(k, str) and (k.endswith("skipped_steps") or k in ("steps", "param_groups")))}
    return tree


def _skips(state_dict: dict) -> int:
    """The skipped steps a state dict counts (a composed optimizer's own and its base's add up)."""
    return sum(int(v) for k, v in state_dict.items() if k.endswith("skipped_steps"))


def test_a_tensor_lr_is_checked_on_the_device_or_rejected(entry):
    """Optimizers with ``device_lr`` take a one-element tensor ``lr`` without a host synchronisation: it
    steps as the same number does (bit for bit in the fused element-wise kernels; SINGD's update is
    ``w - lr d`` rather than ``w + (-lr) d``: within rounding), and a NaN, negative or infinite one skips
    the whole step on the device (weights and state unchanged, ``skipped_steps`` incremented, the next
    valid step equal to that of an optimizer that never saw it); a tensor of another form (two elements,
    integer, requiring grad) raises a ValueError naming ``lr``. The others reject any tensor lr with a
    ValueError naming ``lr`` before anything changes."""
    _check_tensor_lr(entry)


@pytest.mark.parametrize("name", [n for n in one_per_module() if _device_lr(n) and REGISTRY[n].kind == "elementwise"])
def test_a_tensor_lr_through_the_triton_kernels(name, monkeypatch):
    """The same through the Triton kernels (interpreted on the CPU): the table is built on the device."""
    use_backend(monkeypatch, "triton")
    _check_tensor_lr(REGISTRY[name])


def _check_tensor_lr(entry):
    model, opt = build(entry)
    if not opt.device_lr:
        _check_rejected_at_step(entry, torch.tensor)
        return
    twin_model, twin = build(entry)
    number_model, number_opt = build(entry)
    for m, o in ((model, opt), (twin_model, twin), (number_model, number_opt)):
        train_step(m, o, 0)
    good = opt.param_groups[0]["lr"]
    before_params = [p.detach().clone() for p in model.parameters()]
    before_state = clone_tree(opt.state_dict())
    for step, bad in enumerate([math.nan, -1.0, math.inf], start=1):
        _set_lr(opt, torch.tensor(bad))
        opt.zero_grad()
        backward(model, 1)
        opt.step()
        for p, q in zip(model.parameters(), before_params):
            assert torch.equal(p, q), f"lr={bad}: a skipped step changed a weight"
        after = clone_tree(opt.state_dict())
        assert _skips(after) == _skips(before_state) + step
        assert int(after.get("blown_up_steps", 0)) == 0, "an invalid lr counted as a blow-up"
        assert_same_tree(_without_counters(after), _without_counters(before_state), f"lr={bad}: state_dict")
    for bad in (torch.tensor([0.1, 0.2]), torch.tensor(1), torch.tensor(0.1, requires_grad=True)):
        _set_lr(opt, bad)
        opt.zero_grad()
        backward(model, 1)
        with pytest.raises(ValueError, match="lr"):
            opt.step()
    _set_lr(opt, torch.tensor(good, dtype=torch.float64))
    _set_lr(number_opt, good)
    for k in (1, 2):
        train_step(model, opt, k)
        train_step(twin_model, twin, k)
        train_step(number_model, number_opt, k)
        if entry.kind == "elementwise":
            assert_same_params(model, twin_model)
        else:
            for p, q in zip(model.parameters(), number_model.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-8)
