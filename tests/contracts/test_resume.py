"""Contract 3: resume is bit-identical at every phase of the default update intervals.

An optimizer checkpointed after any step (between K-FAC's inverse updates, MKOR's factor updates,
SINGD's factor updates...) and resumed in a fresh process (a new model and optimizer loading the
saved states) continues exactly as the uninterrupted run. The PyTorch path runs every phase of the
default intervals, resuming at each phase and running past the next update; the Triton interpreter
(slow) runs each optimizer class with its intervals shortened to 2 and resumes after every step.
"""

import pytest

from kfopt.registry import REGISTRY

from .conftest import use_backend
from .helpers import assert_same_params, assert_same_tree, clone_tree, one_per_class, tiny_model, train_step


def _fresh(entry, model_state, optimizer_state, **overrides):
    model = tiny_model(seed=1)  # other initial weights: everything must come from the checkpoint
    model.load_state_dict(model_state)
    optimizer = entry.build(model, **overrides)
    optimizer.load_state_dict(clone_tree(optimizer_state))
    return model, optimizer


def _reference(entry, steps, **overrides):
    """The uninterrupted run: (model state, optimizer state) after each step, and the weights."""
    model = tiny_model()
    optimizer = entry.build(model, **overrides)
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
def test_resume_after_every_step_under_the_interpreter_is_bit_identical(name, monkeypatch):
    use_backend(monkeypatch, "triton")
    entry = REGISTRY[name]
    short = {key: min(value, 2) for key, value in entry.intervals.items()}
    steps = 3
    reference = _reference(entry, steps, **short)
    model_state, optimizer_state = reference[0]
    for step in range(steps):  # a fresh optimizer from the last checkpoint for every step
        model, optimizer = _fresh(entry, model_state, optimizer_state, **short)
        train_step(model, optimizer, step)
        expected_model = tiny_model()
        expected_model.load_state_dict(reference[step + 1][0])
        assert_same_params(model, expected_model, f"step {step + 1}: ")
        model_state, optimizer_state = clone_tree(model.state_dict()), clone_tree(optimizer.state_dict())
    assert_same_tree(optimizer_state, reference[steps][1])
