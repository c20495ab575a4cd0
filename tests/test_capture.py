"""kfopt.capture.LayerCapture: selection, rows that reproduce the weight gradient (Linear, Conv2d),
in-place activations, repeated calls, gradient accumulation, arming, AMP, DDP under torchrun, FSDP."""

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from distributed import run_torchrun
from torch import nn

from kfopt.capture import CallInfo, LayerCapture, loss_term_count


def close(out, ref, tol=1e-10):
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


class Recorder:
    """``input_fn``/``grad_output_fn`` that keep a copy of every call's rows, keyed (layer name, call)."""

    def __init__(self):
        self.inputs, self.grads, self.infos = {}, {}, {}

    def input_fn(self, layer, call, rows):
        self.inputs[layer.name, call.index] = rows.clone()
        self.infos[layer.name, call.index] = call

    def grad_fn(self, layer, call, rows):
        self.grads[layer.name, call.index] = rows.clone()

    def capture(self, model, **kwargs) -> LayerCapture:
        capture = LayerCapture(model, input_fn=self.input_fn, grad_output_fn=self.grad_fn, **kwargs)
        capture.arm()
        return capture


def check_gradient_identity(capture, rec, tol=1e-10):
    """sum over calls of g^T a is the weight gradient, sum of g the bias gradient, for every layer."""
    assert capture.layers
    for name, layer in capture.layers.items():
        assert layer.calls > 0 and layer.grad_calls == layer.calls
        calls = range(layer.calls)
        gw = sum(rec.grads[name, c].double().T @ rec.inputs[name, c].double() for c in calls)
        weight = layer.module.weight
        close(gw, weight.grad.double().reshape(layer.out_features, layer.in_features), tol)
        assert layer.input_row_count == layer.grad_output_row_count == sum(len(rec.inputs[name, c]) for c in calls)
        if layer.has_bias:
            close(sum(rec.grads[name, c].double().sum(0) for c in calls), layer.module.bias.grad.double(), tol)


def sum_loss(y):
    """A sum over the outputs with fresh random weights (every output row gets its own gradient)."""
    return (y * torch.randn_like(y)).sum()


# ------------------------------------------------------------------ rows reproduce the weight gradient


@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 5), (2, 3, 2, 5), (5,)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_rows(shape, bias):
    model = nn.Sequential(nn.Linear(5, 6, bias=bias)).double()
    rec = Recorder()
    capture = rec.capture(model)
    layer = capture.layers["0"]
    assert (layer.kind, layer.has_bias, layer.in_features, layer.out_features) == ("linear", bias, 5, 6)
    x = torch.randn(shape, dtype=torch.float64)
    sum_loss(model(x)).backward()
    check_gradient_identity(capture, rec)
    batch = shape[0] if len(shape) > 1 else 1
    rows = x.numel() // 5
    assert rec.infos["0", 0] == CallInfo(0, batch, rows // batch)
    close(rec.inputs["0", 0], x.reshape(rows, 5), 0)


CONVS = [  # (kwargs of nn.Conv2d(3, 4, ...), unbatched input)
    (dict(kernel_size=3), False),
    (dict(kernel_size=3, stride=2, padding=1, bias=False), False),
    (dict(kernel_size=3, padding=2, dilation=2), False),
    (dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)), False),
    (dict(kernel_size=(4, 2), padding="same"), False),  # asymmetric implicit padding
    (dict(kernel_size=3, padding="valid", stride=(1, 2)), False),
    (dict(kernel_size=3, padding=1, padding_mode="reflect"), False),
    (dict(kernel_size=(2, 3), padding=(1, 2), stride=2, padding_mode="circular"), False),
    (dict(kernel_size=3, padding=1, padding_mode="replicate", dilation=2), True),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("kwargs, unbatched", CONVS)
def test_conv2d_rows(kwargs, unbatched):
    model = nn.Sequential(nn.Conv2d(3, 4, **kwargs)).double()
    rec = Recorder()
    capture = rec.capture(model)
    layer = capture.layers["0"]
    kh, kw = model[0].kernel_size
    assert (layer.kind, layer.in_features, layer.out_features) == ("conv2d", 3 * kh * kw, 4)
    x = torch.randn((3, 9, 8) if unbatched else (2, 3, 9, 8), dtype=torch.float64)
    y = model(x)
    sum_loss(y).backward()
    check_gradient_identity(capture, rec)
    oh, ow = y.shape[-2:]
    assert rec.infos["0", 0] == CallInfo(0, 1 if unbatched else 2, oh * ow)


def test_inplace_activation_after_the_layer():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(),
                          nn.Linear(3 * 5 * 5, 4), nn.ReLU(inplace=True), nn.Linear(4, 3),
                          nn.Hardtanh(inplace=True)).double()
    rec = Recorder()
    capture = rec.capture(model)
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    sum_loss(model(x)).backward()
    check_gradient_identity(capture, rec)
    # the gradient handed over is with respect to the layer's own output, before the in-place ReLU
    assert (rec.grads["3", 0] == 0).any() and (rec.grads["3", 0] != 0).any()


class Twice(nn.Module):
    """One Linear used twice in the forward (weight sharing across calls), plus a second name for it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.alias = self.lin
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.lin(torch.tanh(self.lin(x))))


def test_module_called_twice():
    model = Twice().double()
    rec = Recorder()
    capture = rec.capture(model)
    assert list(capture.layers) == ["lin", "out"]  # the alias is the same module: one layer
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    sum_loss(model(x)).backward()
    layer = capture.layers["lin"]
    assert layer.calls == layer.grad_calls == 2 and layer.input_row_count == 30
    close(rec.inputs["lin", 0], x.reshape(15, 4), 0)
    with torch.no_grad():  # (a forward with grad here would be a third captured call)
        close(rec.inputs["lin", 1], torch.tanh(model.lin(x)).reshape(15, 4))
    check_gradient_identity(capture, rec)


def small_cnn():
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def covariance_capture(model, per_example=False, micro_batches=1):
    """A capture whose functions return a^T a and g^T g (K-FAC's sums); with ``per_example`` the
    output gradients are first turned into per-example gradients (loss_term_count, Scaling)."""
    def inputs(layer, call, a):
        return a.T @ a

    def grads(layer, call, g):
        if per_example:
            g = g * (micro_batches * loss_term_count(call, "batch"))
        return g.T @ g

    capture = LayerCapture(model, input_fn=inputs, grad_output_fn=grads)
    capture.arm()
    return capture


@pytest.mark.parametrize("per_example", [False, True])
def test_gradient_accumulation_equals_the_big_batch(per_example):
    big, micro = small_cnn(), small_cnn()
    micro.load_state_dict(big.state_dict())
    x, target = torch.randn(8, 2, 8, 8, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    big_capture = covariance_capture(big, per_example, micro_batches=1)
    F.mse_loss(big(x), target).backward()
    micro_capture = covariance_capture(micro, per_example, micro_batches=4)
    for xs, ts in zip(x.chunk(4), target.chunk(4)):
        (F.mse_loss(micro(xs), ts) / 4).backward()
    for name, layer in micro_capture.layers.items():
        ref = big_capture.layers[name]
        assert layer.calls == layer.grad_calls == 4 and ref.calls == 1
        assert layer.input_row_count == ref.input_row_count
        close(layer.input_stat, ref.input_stat)
        close(layer.grad_output_stat, ref.grad_output_stat)
        close(layer.module.weight.grad, ref.module.weight.grad)


@pytest.mark.parametrize("loss_average", [None, "batch", "batch+sequence"])
def test_loss_terms_add_up_over_the_calls_that_got_gradients(loss_average):
    """``loss_terms``: the calls' loss-term counts summed (None: 1 once any gradient arrived); a call
    whose output gets no gradient is not counted, ``clear()`` resets."""
    model = Twice().double()
    capture = LayerCapture(model, loss_average=loss_average)
    capture.arm()
    assert capture.layers["lin"].loss_terms == 0
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    sum_loss(model(x)).backward()
    model.lin(x[:2])  # captured, never backpropagated
    expected = {None: 1, "batch": 2 * 3, "batch+sequence": 2 * 15}[loss_average]
    assert capture.layers["lin"].loss_terms == expected and capture.layers["lin"].calls == 3
    assert capture.layers["out"].loss_terms == (expected // 2 if loss_average else 1)
    capture.clear()
    assert capture.layers["lin"].loss_terms == 0
    with pytest.raises(ValueError, match="loss_average"):
        LayerCapture(Twice(), loss_average="mean")


@pytest.mark.parametrize("layer_kind", ["linear", "linear-no-bias", "conv", "conv-channels-last"])
def test_grad_matrix_reads_and_writes_dw_db(layer_kind):
    """``grad_matrix()`` is ``[dW | db]`` (Conv2d columns (C_in, kh, kw)); without the bias column a view of
    a contiguous weight gradient and a copy of a channels-last one; ``write_grad`` stores a matrix back
    into both gradients (the bias column optional), in the gradients' memory format."""
    torch.manual_seed(0)
    module = (nn.Conv2d(2, 3, 2) if layer_kind.startswith("conv") else
              nn.Linear(4, 3, bias=layer_kind != "linear-no-bias")).double()
    if layer_kind == "conv-channels-last":
        module.to(memory_format=torch.channels_last)
    capture = LayerCapture(module)
    layer = capture.layers[""]
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    weight_matrix = module.weight.grad.reshape(3, -1)  # Conv2d: (C_out, C_in kh kw), whatever the memory format
    expected = weight_matrix if module.bias is None else torch.cat([weight_matrix, module.bias.grad[:, None]], 1)
    assert torch.equal(layer.grad_matrix(), expected)
    view = layer.grad_matrix(with_bias=False)
    assert torch.equal(view, weight_matrix)
    assert (view.data_ptr() == module.weight.grad.data_ptr()) == (layer_kind != "conv-channels-last")
    new = torch.randn_like(expected)
    layer.write_grad(new)
    assert torch.equal(module.weight.grad.reshape(3, -1), new[:, :layer.in_features])
    if module.bias is not None:
        assert torch.equal(module.bias.grad, new[:, -1])
    if layer_kind == "conv-channels-last":
        assert module.weight.grad.is_contiguous(memory_format=torch.channels_last)
    in_place = layer.grad_matrix(with_bias=False)
    in_place.mul_(2)
    layer.write_grad(in_place)
    assert torch.equal(module.weight.grad.reshape(3, -1), 2 * new[:, :layer.in_features])
    capture.remove()


def test_nothing_captured_without_grad_or_in_eval():
    model = small_cnn()
    rec = Recorder()
    capture = rec.capture(model)
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        model(x)
    with torch.inference_mode():
        model(x)
    model.eval()
    sum_loss(model(x)).backward()
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()
    assert not model(x).requires_grad  # no backward can come: not captured either
    assert not rec.inputs and not rec.grads
    assert all(layer.calls == layer.input_row_count == 0 for layer in capture.layers.values())
    # in training mode, with the layers' outputs requiring grad (through x), the same forward is captured
    model(x.requires_grad_(True)).sum().backward()
    assert all(layer.calls == layer.grad_calls == 1 for layer in capture.layers.values())


def test_arming_and_memory():
    model = small_cnn()
    rec = Recorder()
    capture = LayerCapture(model, input_fn=rec.input_fn, grad_output_fn=rec.grad_fn)
    assert not capture.armed  # starts disarmed

    def step(check_hooks):
        x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
        hidden = model[:4](x)
        out = model[4:](hidden)
        assert check_hooks(hidden)
        sum_loss(out).backward()
        return weakref.ref(hidden)

    gone = step(lambda hidden: not hidden._backward_hooks)
    gc.collect()
    assert gone() is None and not rec.inputs and not rec.grads
    assert all(layer.calls == 0 and layer.input_stat is None for layer in capture.layers.values())
    assert not any(isinstance(v, torch.Tensor) for v in vars(capture).values())

    capture.armed = True  # the setter the optimizers use: arm() / disarm()
    assert capture.armed
    model.zero_grad()
    gone = step(lambda hidden: hidden._backward_hooks)  # the grad-output hook is on the output
    gc.collect()
    assert gone() is None  # armed: rows are transient, the activation is not kept either
    check_gradient_identity(capture, rec)

    # disarming between forward and backward still delivers the gradients of captured calls ...
    capture.clear()
    model.zero_grad()
    out = model(torch.randn(3, 2, 8, 8, dtype=torch.float64))
    capture.armed = False
    assert not capture.armed
    sum_loss(out).backward()
    check_gradient_identity(capture, rec)
    # ... clearing between them drops them
    capture.arm()
    out = model(torch.randn(3, 2, 8, 8, dtype=torch.float64))
    capture.clear()
    sum_loss(out).backward()
    assert all(layer.calls == layer.grad_calls == 0 for layer in capture.layers.values())

    capture.remove()
    model(torch.randn(3, 2, 8, 8, dtype=torch.float64))
    assert all(layer.calls == 0 for layer in capture.layers.values())


# ------------------------------------------------------------------ selection


class MyLinear(nn.Linear):
    """A subclass with a parameter of its own (not preconditioned: other_params lists it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_features))

    def forward(self, x):
        return super().forward(x) * self.gain


class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.norm = nn.LayerNorm(6)
        self.encoder = nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 6, bias=False))
        self.mine = MyLinear(6, 6)
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.head = nn.Linear(6, 3)
        self.attn = nn.MultiheadAttention(6, 2)
        self.scale = nn.Parameter(torch.ones(()))


def test_selection_and_other_params():
    model = Zoo()
    capture = LayerCapture(model)
    assert list(capture.layers) == ["encoder.0", "encoder.2", "mine", "conv", "head"]
    others = capture.other_params()
    assert list(others) == ["scale", "embed.weight", "norm.weight", "norm.bias", "mine.gain", "bn.weight", "bn.bias",
                           "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"]
    assert all(p is dict(model.named_parameters())[n] for n, p in others.items())
    captured = [p for layer in capture.layers.values() for p in (layer.module.weight, layer.module.bias)
                if p is not None]
    assert len(captured) + len(others) == len(list(model.parameters()))

    skipped = LayerCapture(model, skip_layers=["encoder", "head", MyLinear])
    assert list(skipped.layers) == ["conv"]
    assert "encoder.0.weight" in skipped.other_params() and "mine.weight" in skipped.other_params()
    assert list(LayerCapture(model, skip_layers=[nn.Conv2d, "encoder.2"]).layers) == ["encoder.0", "mine", "head"]
    assert list(LayerCapture(model, layer_types=(MyLinear,)).layers) == ["mine"]
    assert list(LayerCapture(model, layer_types=(nn.Conv2d,)).layers) == ["conv"]


def test_construction_errors():
    model = Zoo()
    with pytest.raises(ValueError, match="no module named 'encoder.9'"):
        LayerCapture(model, skip_layers=["encoder.9"])
    with pytest.raises(ValueError, match="no module named 'module.head'"):
        LayerCapture(model, skip_layers=["module.head"])  # the prefix is only understood under DDP
    with pytest.raises(TypeError, match="skip_layers"):
        LayerCapture(model, skip_layers=[3])
    with pytest.raises(ValueError, match="layer_types"):
        LayerCapture(model, layer_types=(nn.Conv1d,))
    grouped = LayerCapture(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 1)))
    assert list(grouped.layers) == ["1"] and list(grouped.other_params()) == ["0.weight", "0.bias"]
    with pytest.raises(ValueError, match="lazy"):
        LayerCapture(nn.Sequential(nn.LazyLinear(3)))
    tied = Zoo()
    tied.head = nn.Linear(6, 10, bias=False)
    tied.head.weight = tied.embed.weight
    with pytest.raises(ValueError, match="'head'.*tied"):
        LayerCapture(tied)
    assert "embed.weight" in LayerCapture(tied, skip_layers=["head"]).other_params()

    class Pair(nn.Linear):
        def forward(self, x):
            return super().forward(x), x

    capture = LayerCapture(nn.Sequential(Pair(2, 2)))
    capture.arm()
    with pytest.raises(TypeError, match="must return one tensor"):
        capture.model(torch.randn(1, 2))


# ------------------------------------------------------------------ AMP


def test_autocast_bf16():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 4))
    rec = Recorder()
    seen = {}

    def inputs(layer, call, a):
        seen[layer.name] = (a.dtype, torch.is_autocast_enabled("cpu"))
        rec.input_fn(layer, call, a)
        return a.T @ a  # not under autocast: fp32 rows give an fp32 (not bf16) product

    capture = LayerCapture(model, input_fn=inputs, grad_output_fn=rec.grad_fn)
    capture.arm()
    x = torch.randn(32, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    sum_loss(y.float()).backward()
    assert seen == {"0": (torch.float32, False), "2": (torch.bfloat16, False)}
    assert capture.layers["0"].input_stat.dtype == torch.float32
    close(capture.layers["0"].input_stat.double(), x.double().T @ x.double(), 1e-5)
    assert rec.grads["2", 0].dtype == torch.bfloat16
    check_gradient_identity(capture, rec, tol=5e-2)


def sum_loss_fixed(y):
    return (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum()


def test_grad_scale_is_divided_out():
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x = torch.randn(6, 5)
    rec = Recorder()
    capture = rec.capture(model)
    sum_loss_fixed(model(x)).backward()
    ref = dict(rec.grads)
    scale = torch.tensor(1.0)
    for loss_scale, given in [(8.0, 8.0), (2.0**20, scale)]:
        capture.set_grad_scale(given)
        y = model(x)
        scale.fill_(2.0**20)  # a scale tensor is read when the backward runs
        (sum_loss_fixed(y) * loss_scale).backward()
        for key in ref:
            assert rec.grads[key].dtype == torch.float32
            close(rec.grads[key], ref[key], 0)
    with pytest.raises(ValueError, match="> 0"):
        capture.set_grad_scale(0.0)
    with pytest.raises(TypeError, match="GradScaler"):
        capture.set_grad_scale("8")


class FactorSGD(torch.optim.Optimizer):
    """A minimal consumer of the capture the way kfopt's optimizers use it with a GradScaler: the
    scaler always calls step() (``_step_supports_amp_scaling``) with ``found_inf`` and ``grad_scale``;
    a skipped step leaves the factors and parameters unchanged and clears the capture. Plain SGD."""

    _step_supports_amp_scaling = True

    def __init__(self, model, capture):
        super().__init__(model.parameters(), dict(lr=0.1))
        self.capture = capture
        self.factors = {name: 0.0 for name in capture.layers}

    @torch.no_grad()
    def step(self):
        found_inf = getattr(self, "found_inf", torch.zeros(()))
        if not found_inf.item():
            for name, layer in self.capture.layers.items():
                self.factors[name] = self.factors[name] + layer.grad_output_stat
            scale = getattr(self, "grad_scale", None)
            for group in self.param_groups:
                for p in group["params"]:
                    p.sub_(group["lr"] * (p.grad if scale is None else p.grad / scale))
        self.capture.clear()


def test_grad_scaler_unscales_and_skipped_steps_are_discarded():
    def factor_run(model, batches, scaler):
        capture = LayerCapture(model, grad_output_fn=lambda layer, call, g: g.double().T @ g.double())
        capture.arm()
        opt = FactorSGD(model, capture)
        if scaler is not None:
            capture.set_grad_scale(scaler)
        for x, weight in batches:
            opt.zero_grad()
            loss = sum_loss_fixed(model(x)) * weight
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        return opt.factors

    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    reference = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    reference.load_state_dict(model.state_dict())
    x1, x3 = torch.randn(6, 5), torch.randn(6, 5)
    poisoned = (torch.randn(6, 5), 1e36)  # finite loss, but its scaled gradients overflow: skipped
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    got = factor_run(model, [(x1, 1.0), poisoned, (x3, 1.0)], scaler)
    assert scaler.get_scale() == 2.0**15  # the step was skipped (and the last step ran at the new scale)
    want = factor_run(reference, [(x1, 1.0), (x3, 1.0)], None)
    for name in want:
        assert torch.isfinite(got[name]).all()
        close(got[name], want[name], 1e-6)


# ------------------------------------------------------------------ torchrun: DDP and FSDP


class DistNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(3 * 4 * 4, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(self.act(self.conv(x)).flatten(1))))


def ddp_and_fsdp_on_rank(rank, world):
    """Per-rank program: capture through DistributedDataParallel (local rows reproduce the local
    gradient; their rank average is DDP's averaged gradient), then FSDP2 (accepted) and the errors of
    FSDP1 and of a DTensor parameter without fully_shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.nn.parallel import DistributedDataParallel

    from kfopt.collectives import all_reduce_average_async

    torch.manual_seed(0)
    plain = DistNet().double()
    ddp = DistributedDataParallel(copy.deepcopy(plain))
    rec = Recorder()
    capture = rec.capture(ddp, skip_layers=["module.head"])
    same = LayerCapture(ddp, skip_layers=["head"])
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    target = torch.ones(4, 2, dtype=torch.float64)
    F.mse_loss(plain(x), target).backward()  # this rank's local gradient
    F.mse_loss(ddp(x), target).backward()  # DDP: averaged over the ranks
    gw = [sum(rec.grads[name, c].T @ rec.inputs[name, c] for c in range(layer.calls)).reshape(layer.module.weight.shape)
          for name, layer in capture.layers.items()]
    local_error = max(float((g - getattr(plain, name).weight.grad).abs().max())
                      for g, name in zip(gw, capture.layers))
    all_reduce_average_async(gw).wait()
    averaged_error = max(float((g - layer.module.weight.grad).abs().max())
                         for g, layer in zip(gw, capture.layers.values()))
    result = {"layers": list(capture.layers), "same": list(same.layers), "others": list(capture.other_params()),
              "calls": [layer.calls for layer in capture.layers.values()],
              "local_error": local_error, "averaged_error": averaged_error}

    sharded = DistNet()
    fully_shard(sharded.fc)
    fully_shard(sharded)
    fsdp1 = FullyShardedDataParallel(DistNet(), device_id=torch.device("cpu"))
    parallel = DistNet()  # tensor parallelism: a DTensor weight in a plain module
    mesh = init_device_mesh("cpu", (world,))
    parallel.fc.weight = nn.Parameter(distribute_tensor(parallel.fc.weight.detach(), mesh, [Shard(0)]))
    for key, model in [("fsdp2", sharded), ("fsdp1", fsdp1), ("dtensor", parallel)]:
        try:
            LayerCapture(model)
            result[key] = None
        except NotImplementedError as err:
            result[key] = str(err)
    return result


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_ddp_capture_and_fsdp_errors():
    for res in run_torchrun(ddp_and_fsdp_on_rank, 2):
        assert res["layers"] == res["same"] == ["conv", "fc"]  # no "module." prefix; head skipped both ways
        assert res["others"] == ["head.weight", "head.bias"]
        assert res["calls"] == [1, 1]
        assert res["local_error"] < 1e-12 and res["averaged_error"] < 1e-12
        assert res["fsdp2"] is None  # fully_shard row shards are accepted
        assert "'<root>' is sharded by FSDP (FullyShardedDataParallel)" in res["fsdp1"]
        assert "parameter 'fc.weight' is a DTensor" in res["dtensor"]
