"""Contract 4: a constructor that raises leaves the model untouched: no hooks left registered, no
state on the parameters; the error names the argument. Each optimizer class's invalid arguments
(``BAD_ARGUMENTS``) raise so at construction and, set in a param group afterwards, at the next step
before anything changes."""

import inspect
import math
import numbers

import pytest
import torch

from kfopt.kernels.sonew import MAX_BAND
from kfopt.registry import REGISTRY

from .helpers import assert_same_tree, backward, clone_tree, hook_count, tiny_model, train_step

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


_TRUST_AND_NORM = [(dict(trust_clip=(2.0, 1.0)), "trust_clip"), (dict(trust_clip=(-1.0, 1.0)), "trust_clip"),
                   (dict(trust_clip=5.0), "trust_clip"), (dict(max_grad_norm=-1.0), "max_grad_norm"),
                   (dict(always_adapt=1), "always_adapt")]

#: optimizer class -> (invalid keyword arguments, the name the ValueError must carry): out of range,
#: of the wrong type, unknown choices (NaN for every real-valued argument is tried by the test above)
BAD_ARGUMENTS = {
    "LAMB": [(dict(lr=-1.0), "lr"), (dict(betas=(1.0, 0.999)), "betas"), (dict(betas=(0.9, -0.1)), "betas"),
             (dict(betas=(0.9,)), "betas"), (dict(eps=0.0), "eps"), (dict(eps=-1e-8), "eps"),
             (dict(weight_decay=-0.1), "weight_decay"), (dict(bias_correction="yes"), "bias_correction"),
             (dict(grad_averaging=1), "grad_averaging"), *_TRUST_AND_NORM],
    "LARS": [(dict(lr=-1.0), "lr"), (dict(momentum=1.5), "momentum"), (dict(momentum=-0.1), "momentum"),
             (dict(eta=-0.001), "eta"), (dict(weight_decay=-0.1), "weight_decay"), (dict(nesterov=1), "nesterov"),
             *_TRUST_AND_NORM],
    "HeavyBall": [(dict(lr=-1.0), "lr"), (dict(momentum=-0.1), "momentum"), (dict(weight_decay=-0.1), "weight_decay"),
                  (dict(lr="0.1"), "lr")],
    "SONew": [(dict(band=0), "band"), (dict(band=MAX_BAND + 1), "band"), (dict(band=1.0), "band"),
              (dict(band=True), "band"), (dict(betas=(0.9,)), "betas"), (dict(betas=(1.0, 0.99)), r"betas\[0\]"),
              (dict(betas=(0.9, -0.1)), r"betas\[1\]"), (dict(eps=0.0), "eps"), (dict(eps=-1e-8), "eps"),
              (dict(lr=-1.0), "lr"), (dict(graft="adagrad"), "graft"), (dict(graft=["adam"]), "graft"),
              (dict(graft_eps=0.0), "graft_eps"), (dict(weight_decay=-0.1), "weight_decay"),
              (dict(relative_eps=1), "relative_eps")],
    "KFAC": [(dict(lr=-1.0), "lr"), (dict(damping=0.0), "damping"), (dict(factor_decay=1.0), "factor_decay"),
             (dict(kl_clip=0.0), "kl_clip"), (dict(factor_update_steps=0), "factor_update_steps"),
             (dict(inv_update_steps=1.5), "inv_update_steps"), (dict(grad_worker_fraction=0.0), "grad_worker_fraction"),
             (dict(grad_worker_fraction=1.5), "grad_worker_fraction"), (dict(compute_method="cholesky"), "compute_method"),
             (dict(momentum=-0.1), "momentum"), (dict(weight_decay=-1.0), "weight_decay"),
             (dict(symmetric_comm=1), "symmetric_comm"), (dict(assignment_strategy="time"), "assignment_strategy"),
             (dict(loss_average="mean"), "loss_average"), (dict(base="adam"), "base")],
    "MKOR": [(dict(lr=-1.0), "lr"), (dict(inv_freq=0), "inv_freq"), (dict(stat_decay=1.0), "stat_decay"),
             (dict(stabilizer_threshold=0.0), "stabilizer_threshold"), (dict(stabilizer_blend=1.5), "stabilizer_blend"),
             (dict(factor_dtype=torch.int8), "factor_dtype"), (dict(base="adam"), "base"),
             (dict(weight_decay=-1.0), "weight_decay"), (dict(loss_average="mean"), "loss_average")],
    "SINGD": [(dict(lr=-1.0), "lr"), (dict(momentum=-0.1), "momentum"), (dict(alpha1=1.0), "alpha1"), (dict(T=0), "T"),
              (dict(T=2.0), "T"), (dict(loss_average="mean"), "loss_average"), (dict(lr_cov=-1e-2), "lr_cov"),
              (dict(structures=("dense",)), "structures"), (dict(structures=("dense", "block0diagonal")), "structures"),
              (dict(structures=("dense", "toeplitz")), "structures"), (dict(kfac_approx="sum"), "kfac_approx"),
              (dict(kfac_like=1), "kfac_like"), (dict(preconditioner_dtype=(torch.int32, None)), "preconditioner_dtype"),
              (dict(normalize_lr_cov="yes"), "normalize_lr_cov"), (dict(damping=-1.0), "damping")],
}
BAD_ARGUMENTS["MKORH"] = BAD_ARGUMENTS["MKOR"] + [
    (dict(switch_window=0), "switch_window"), (dict(switch_fraction=1.0), "switch_fraction"),
    (dict(switch_patience=0), "switch_patience")]


def test_every_optimizer_class_lists_its_invalid_arguments():
    assert {entry.cls_name for entry in REGISTRY.values()} <= set(BAD_ARGUMENTS)


def test_invalid_arguments_raise_naming_them_and_leave_the_model_untouched(entry):
    model = tiny_model()
    hooks = hook_count(model)
    for kwargs, name in BAD_ARGUMENTS[entry.cls_name]:
        with pytest.raises(ValueError, match=name):
            entry.build(model, **kwargs)
        _untouched(model, hooks)


def test_invalid_values_set_in_a_param_group_raise_at_the_next_step_before_anything_changes(entry):
    """The invalid arguments that are param-group hyperparameters, set in a group after a step (by a
    user or a scheduler): the next ``step()`` raises naming them, weights and state as before."""
    model = tiny_model()
    opt = entry.build(model)
    train_step(model, opt, 0)
    tried = 0
    for kwargs, name in BAD_ARGUMENTS[entry.cls_name]:
        (key, value), = kwargs.items()
        if key not in opt.param_groups[0]:
            continue
        tried += 1
        weights, state = [p.detach().clone() for p in model.parameters()], clone_tree(opt.state_dict())
        good = opt.param_groups[0][key]
        opt.param_groups[0][key] = value
        opt.zero_grad()
        backward(model, 1)
        with pytest.raises(ValueError, match=name):
            opt.step()
        opt.param_groups[0][key] = good
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights)), f"{key}={value!r} changed a weight"
        assert_same_tree(opt.state_dict(), state, f"after {key}={value!r}: state_dict")
    assert tried
