"""Contract 4: a constructor that raises leaves the model untouched: no hooks left registered, no
state on the parameters; the error names the argument."""

import inspect
import math
import numbers

import pytest
import torch

from kfopt.registry import REGISTRY

from .helpers import hook_count, tiny_model, train_step

pytestmark = pytest.mark.usefixtures("torch_path")


def _bad_arguments(entry):
    """(argument, bad value): NaN for every real-valued constructor argument, a bad base and bad base
    arguments for the composed optimizers."""
    for name, parameter in inspect.signature(entry.cls).parameters.items():
        default = parameter.default
        if isinstance(default, numbers.Real) and not isinstance(default, bool):
            yield name, math.nan
    if entry.composed:
        yield "base", "no-such-optimizer"
        if "base_kwargs" in inspect.signature(entry.cls).parameters:
            yield "betas", (2.0, 0.999)


def _untouched(model, hooks):
    assert hook_count(model) == hooks, "hooks left registered on the model"
    for name, p in model.named_parameters():
        assert p.grad is None and not p.__dict__, f"state left on parameter {name}: {sorted(p.__dict__)}"


def test_a_constructor_that_raises_leaves_the_model_untouched(entry):
    model = tiny_model()
    hooks = hook_count(model)
    bad_arguments = list(_bad_arguments(entry))
    assert bad_arguments
    for name, value in bad_arguments:
        with pytest.raises(ValueError, match=name):
            entry.build(model, **{name: value})
        _untouched(model, hooks)
    # a valid optimizer built afterwards behaves as on a fresh model
    fresh = tiny_model()
    optimizer, reference = entry.build(model), entry.build(fresh)
    for step in range(2):
        train_step(model, optimizer, step)
        train_step(fresh, reference, step)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


def test_kronecker_constructor_failing_late_removes_its_hooks():
    """A failure after the capture exists (parameters of a bad kind) still removes the hooks."""
    for entry in REGISTRY.values():
        if entry.kind != "kronecker":
            continue
        model = tiny_model().to(torch.float64)
        model[0].weight.requires_grad_(True)
        model.register_parameter("odd", torch.nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False))
        hooks = hook_count(model)
        try:
            entry.build(model, lr=-1.0)
        except ValueError:
            pass
        _untouched(model, hooks)
