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

from .conftest import use_backend
from .helpers import (
    assert_same_params,
    assert_same_tree,
    build,
    clone_tree,
    conv_model,
    hook_count,
    one_layer_model,
    one_per_module,
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


#: (entry, overrides): every entry with its defaults, and the state layouts of other settings
ROUND_TRIPS = [(name, {}) for name in REGISTRY] + [
    ("mkor", {"factor_dtype": torch.bfloat16, "stabilizer_threshold": 1.5}),
    ("singd", {"structures": ("block4diagonal", "triutoeplitz"), "preconditioner_dtype": (torch.bfloat16, None)}),
    ("singd", {"structures": ("hierarchical2_3", "tril")}),
]


def _round_trip(name, overrides, dtype, make_model=conv_model, steps=3):
    """On ``make_model`` (a Conv2d and a Linear layer by default) in ``dtype``: ``steps`` steps (a StepLR
    halving lr at each), the model, optimizer and scheduler saved through ``torch.save``/``torch.load(
    weights_only=True)``, loaded into a fresh model and an optimizer built with another lr (the
    checkpoint's must win), and ``steps`` more steps beside the uninterrupted run: the weights after
    each and the final state dicts (shapes, dtypes, bits) equal; a composed optimizer's base shares the
    loaded param groups and state."""
    entry = REGISTRY[name]
    model = make_model(dtype=dtype)
    opt = entry.build(model, **overrides)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    for step in range(steps):
        train_step(model, opt, step)
        sched.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = make_model(seed=1, dtype=dtype)
    resumed_model.load_state_dict(saved["model"])
    resumed = entry.build(resumed_model, lr=3 * entry.default("lr"), **overrides)
    resumed_sched = torch.optim.lr_scheduler.StepLR(resumed, 1, 0.5)
    resumed.load_state_dict(saved["opt"])
    resumed_sched.load_state_dict(saved["sched"])
    if entry.composed:
        assert resumed.base.param_groups is resumed.param_groups and resumed.base.state is resumed.state
    for step in range(steps, 2 * steps):
        for m, o, s in ((model, opt, sched), (resumed_model, resumed, resumed_sched)):
            train_step(m, o, step)
            s.step()
        assert_same_params(model, resumed_model, f"step {step}: ")
    assert resumed.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == entry.default("lr") * 0.5 ** (2 * steps)
    assert_same_tree(resumed.state_dict(), opt.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("name", "overrides"), ROUND_TRIPS,
                         ids=[name + "".join(f"-{k}" for k in o) for name, o in ROUND_TRIPS])
def test_round_trip_through_torch_save_continues_bit_identically(name, overrides, dtype):
    _round_trip(name, overrides, dtype)


@pytest.mark.parametrize("name", one_per_module())
def test_round_trip_under_the_interpreter_continues_bit_identically(name, monkeypatch):
    use_backend(monkeypatch, "triton")
    _round_trip(name, {}, torch.bfloat16, one_layer_model, steps=2)


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


#: top-level entries a checkpoint may lack: ``blown_up_steps`` came after the first checkpoints (loads as 0;
#: ``test_resume.py`` checks it)
OPTIONAL_KEYS = {("blown_up_steps",)}


def _mutations(checkpoint: dict, optional: set = frozenset()):
    """(what, bad checkpoint): every key dropped (except whole per-parameter states, the only entry of
    one, entries documented as optional: they may be absent for parameters that never had a
    gradient, and ``OPTIONAL_KEYS``), every tensor with one more element and in another
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
        if not (path[0] == "state" and len(path) == 2) and not isinstance(path[-1], int) and not emptied \
                and path not in OPTIONAL_KEYS:
            yield f"{where} dropped", _replace(checkpoint, path, delete=True)
        if isinstance(value, torch.Tensor):
            bigger = torch.cat([value.reshape(-1), value.reshape(-1)[:1]]) if value.numel() else value.new_zeros(1)
            yield f"{where} reshaped", _replace(checkpoint, path, bigger)
            other = torch.float64 if value.dtype != torch.float64 else torch.float32
            yield f"{where} as {other}", _replace(checkpoint, path, value.to(other))
        elif isinstance(value, int) and not isinstance(value, bool) and path[0] != "param_groups":
            yield f"{where} as a string", _replace(checkpoint, path, "x")


def _continue_alike(model, opt, other_model, other, steps) -> None:
    """Both take ``steps`` and have the same weights after each."""
    for step in steps:
        train_step(model, opt, step)
        train_step(other_model, other, step)
        assert_same_params(model, other_model, f"step {step}: ")


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
    _continue_alike(model, opt, twin_model, twin, range(2, 5))


def test_checkpoint_of_another_optimizer_raises_and_changes_nothing(entry, checkpoints):
    model, opt = _trained(entry.name)
    twin_model, twin = _trained(entry.name)
    for other, saved in checkpoints.items():
        if other == entry.name or (other, entry.name) in COMPATIBLE:
            continue
        _assert_rejected_unchanged(model, opt, saved, f"{other}'s checkpoint")
    _continue_alike(model, opt, twin_model, twin, range(2, 5))


def test_checkpoint_from_another_world_size_is_checked():
    """The world-size metadata a K-FAC checkpoint carries must be a positive int."""
    model, opt = _trained("kfac")
    saved = clone_tree(opt.state_dict())
    assert "world_size" in saved["kfac"]
    saved["kfac"]["world_size"] = 0
    _assert_rejected_unchanged(model, opt, saved, "world_size 0")


@pytest.mark.parametrize("name", ["kfac", "kfac-inverse"])
def test_kfac_checkpoint_with_decomposed_factors_is_checked_and_continues(name):
    """A K-FAC checkpoint may carry a layer's second-order data as the factors the last inverse update
    decomposed and its damping (``decomposed``: what a rank that is not the layer's grad worker saves);
    it is checked like the rest, and a single process loading it decomposes them and continues
    bit-identically."""
    model, opt = _trained(name, steps=1)  # step 0's inverse update decomposed the current factors
    saved = clone_tree(opt.state_dict())
    layer = next(iter(saved["kfac"]["second_order"]))
    del saved["kfac"]["second_order"][layer]
    saved["kfac"]["decomposed"][layer] = {**clone_tree(saved["kfac"]["factors"][layer]),
                                          "damping": opt.defaults["damping"]}
    other_model, other = _trained(name, steps=1)
    for what, bad in _mutations(saved):
        if "decomposed" in what:
            _assert_rejected_unchanged(other_model, other, bad, what)
    for damping in (float("nan"), -1.0, 0.0, "x"):
        bad = clone_tree(saved)
        bad["kfac"]["decomposed"][layer]["damping"] = damping
        _assert_rejected_unchanged(other_model, other, bad, f"damping {damping!r}")
    both = clone_tree(saved)
    both["kfac"]["second_order"][layer] = clone_tree(opt.state_dict()["kfac"]["second_order"][layer])
    _assert_rejected_unchanged(other_model, other, both, "a layer in both second_order and decomposed")
    resumed_model = tiny_model()
    resumed_model.load_state_dict(model.state_dict())
    resumed = REGISTRY[name].build(resumed_model)
    resumed.load_state_dict(saved)
    _continue_alike(model, opt, resumed_model, resumed, range(1, 4))


def test_singd_last_grad_scale_is_checked():
    """SINGD's saved scale of the last GradScaler step must be None or a finite positive 0-d fp32 tensor."""
    model, opt = _trained("singd")
    saved = clone_tree(opt.state_dict())
    assert "last_grad_scale" in saved
    for bad in (torch.tensor([2.0]), torch.tensor(2.0, dtype=torch.float64), torch.tensor(float("nan")),
                torch.tensor(float("inf")), torch.tensor(0.0), torch.tensor(-2.0), 2.0, "x"):
        _assert_rejected_unchanged(model, opt, {**saved, "last_grad_scale": bad}, f"last_grad_scale {bad!r}")
    opt.load_state_dict({**saved, "last_grad_scale": torch.tensor(2.0 ** 70)})
    assert opt.state_dict()["last_grad_scale"].item() == 2.0 ** 70
