"""Contract 7: clear errors for unsupported parameters. Zero-size parameters work everywhere (on the
PyTorch path and under the interpreter); parameters on the meta device get a clear error naming the
meta device (not a false aliasing message), at construction, leaving the model untouched."""

import pytest
import torch
from torch import nn

from kfopt.registry import REGISTRY

from .conftest import use_backend
from .helpers import hook_count, one_per_module, train_step


class WithEmptyLayers(nn.Module):
    """The tiny model plus layers with zero-size weights (no inputs; no outputs)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        self.no_inputs = nn.Linear(0, 3)
        self.no_outputs = nn.Linear(4, 0)
        self.empty = nn.Parameter(torch.zeros(0, 5))

    def forward(self, x):
        return self.body(x) + self.no_inputs(x[:, :0]) + self.no_outputs(x).sum() + self.empty.sum()


# every entry on the PyTorch path; under the interpreter one entry per optimizer module (its kernels)
@pytest.mark.parametrize("name, backend", [(name, "torch") for name in REGISTRY]
                         + [(name, "triton") for name in one_per_module()])
def test_zero_size_parameters_work(name, backend, monkeypatch):
    entry = REGISTRY[name]
    use_backend(monkeypatch, backend)
    model = WithEmptyLayers()
    optimizer = entry.build(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for step in range(2):
        train_step(model, optimizer, step)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{name} is not finite"
    assert not torch.equal(model.body[0].weight, before["body.0.weight"])
    optimizer.load_state_dict(optimizer.state_dict())


@pytest.mark.parametrize("on_meta", ["all", "last-layer"])
def test_meta_parameters_get_a_clear_error(entry, on_meta):
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    (model if on_meta == "all" else model[2]).to("meta")
    hooks = hook_count(model)
    with pytest.raises((ValueError, TypeError), match="meta") as error:
        entry.build(model)
    assert "alias" not in str(error.value)
    assert hook_count(model) == hooks
