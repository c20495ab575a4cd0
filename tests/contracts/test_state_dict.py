"""Contract 2: ``load_state_dict`` validates everything before it changes anything.

A checkpoint of another optimizer kind, with a missing key, another number of param groups or params,
a state tensor of another shape or dtype, or a malformed structure raises a ValueError saying what does
not fit, and leaves the optimizer exactly as it was: same ``state_dict()``, same hooks, and its next
step equal to that of an optimizer that never saw the checkpoint. A valid checkpoint survives
``torch.save``/``torch.load(weights_only=True)`` and continues bit-identically.
"""

from __future__ import annotations

import io

import pytest
import torch

from kfopt.registry import REGISTRY

from .helpers import (
    assert_same_params,
    assert_same_tree,
    build,
    clone_tree,
    hook_count,
    tiny_model,
    train_step,
)

pytestmark = pytest.mark.usefixtures("torch_path")

#: (checkpoint of, loaded into) pairs that are documented to load: an MKOR checkpoint continues as MKOR-H
COMPATIBLE = {("mkor", "mkorh"), ("mkor-graft", "mkorh-graft")}


def _trained(name: str, steps: int = 2):
    model, opt = build(name)
    for step in range(steps):
        train_step(model, opt, step)
    return model, opt


@pytest.fixture(scope="module")
def checkpoints():
    import os

    os.environ["KFOPT_BACKEND"] = "torch"
    try:
        return {name: clone_tree(_trained(name)[1].state_dict()) for name in REGISTRY}
    finally:
        os.environ.pop("KFOPT_BACKEND", None)


def test_round_trip_through_torch_save_continues_bit_identically(entry):
    model, opt = _trained(entry.name)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = tiny_model()
    resumed_model.load_state_dict(model.state_dict())
    resumed = entry.build(resumed_model)
    resumed.load_state_dict(saved)
    for step in range(2, 4):
        train_step(model, opt, step)
        train_step(resumed_model, resumed, step)
        assert_same_params(model, resumed_model, f"step {step}: ")
    assert_same_tree(resumed.state_dict(), opt.state_dict())


def _paths(tree, prefix=()):
    """(path, value) of every node below the root."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return
    for key, value in items:
        yield prefix + (key,), value
        yield from _paths(value, prefix + (key,))


def _replace(tree, path, value=None, delete=False):
    """A deep copy of ``tree`` with the node at ``path`` replaced (or deleted)."""
    tree = clone_tree(tree)
    node = tree
    for key in path[:-1]:
        node = node[key]
    if isinstance(node, tuple):
        raise TypeError
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return tree


def _optional_state(opt, checkpoint: dict) -> set[tuple]:
    """(param id, key) of the saved per-parameter entries the optimizer documents as optional
    (``_state_spec``: e.g. a momentum buffer created at a parameter's first gradient)."""
    params = {pid: (p, group) for saved, group in zip(checkpoint["param_groups"], opt.param_groups)
              for pid, p in zip(saved["params"], group["params"])}
    optional = set()
    for pid, (p, group) in params.items():
        spec = opt._state_spec(p, group) or {}
        optional |= {(pid, key) for key, (_, _, required) in spec.items() if not required}
    return optional


def _mutations(checkpoint: dict, optional: set = frozenset()):
    """(what, bad checkpoint): every key dropped (except whole per-parameter states, the only entry of
    one, and entries documented as optional: they may be absent for parameters that never had a
    gradient), every tensor with one more element and in another
    dtype, every integer as a string, a param group too few and too many, a param id too few."""
    yield "param group dropped", {**clone_tree(checkpoint), "param_groups": clone_tree(checkpoint["param_groups"][:-1])}
    yield "param group added", {**clone_tree(checkpoint),
                                "param_groups": clone_tree(checkpoint["param_groups"] + checkpoint["param_groups"][-1:])}
    groups = clone_tree(checkpoint["param_groups"])
    groups[0]["params"] = groups[0]["params"][:-1]
    yield "param id dropped", {**clone_tree(checkpoint), "param_groups": groups}
    for path, value in _paths(checkpoint):
        where = "/".join(map(str, path))
        if path[0] == "param_groups" and len(path) > 2 and path[2] == "params":
            continue
        emptied = path[0] == "state" and len(path) == 3 and (
            len(checkpoint["state"][path[1]]) == 1 or (path[1], path[2]) in optional)
        if not (path[0] == "state" and len(path) == 2) and not isinstance(path[-1], int) and not emptied:
            yield f"{where} dropped", _replace(checkpoint, path, delete=True)
        if isinstance(value, torch.Tensor):
            bigger = torch.cat([value.reshape(-1), value.reshape(-1)[:1]]) if value.numel() else value.new_zeros(1)
            yield f"{where} reshaped", _replace(checkpoint, path, bigger)
            other = torch.float64 if value.dtype != torch.float64 else torch.float32
            yield f"{where} as {other}", _replace(checkpoint, path, value.to(other))
        elif isinstance(value, int) and not isinstance(value, bool) and path[0] != "param_groups":
            yield f"{where} as a string", _replace(checkpoint, path, "x")


def _assert_rejected_unchanged(model, opt, bad, what):
    before, hooks = clone_tree(opt.state_dict()), hook_count(model)
    try:
        opt.load_state_dict(bad)
    except ValueError:
        pass
    except Exception as exc:  # noqa: BLE001 - the contract is a ValueError
        pytest.fail(f"{what}: {type(exc).__name__} instead of ValueError: {exc}")
    else:
        pytest.fail(f"{what}: the checkpoint was accepted")
    assert_same_tree(opt.state_dict(), before, f"after rejecting '{what}': state_dict")
    assert hook_count(model) == hooks, f"after rejecting '{what}': hooks changed"


def test_malformed_checkpoints_raise_value_error_and_change_nothing(entry, checkpoints):
    model, opt = _trained(entry.name)
    twin_model, twin = _trained(entry.name)
    for what, bad in _mutations(checkpoints[entry.name], _optional_state(opt, checkpoints[entry.name])):
        _assert_rejected_unchanged(model, opt, bad, what)
    for step in range(2, 5):  # the optimizer continues as one that never saw the bad checkpoints
        train_step(model, opt, step)
        train_step(twin_model, twin, step)
        assert_same_params(model, twin_model, f"step {step}: ")


def test_checkpoint_of_another_optimizer_raises_and_changes_nothing(entry, checkpoints):
    model, opt = _trained(entry.name)
    twin_model, twin = _trained(entry.name)
    for other, saved in checkpoints.items():
        if other == entry.name or (other, entry.name) in COMPATIBLE:
            continue
        _assert_rejected_unchanged(model, opt, saved, f"{other}'s checkpoint")
    for step in range(2, 5):
        train_step(model, opt, step)
        train_step(twin_model, twin, step)
        assert_same_params(model, twin_model, f"step {step}: ")


def test_checkpoint_from_another_world_size_is_checked():
    """The world-size metadata a K-FAC checkpoint carries must be a positive int."""
    model, opt = _trained("kfac")
    saved = clone_tree(opt.state_dict())
    assert "world_size" in saved["kfac"]
    saved["kfac"]["world_size"] = 0
    _assert_rejected_unchanged(model, opt, saved, "world_size 0")
