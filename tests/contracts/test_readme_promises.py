"""Contract 8: what the README says about layers, skip counts and LR schedulers holds, for every
optimizer of the registry.

* Depthwise/grouped Conv2d layers and ``nn.MultiheadAttention`` (its ``out_proj``, an ``nn.Linear``,
  included) are not preconditioned by the Kronecker-factored optimizers, and their parameters get the
  first-order update: nothing raises, nothing is left untrained.
* K-FAC and MKOR on a LAMB base expose one ``skipped_steps`` (their own GradScaler skips plus the base's
  non-finite skips), which a checkpoint restores without counting twice.
* Momentum-cycling LR schedulers (``OneCycleLR`` with its default ``cycle_momentum=True``) work: every
  optimizer's ``defaults`` names the ``momentum`` or ``betas`` its update uses.
* The README's table of constructors states every optimizer's signature and defaults as the class has
  them (the class is where a default is declared; the README is checked against it).
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from kfopt.registry import REGISTRY

ENTRIES = list(REGISTRY.values())
KRONECKER = [e for e in ENTRIES if e.takes_model]
COMPOSED = [e for e in ENTRIES if e.composed]


def ids(entries):
    return [e.name for e in entries]


def preconditioned(opt) -> list[str]:
    layers = opt.preconditioner.layers if hasattr(opt, "preconditioner") else opt.layers
    return list(layers)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.grouped = nn.Conv2d(6, 4, 1, groups=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.tanh(self.grouped(torch.tanh(self.depthwise(torch.tanh(self.stem(x))))))
        return self.head(x.mean((2, 3)))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("entry", KRONECKER, ids=ids(KRONECKER))
@pytest.mark.parametrize("model_cls,inputs,unpreconditioned", [
    (ConvNet, (2, 3, 5, 5), ("depthwise", "grouped")),
    (Attention, (2, 4, 8), ("attn.out_proj", "attn")),
], ids=["grouped-conv", "attention"])
def test_unpreconditioned_layers_get_the_first_order_update(entry, model_cls, inputs, unpreconditioned, seed):
    model = model_cls()
    opt = entry.build(model)
    layers = preconditioned(opt)
    assert "head" in layers and not set(unpreconditioned) & set(layers)
    before = snapshot(model)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(*inputs)).square().mean().backward()
        opt.step()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        if p.dim() > 1:  # weights (a decayed group's bias may legitimately sit still for one optimizer)
            assert not torch.equal(p, before[name]), f"{name} was not trained"


@pytest.mark.parametrize("entry", COMPOSED, ids=ids(COMPOSED))
def test_one_skip_count_with_a_lamb_base(entry, seed):
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    opt = entry.build(model, base="lamb")
    for step in range(3):
        opt.zero_grad()
        model(torch.randn(6, 5)).square().mean().backward()
        if step == 1:
            model[2].bias.grad[0] = float("nan")
            before = snapshot(model)
        opt.step()
        if step == 1:
            assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert opt.skipped_steps.item() == 1
    resumed = entry.build(model, base="lamb")
    resumed.load_state_dict(opt.state_dict())
    assert resumed.skipped_steps.item() == 1


@pytest.mark.parametrize("entry", ENTRIES, ids=ids(ENTRIES))
def test_one_cycle_lr_cycles_the_momentum_the_update_uses(entry, seed):
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    opt = entry.build(model)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)  # cycle_momentum=True
    group = opt.param_groups[0]
    key = "betas" if "betas" in opt.defaults else "momentum"
    first = group[key][0] if key == "betas" else group[key]
    assert first == pytest.approx(0.95)  # OneCycleLR starts at max_momentum
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(6, 5)).square().mean().backward()
        opt.step()
        scheduler.step()
    assert (group[key][0] if key == "betas" else group[key]) < first
    assert all(torch.isfinite(p).all() for p in model.parameters())


README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_signatures() -> dict[str, str]:
    """``{class name: parameter list}`` of the README's constructor table rows ``| `kfopt.Name(...)` |``."""
    rows = re.findall(r"^\| `kfopt\.([A-Z]\w*)\((.*?)\)` \|", README.read_text(), flags=re.MULTILINE)
    return dict(rows)


def test_readme_constructor_table_matches_the_classes():
    import kfopt

    documented = _readme_signatures()
    classes = sorted({e.cls_name for e in ENTRIES if e.cls_name != "MKORH"})
    assert sorted(documented) == classes, f"README documents {sorted(documented)}, the registry has {classes}"
    for name, text in documented.items():
        written = ast.parse(f"def f({text}): pass").body[0].args
        actual = inspect.signature(getattr(kfopt, name)).parameters
        params = [*written.args, *written.kwonlyargs]
        assert [a.arg for a in params] + ([written.kwarg.arg] if written.kwarg else []) == list(actual), name
        defaults = dict(zip([a.arg for a in written.args][len(written.args) - len(written.defaults):],
                            written.defaults))
        defaults.update({a.arg: d for a, d in zip(written.kwonlyargs, written.kw_defaults) if d is not None})
        for arg, param in actual.items():
            if param.kind is inspect.Parameter.KEYWORD_ONLY:
                assert arg in [a.arg for a in written.kwonlyargs], f"{name}: {arg} is keyword-only"
            if param.default is inspect.Parameter.empty:
                assert arg not in defaults, f"{name}: {arg} has no default"
                continue
            value = eval(compile(ast.Expression(defaults[arg]), "README", "eval"), {"torch": torch})
            assert value == param.default, f"{name}: README says {arg}={value!r}, the class has {param.default!r}"
