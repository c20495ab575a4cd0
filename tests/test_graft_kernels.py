"""The grafting kernel (``kfopt.kernels.graft``; Triton, interpreted on CPU) against float64: the library
reference and equations written here, odd shapes, every storage dtype, poisoned outputs, skips and
aliasing."""

import pytest
import torch
from checks import assert_rel_close, rel_error

import kfopt.kernels.graft as graft_module
from kfopt.autotune import Config, ConfigSpace
from kfopt.kernels.graft import graft_step, graft_step_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
F64 = torch.float64
SHAPES = [(5, 7), (33,), (1,), (3, 1, 4), (40, 3), (2, 2)]


@pytest.fixture
def medium_chunks(monkeypatch):
    """Chunks of 32 elements in blocks of 16: tensors span several chunks and partial blocks."""
    small = Config({"BLOCK": 16, "CHUNK": 32}, num_warps=4)
    monkeypatch.setattr(graft_module, "GRAFT_CONFIGS", ConfigSpace("graft_step", [small], small))


def make_tensors(shape, dtype, gen, device, step=3.0, buffer=True):
    """[param, grad, direction, exp_avg, exp_avg_sq, momentum_buffer or None, step]: random, v >= 0."""
    p = torch.randn(shape, generator=gen).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    d = (3 * torch.randn(shape, generator=gen)).to(dtype)
    m = 0.1 * torch.randn(shape, generator=gen)
    v = 0.1 * torch.rand(shape, generator=gen)
    b = torch.randn(shape, generator=gen) if buffer else None
    return [t.to(device) if t is not None else None for t in (p, g, d, m, v, b, torch.tensor(step))]


def to64(tensors):
    return [[t.to(F64).cpu() if t is not None else None for t in ts] for ts in tensors]


def columns(tensors):
    return [list(c) for c in zip(*tensors)]


HYPER = dict(lr=0.05, beta1=0.8, beta2=0.95, graft_eps=1e-6, weight_decay=0.02)


@pytest.mark.parametrize("dtype", DTYPES)
def test_step_matches_float64_reference(dtype, medium_chunks, poison_empty, device):
    """Every output of one multi-tensor step vs the float64 reference: odd shapes, per-tensor grafts,
    momentum, preconditioned and first-order tensors."""
    gen = torch.Generator().manual_seed(0)
    n = len(SHAPES)
    tensors = [make_tensors(s, dtype, gen, device, buffer=i != 2) for i, s in enumerate(SHAPES)]
    want = to64(tensors)
    hyper = dict(HYPER, graft=["adam", "rmsprop", "sgd", "adam", "adam", "rmsprop"],
                 momentum=[0.9, 0.5, 0.0, 0.9, 0.0, 0.9], precondition=[True, True, True, False, True, True])
    ok = graft_step(*columns(tensors), **hyper)
    ref_ok = graft_step_reference(*columns(want), **hyper)
    assert ok.item() == 1 and ref_ok.item() == 1
    for i in range(n):
        for col, name in ((0, "param"), (3, "exp_avg"), (4, "exp_avg_sq"), (5, "momentum_buffer")):
            if tensors[i][col] is not None:
                assert_rel_close(tensors[i][col], want[i][col], dtype if col == 0 else torch.float32,
                                 name=f"{name}[{i}]")
        assert tensors[i][6].item() == 4.0


def graft_by_hand(w, g, p_dir, m, v, buf, step, lr, b1, b2, eps, wd, mom, graft, precondition):
    """One grafted step of one tensor in float64 from the module docstring, no library helper."""
    t = step + 1
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    rms = (v / (1 - b2 ** t)).sqrt() + eps
    a = {"adam": m / (1 - b1 ** t) / rms, "rmsprop": g / rms, "sgd": g}[graft]
    if precondition:
        q = p_dir
        if buf is not None:
            buf = mom * buf + p_dir
            q = buf
        d = a.norm() / q.norm() * q
    else:
        d = a
    return w - lr * (d + wd * w), m, v, buf


def test_two_steps_match_the_equations_written_here(medium_chunks, poison_empty, device):
    """Two steps of several tensors in one call against ``graft_by_hand`` (not the library reference or
    its hyperparameter packer): each graft, with and without momentum, a first-order tensor."""
    gen = torch.Generator().manual_seed(1)
    cases = [((5, 7), "adam", 0.9, True), ((33,), "rmsprop", 0.0, True), ((6, 3), "sgd", 0.5, True),
             ((9,), "adam", 0.0, False)]
    hyper = dict(HYPER, graft=[c[1] for c in cases], momentum=[c[2] for c in cases],
                 precondition=[c[3] for c in cases])
    tensors = [make_tensors(c[0], torch.float32, gen, device, buffer=c[2] != 0) for c in cases]
    want = to64(tensors)
    for _ in range(2):
        for ts, w in zip(tensors, want):
            ts[1] = torch.randn(ts[0].shape, generator=gen).to(device)
            ts[2] = (5 * torch.randn(ts[0].shape, generator=gen)).to(device)
            w[1], w[2] = ts[1].to(F64).cpu(), ts[2].to(F64).cpu()
        graft_step(*columns(tensors), **hyper)
        for w, c in zip(want, cases):
            w[0], w[3], w[4], w[5] = graft_by_hand(w[0], w[1], w[2], w[3], w[4], w[5], w[6].item(), hyper["lr"],
                                                   hyper["beta1"], hyper["beta2"], hyper["graft_eps"],
                                                   hyper["weight_decay"], c[2], c[1], c[3])
            w[6] = w[6] + 1
    for i, (out, w) in enumerate(zip(tensors, want)):
        for col, name in ((0, "param"), (3, "exp_avg"), (4, "exp_avg_sq"), (5, "momentum_buffer")):
            if out[col] is not None:
                assert_rel_close(out[col], w[col], tol=2e-5, name=f"{name}[{i}] ({cases[i][1]})")
        assert out[6].item() == w[6].item()
    # the grafted step has the first-order method's length: ||w_new - w + lr wd w|| = lr ||a||


def test_step_length_is_the_first_order_length(device):
    """||d|| = ||a|| whatever the scale of the direction: scaling P by 1e6 changes nothing."""
    gen = torch.Generator().manual_seed(2)
    runs = []
    for scale in (1.0, 1e6):
        ts = make_tensors((4, 6), torch.float32, gen if scale == 1.0 else torch.Generator().manual_seed(2),
                          device, buffer=False)
        ts[2] = ts[2] * scale
        graft_step(*columns([ts]), lr=0.1)
        runs.append(ts[0].clone())
    assert_rel_close(runs[1], runs[0], torch.float32, name="param")


def test_mixed_dtypes_in_one_call(medium_chunks, poison_empty, device):
    """Tensors of several param/grad/direction dtypes: one launch per dtype group."""
    gen = torch.Generator().manual_seed(3)
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.float32]
    tensors = [make_tensors(s, dt, gen, device) for s, dt in zip([(5, 9), (40,), (3, 3), (2,)], dtypes)]
    tensors[1][2] = tensors[1][2].to(torch.bfloat16)  # a bf16 direction for an fp32 param
    want = to64(tensors)
    graft_step(*columns(tensors), **HYPER, momentum=0.9)
    graft_step_reference(*columns(want), **HYPER, momentum=0.9)
    for i, (out, w) in enumerate(zip(tensors, want)):
        assert_rel_close(out[0], w[0], dtypes[i], name=f"param[{i}]")
        assert_rel_close(out[5], w[5], torch.float32, name=f"momentum_buffer[{i}]")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy, on purpose
@pytest.mark.parametrize("where", ["grad", "direction", "overflow"])
def test_non_finite_update_skips_every_tensor(where, medium_chunks, device):
    """A NaN gradient, an inf direction (a factor that blew up) or a sum of squares overflowing fp32 in
    one tensor: nothing is written anywhere, the step counters stay, ``skipped`` counts one."""
    gen = torch.Generator().manual_seed(4)
    tensors = [make_tensors(s, torch.float32, gen, device) for s in SHAPES[:3]]
    if where == "grad":
        tensors[1][1][7] = float("nan")
    elif where == "direction":
        tensors[2][2][0] = float("inf")
    else:
        tensors[0][2].fill_(3e19)  # finite, but sum q^2 > fp32 max
    before = [[t.clone() if t is not None else None for t in ts] for ts in tensors]
    skipped = torch.zeros((), dtype=torch.int32, device=device)
    ok = graft_step(*columns(tensors), **HYPER, momentum=0.9, skipped=skipped)
    assert ok.item() == 0 and skipped.item() == 1
    for ts, bs in zip(tensors, before):
        for t, b in zip(ts, bs):
            if t is not None:
                assert torch.allclose(t, b, rtol=0, atol=0, equal_nan=True)
    ref = to64(before)
    if where != "overflow":  # float64 does not overflow there
        ref_skipped = torch.zeros((), dtype=torch.int32)
        assert graft_step_reference(*columns(ref), **HYPER, momentum=0.9, skipped=ref_skipped).item() == 0
        assert ref_skipped.item() == 1


def test_found_inf_flag_skips_the_step(device):
    """The caller's own verdict (``found_inf`` nonzero): nothing written, counted; zero: the step runs."""
    gen = torch.Generator().manual_seed(11)
    for flag, moved in ((1.0, False), (0.0, True)):
        ts = make_tensors((3, 5), torch.float32, gen, device)
        w = ts[0].clone()
        skipped = torch.zeros((), dtype=torch.int32, device=device)
        ok = graft_step(*columns([ts]), lr=0.1, skipped=skipped, found_inf=torch.tensor(flag, device=device))
        assert ok.item() == float(moved) and skipped.item() == int(not moved)
        assert torch.equal(ts[0], w) != moved


def test_zero_direction_gives_zero_preconditioned_update(device):
    """||q|| = 0: d = 0 (only weight decay moves the param), the moments still advance."""
    gen = torch.Generator().manual_seed(5)
    ts = make_tensors((3, 5), torch.float32, gen, device, buffer=False)
    ts[2] = torch.zeros_like(ts[2])
    w = ts[0].clone()
    m = ts[3].clone()
    graft_step(*columns([ts]), lr=0.1, weight_decay=0.5)
    assert_rel_close(ts[0], w * (1 - 0.05), torch.float32, name="param")
    assert not torch.equal(ts[3], m)


def test_empty_and_zero_size_tensors(device):
    assert graft_step([], [], [], [], [], [], [], lr=0.1).item() == 1
    gen = torch.Generator().manual_seed(6)
    tensors = [make_tensors((0, 3), torch.float32, gen, device), make_tensors((4,), torch.float32, gen, device)]
    w = tensors[1][0].clone()
    graft_step(*columns(tensors), lr=0.1)
    assert not torch.equal(tensors[1][0], w)
    assert tensors[0][6].item() == 4.0


def test_non_contiguous_param(device):
    gen = torch.Generator().manual_seed(7)
    ts = make_tensors((6, 4), torch.float32, gen, device)
    base = torch.randn(4, 6, generator=gen).to(device)
    ts[0] = base.t()
    want = to64([ts])
    graft_step(*columns([ts]), **HYPER, momentum=0.9)
    graft_step_reference(*columns(want), **HYPER, momentum=0.9)
    assert_rel_close(base.t(), want[0][0], torch.float32, name="param")


@pytest.mark.parametrize("bad,match", [
    (dict(lr=-1.0), r"lr: expected a number in \[0, inf\), got -1.0"),
    (dict(lr=[float("nan")]), r"lr\[0\]: expected a number in \[0, inf\)"),
    (dict(graft="lion"), r"graft: expected one of \['adam', 'rmsprop', 'sgd'\]"),
    (dict(graft_eps=0.0), r"graft_eps: expected a number in \(0, inf\)"),
    (dict(momentum=-0.5), r"momentum: expected a number in \[0, inf\)"),
    (dict(beta2=1.0), r"beta2: bias correction needs a decay rate in \[0, 1\)"),
    (dict(momentum=0.9, buffers=False), r"momentum_buffers\[0\]: None \(no buffer\) but momentum = 0.9"),
    (dict(shape=(3, 4)), r"directions\[0\]: expected shape \(4, 3\), got \(3, 4\)"),
], ids=str)
def test_bad_inputs_raise_before_any_write(bad, match, device):
    gen = torch.Generator().manual_seed(8)
    ts = make_tensors((4, 3), torch.float32, gen, device, buffer=bad.pop("buffers", True))
    if "shape" in bad:
        ts[2] = torch.zeros(bad.pop("shape"))
    before = [t.clone() if t is not None else None for t in ts]
    with pytest.raises(ValueError, match=match):
        graft_step(*columns([ts]), **{"lr": 0.1, **bad})
    for t, b in zip(ts, before):
        if t is not None:
            assert torch.equal(t, b)


@pytest.mark.parametrize("case,match", [
    ("shared step", r"steps\[1\] is the same tensor as steps\[0\]"),
    ("param twice", r"params\[1\] is the same tensor as params\[0\]"),
    ("buffer over exp_avg", r"momentum_buffers\[0\] (overlaps the memory of|is the same tensor as) exp_avgs\[0\]"),
    ("direction over exp_avg_sq", r"directions\[0\] is the same tensor as exp_avg_sqs\[1\]"),
])
def test_rejects_tensors_sharing_memory(case, match, device):
    gen = torch.Generator().manual_seed(9)
    cols = columns([make_tensors((3, 4), torch.float32, gen, device) for _ in range(2)])
    if case == "shared step":
        cols[6][1] = cols[6][0]
    elif case == "param twice":
        cols[0][1] = cols[0][0]
    elif case == "buffer over exp_avg":
        cols[5][0] = cols[3][0]
    else:
        cols[2][0] = cols[4][1]
    before = [[t.clone() for t in c] for c in cols]
    with pytest.raises(ValueError, match=match):
        graft_step(*cols, lr=0.1)
    for c, b in zip(cols, before):
        for t, u in zip(c, b):
            assert torch.equal(t, u)


def test_gradient_passed_as_direction_is_accepted(device):
    """A first-order tensor passes its gradient as its direction (read-only sharing is safe)."""
    gen = torch.Generator().manual_seed(10)
    ts = make_tensors((3, 4), torch.float32, gen, device, buffer=False)
    ts[2] = ts[1]
    want = to64([ts])
    graft_step(*columns([ts]), lr=0.1, precondition=False)
    graft_step_reference(*columns(want), lr=0.1, precondition=False)
    assert_rel_close(ts[0], want[0][0], torch.float32, name="param")


# ----------------------------------------------------------------------------- dim-0 shards (FSDP2)


#: tensors and the row cuts of their three shards (FSDP2's dim-0 chunks): uneven, empty, a 0-d-like one
SHARDED = [((7, 3), (0, 3, 3, 7)), ((33,), (0, 11, 22, 33)), ((5, 2, 3), (0, 1, 5, 5)), ((2, 4), (0, 2, 2, 2))]
SHARDED_HYPER = dict(HYPER, graft=["adam", "rmsprop", "sgd", "adam"], momentum=[0.9, 0.0, 0.5, 0.0],
                     precondition=[True, True, True, False])


class _Recorded(Exception):
    """Ends a shard's step at its all-reduce, whose sum is not known yet."""


def step_shards(step, whole, **hyper):
    """Each shard (``SHARDED``'s cuts of every tensor of ``whole``, rows ``cut[k]:cut[k + 1]``) stepped on
    its own, the all-reduce simulated: a first round records what every shard hands ``reduce`` (on copies,
    the step ends there), the second steps the shards with the sum. Returns each shard's tensors, its ``ok``
    and ``skipped``, and the shape of what went through ``reduce``."""
    def shard(k):
        return [[t[cut[k]:cut[k + 1]].clone() if t is not None and t.dim() else
                 (t.clone() if t is not None else None) for t in ts] for ts, (_, cut) in zip(whole, SHARDED)]

    seen = []

    def record(t):
        seen.append(t.clone())
        raise _Recorded

    for k in range(3):
        with pytest.raises(_Recorded):
            step(*columns(shard(k)), reduce=record, **hyper)
    total = torch.stack(seen).sum(0)
    calls = []

    def known(t):
        calls.append(t.shape)
        t.copy_(total.to(t.dtype))

    shards = []
    for k in range(3):
        tensors = shard(k)
        skipped = torch.zeros((), dtype=torch.int32, device=tensors[0][0].device)
        ok = step(*columns(tensors), reduce=known, skipped=skipped, **hyper)
        shards.append((tensors, ok.item(), skipped.item()))
    return shards, calls


def put_together(shards, i, col):
    return torch.cat([tensors[i][col] for tensors, _, _ in shards])


@pytest.mark.parametrize("dtype", DTYPES)
def test_shards_equal_the_whole_tensor(dtype, medium_chunks, poison_empty, device):
    """Every tensor cut into three dim-0 shards (uneven, empty) stepped shard by shard with the sums of
    squares reduced (one all-reduce of ``2 T`` values): the shards' outputs put together equal the float64
    reference on the whole tensors -- the Triton kernel at the dtype's tolerance, the PyTorch reference
    (float64 shards, same ``reduce``) to 1e-12. Without the reduce the shards' norms differ (the check
    would fail)."""
    gen = torch.Generator().manual_seed(12)
    whole = [make_tensors(shape, dtype, gen, device, buffer=i != 1) for i, (shape, _) in enumerate(SHARDED)]
    truth = to64(whole)
    graft_step_reference(*columns(truth), **SHARDED_HYPER)
    for step, inputs, tol in ((graft_step, whole, None), (graft_step_reference, to64(whole), 1e-12)):
        shards, calls = step_shards(step, inputs, **SHARDED_HYPER)
        assert calls == [torch.Size([len(SHARDED), 2])] * 3, "one all-reduce of (sum a^2, sum q^2) per tensor"
        assert all(ok == 1 and skipped == 0 for _, ok, skipped in shards)
        for i, want in enumerate(truth):
            for col, name in ((0, "param"), (3, "exp_avg"), (4, "exp_avg_sq"), (5, "momentum_buffer")):
                if want[col] is not None:
                    assert_rel_close(put_together(shards, i, col), want[col], dtype if col == 0 else torch.float32,
                                     tol=tol, name=f"{step.__name__} {name}[{i}]")
            assert all(tensors[i][6].item() == 4.0 for tensors, _, _ in shards)
    alone = [[t.clone() if t is not None else None for t in ts] for ts in whole]  # a shard's own norms differ
    graft_step(*columns([[t[:3] if t is not None and t.dim() else t for t in alone[0]]]), **HYPER, momentum=0.9)
    assert rel_error(alone[0][0][:3], truth[0][0][:3]) > 1e-3


@pytest.mark.parametrize("where", ["grad", "direction"])
def test_a_non_finite_value_in_one_shard_skips_every_shard(where, medium_chunks, device):
    """A NaN gradient or an inf direction in one shard only: the summed norm is not finite on every shard,
    so no shard writes anything, every ``ok`` is 0 and every ``skipped`` 1 (kernel and reference)."""
    for step in (graft_step, graft_step_reference):
        gen = torch.Generator().manual_seed(13)
        whole = [make_tensors(shape, torch.float32, gen, device) for shape, _ in SHARDED]
        if where == "grad":
            whole[1][1][25] = float("nan")  # the third shard's rows of tensor 1
        else:
            whole[0][2][1, 2] = float("inf")  # the first shard's
        before = [[t.clone() if t is not None else None for t in ts] for ts in whole]
        shards, _ = step_shards(step, whole, **dict(SHARDED_HYPER, momentum=0.9))
        assert [(ok, skipped) for _, ok, skipped in shards] == [(0, 1)] * 3, step.__name__
        for i, want in enumerate(before):
            for col in (0, 3, 4, 5):
                assert torch.equal(put_together(shards, i, col), want[col]), (step.__name__, i, col)
            assert all(tensors[i][6].item() == 3.0 for tensors, _, _ in shards)


@pytest.mark.parametrize("graft", ["adam", "rmsprop", "sgd"])
def test_sonew_takes_the_same_graft_as_graft_step(graft, device):
    """SONew's in-kernel graft and ``graft_step`` share the graft's math (``kernels.graft.graft_vector`` and
    ``graft_ratio``): from the same gradient and moments, SONew's step on a preconditioned tensor has
    ``graft_step``'s length ``lr ||a||`` whatever the two directions, both store the same moments, and a
    tensor neither preconditions takes the same Adam step in both."""
    from kfopt.kernels.sonew import sonew_step

    gen = torch.Generator().manual_seed(3)
    shapes = [(6, 5), (7,)]
    grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
    moments = [(0.1 * torch.randn(s, generator=gen)).to(device) for s in shapes]
    squares = [(0.1 * torch.rand(s, generator=gen)).to(device) for s in shapes]
    hyper = dict(lr=0.05, beta1=0.8, beta2=0.95, graft_eps=1e-6, precondition=[True, False])
    steps = lambda: [torch.tensor(3.0, device=device) for _ in shapes]  # noqa: E731
    zeros = lambda: [torch.zeros(s, device=device) for s in shapes]  # noqa: E731

    w_sonew, m_sonew, v_sonew = zeros(), [m.clone() for m in moments], [v.reshape(-1).clone() for v in squares]
    offdiags = [torch.zeros((len(s) - 1, g.numel()), device=device) for s, g in zip(shapes, grads)]
    sonew_step(w_sonew, grads, m_sonew, v_sonew, offdiags, steps(), graft=graft, **hyper)

    w_graft, m_graft, v_graft = zeros(), [m.clone() for m in moments], [v.clone() for v in squares]
    directions = [torch.randn(s, generator=gen).to(device) for s in shapes]
    graft_step(w_graft, grads, directions, m_graft, v_graft, [None, None], steps(), graft=[graft, "adam"], **hyper)

    assert_rel_close(w_sonew[0].norm(), w_graft[0].norm(), tol=1e-6, name="preconditioned step length")
    assert_rel_close(w_sonew[1], w_graft[1], tol=1e-6, name="first-order step")
    for name, mine, theirs in (("exp_avg", m_sonew, m_graft), ("exp_avg_sq", v_sonew, v_graft)):
        for a, b in zip(mine, theirs):
            assert_rel_close(a.reshape(-1), b.reshape(-1), tol=1e-6, name=name)
