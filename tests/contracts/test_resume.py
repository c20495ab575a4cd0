"""Contract 3: resume is bit-identical at every phase of the default update intervals.

An optimizer checkpointed after any step (between K-FAC's inverse updates, MKOR's factor updates,
SINGD's factor updates...) and resumed in a fresh process (a new model and optimizer loading the
saved states) continues exactly as the uninterrupted run. Both paths run the default intervals. The
PyTorch path resumes at each phase of the first period and runs past the next update. The Triton
interpreter (slow) runs each optimizer class once, on one Linear layer, for a period and two steps
(through the second update of every interval and one step past it), every step taken by a fresh
optimizer that loaded the checkpoint of the step before: a resume at every phase, each compared with
the uninterrupted run (weights and state dict) after its step.
"""

import pytest

from kfopt.registry import REGISTRY

from .conftest import use_backend
from .helpers import (assert_same_params, assert_same_tree, clone_tree, one_layer_model, one_per_class,
                      tiny_model, train_step)


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


@pytest.mark.parametrize("name", one_per_class())
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
