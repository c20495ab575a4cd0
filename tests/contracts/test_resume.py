"""Contract 3: resume is bit-identical at every phase of the default update intervals.

An optimizer checkpointed after any step (between K-FAC's inverse updates, MKOR's factor updates,
SINGD's factor updates...) and resumed in a fresh process (a new model and optimizer loading the
saved states) continues exactly as the uninterrupted run. Both paths run the default intervals. The
PyTorch path resumes at each phase of the first period and runs past the next update. The Triton
interpreter (slow) runs each optimizer module once, on one Linear layer, for a period and two steps
(through the second update of every interval and one step past it), every step taken by a fresh
optimizer that loaded the checkpoint of the step before: a resume at every phase, each compared with
the uninterrupted run (weights and state dict) after its step.

A step skipped because the optimizer's own update blew up (grafted entries) is counted in
``blown_up_steps``, which a checkpoint carries (and a checkpoint without it loads as 0).
"""

import io
import warnings

import pytest
import torch

import kfopt.graft
from kfopt.registry import REGISTRY

from .conftest import use_backend
from .helpers import (assert_same_params, assert_same_tree, batch, clone_tree, infinite_direction, one_layer_model,
                      one_per_module, tiny_model, train_step)

#: the entries that graft (``kfopt.graft``): their own blow-ups are skipped, counted and checkpointed
GRAFTED = [name for name, entry in REGISTRY.items() if entry.hyperparameters().get("graft", "none") != "none"]


def _fresh(entry, model_state, optimizer_state, make_model=tiny_model):
    model = make_model(seed=1)  # other initial weights: everything must come from the checkpoint
    model.load_state_dict(model_state)
    optimizer = entry.build(model)
    optimizer.load_state_dict(clone_tree(optimizer_state))
    return model, optimizer


def _reference(entry, steps, make_model=tiny_model):
    """The uninterrupted run: (model state, optimizer state) before the first step and after each step."""
    model = make_model()
    optimizer = entry.build(model)
    checkpoints = [(clone_tree(model.state_dict()), clone_tree(optimizer.state_dict()))]
    for step in range(steps):
        train_step(model, optimizer, step)
        checkpoints.append((clone_tree(model.state_dict()), clone_tree(optimizer.state_dict())))
    return checkpoints


def test_resume_at_every_phase_of_the_default_intervals_is_bit_identical(entry, monkeypatch):
    use_backend(monkeypatch, "torch")
    period = entry.period
    end = period + 2  # past the next update of every phase
    reference = _reference(entry, end)
    for phase in range(1, period + 1):
        model, optimizer = _fresh(entry, *reference[phase])
        for step in range(phase, end):
            train_step(model, optimizer, step)
            assert model.state_dict().keys() == reference[step + 1][0].keys()
            for key, value in model.state_dict().items():
                assert value.equal(reference[step + 1][0][key]), \
                    f"resumed after step {phase}: {key} differs after step {step + 1}"
        assert_same_tree(optimizer.state_dict(), reference[end][1], f"resumed after step {phase}: state_dict")


@pytest.mark.parametrize("name", one_per_module())
def test_resume_after_every_step_of_the_default_intervals_under_the_interpreter_is_bit_identical(name, monkeypatch):
    use_backend(monkeypatch, "triton")
    entry = REGISTRY[name]
    steps = entry.period + 2  # through the second update of every interval, and one step past it
    reference = _reference(entry, steps, one_layer_model)
    model_state, optimizer_state = reference[0]
    for step in range(steps):  # a fresh optimizer from the last checkpoint for every step
        model, optimizer = _fresh(entry, model_state, optimizer_state, one_layer_model)
        train_step(model, optimizer, step)
        expected_model = one_layer_model()
        expected_model.load_state_dict(reference[step + 1][0])
        assert_same_params(model, expected_model, f"resumed after step {step}, step {step + 1}: ")
        model_state, optimizer_state = clone_tree(model.state_dict()), clone_tree(optimizer.state_dict())
        assert_same_tree(optimizer_state, reference[step + 1][1], f"resumed after step {step}: state_dict")


SCALED = [(name, True) for name in REGISTRY] + [(name, False) for name, e in REGISTRY.items() if e.cls_name == "SINGD"]


@pytest.mark.parametrize(("name", "grad_scaler_argument"), SCALED,
                         ids=[f"{n}{'' if a else '-without-grad_scaler'}" for n, a in SCALED])
def test_resume_under_a_grad_scaler_after_every_step_is_bit_identical(name, grad_scaler_argument, monkeypatch):
    """Under a GradScaler whose scale grows past 2^64 (so statistics scaled by its square overflow), a
    fresh model, optimizer and scaler loading the checkpoints of the step before take each step as the
    uninterrupted run; the Kronecker-factored optimizers with ``grad_scaler=scaler``, SINGD also
    without it (it then divides output gradients by the last step's scale: part of its checkpoint).
    Statistics at every step (intervals of 1)."""
    use_backend(monkeypatch, "torch")
    entry = REGISTRY[name]
    steps = 6

    def fresh(checkpoint=None):
        model = tiny_model(seed=1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40, growth_factor=2.0 ** 8, growth_interval=1)
        kwargs = {"grad_scaler": scaler} if grad_scaler_argument and entry.takes_model else {}
        optimizer = entry.build(model, **kwargs, **{key: 1 for key in entry.intervals})
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(clone_tree(checkpoint["optimizer"]))
            scaler.load_state_dict(checkpoint["scaler"])
        return model, optimizer, scaler

    def step(model, optimizer, scaler, index):
        optimizer.zero_grad()
        x, y = batch(index)
        scaler.scale(((model(x) - y) ** 2).mean()).backward()
        scaler.step(optimizer)
        scaler.update()
        return {"model": clone_tree(model.state_dict()), "optimizer": clone_tree(optimizer.state_dict()),
                "scaler": scaler.state_dict()}

    model, optimizer, scaler = fresh()
    model.load_state_dict(tiny_model().state_dict())
    reference = [{"model": clone_tree(model.state_dict()), "optimizer": clone_tree(optimizer.state_dict()),
                  "scaler": scaler.state_dict()}]
    for index in range(steps):
        reference.append(step(model, optimizer, scaler, index))
    assert scaler.get_scale() > 2.0 ** 64 and int(optimizer.skipped_steps) == 0
    for index in range(steps):  # a fresh model, optimizer and scaler from the last checkpoint for every step
        resumed = step(*fresh(reference[index]), index)
        assert_same_tree(resumed["model"], reference[index + 1]["model"], f"resumed after step {index}: weights")
        assert_same_tree(resumed["optimizer"], reference[index + 1]["optimizer"],
                         f"resumed after step {index}: state_dict")


def _without_counters(tree):
    """A state dict without its skip counters, blow-up count and preconditioner ``steps`` (which count
    skipped steps too)."""
    if isinstance(tree, dict):
        return {k: _without_counters(v) for k, v in tree.items()
                if not (isinstance(k, str) and (k.endswith("skipped_steps") or k in ("steps", "blown_up_steps")))}
    return tree


@pytest.mark.parametrize("name", GRAFTED)
def test_a_blown_up_step_is_skipped_counted_warned_once_and_checkpointed(name, monkeypatch):
    """A step whose gradients are finite but whose preconditioned gradient is not (factor and
    second-order updates due: intervals of 1) changes no weight, factor or moment; it counts once in the
    skip counters and in ``blown_up_steps``; reading ``skipped_steps`` warns once naming the optimizer and
    the count; a checkpoint (``torch.load(weights_only=True)``) carries the count into a fresh optimizer,
    which continues as one that never saw the step, and a checkpoint without it loads as 0."""
    use_backend(monkeypatch, "torch")
    entry = REGISTRY[name]
    every_step = {key: 1 for key in entry.intervals}
    model, twin_model = tiny_model(), tiny_model()
    opt, twin = entry.build(model, **every_step), entry.build(twin_model, **every_step)
    train_step(model, opt, 0)
    train_step(twin_model, twin, 0)
    params_before, state_before = [p.detach().clone() for p in model.parameters()], clone_tree(opt.state_dict())
    with monkeypatch.context() as patch:
        patch.setattr(kfopt.graft, "graft_step", infinite_direction(kfopt.graft.graft_step))
        train_step(model, opt, 1)
    for p, before in zip(model.parameters(), params_before):
        assert torch.equal(p, before), "a blown-up step changed a weight"
    state = opt.state_dict()
    assert_same_tree(_without_counters(state), _without_counters(state_before))
    assert int(opt.blown_up_steps) == 1 and int(state["blown_up_steps"]) == 1
    assert sum(int(v) for k, v in state.items() if k.endswith("skipped_steps")) == 1
    with pytest.warns(RuntimeWarning, match=f"{entry.cls_name} skipped 1 step"):
        assert int(opt.skipped_steps) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        int(opt.skipped_steps)  # once only
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = tiny_model(seed=1)
    resumed_model.load_state_dict(model.state_dict())
    resumed = entry.build(resumed_model, **every_step)
    resumed.load_state_dict(saved)
    assert int(resumed.blown_up_steps) == 1
    for m, o in ((resumed_model, resumed), (twin_model, twin)):
        train_step(m, o, 2)
    assert_same_params(resumed_model, twin_model)
    assert_same_tree(_without_counters(resumed.state_dict()), _without_counters(twin.state_dict()))
    older = entry.build(tiny_model(seed=1), **every_step)
    older.load_state_dict({k: v for k, v in clone_tree(saved).items() if k != "blown_up_steps"})
    assert int(older.blown_up_steps) == 0 and "blown_up_steps" in older.state_dict()
