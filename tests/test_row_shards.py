"""kfopt.row_shards: FSDP2's row chunks, owner assignment, the gather/scatter exchange and its volume.

One spawn of 4 gloo processes runs every multi-process configuration (process start-up dominates the
cost): world 4 (the world group), world 2 on non-contiguous ranks (two jobs, {0, 2} and {1, 3}, with
different data), world 1 (the shard dimension of a (4, 1) mesh: no collective) and the shard dimension
of an HSDP (2, 2) mesh (the replicas {0, 2} and {1, 3} hold the same shards). The layers have uneven
row counts, fewer rows than ranks (3 and 1 rows on 4 ranks: empty shards), Conv2d-shaped widths, and
fp32, bf16 or mixed dtypes. The same spawn checks the row chunks against real ``distribute_tensor`` and
``fully_shard`` shards, gathers real FSDP2 gradients, counts FSDP2's own reduce-scatter, and runs
K-FAC's preconditioning sharded (the blueprint of the sharded engine) against one process.
"""

import itertools
import math
import random
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import run_distributed
from torch import nn

from kfopt import collectives
from kfopt.kaisa import layer_cost
from kfopt.row_shards import (RowShardPlan, StepVolume, gather_to_owners, row_range, row_ranges,
                              scatter_from_owners)

LAYERS = ((7, 7), (3, 6), (33, 28), (1, 5), (16, 9), (5, 4))  # (rows, cols); 28 = 3 * 3 * 3 + 1
F32, BF16 = torch.float32, torch.bfloat16
DTYPES = {"fp32": (F32,) * 6, "bf16": (BF16,) * 6, "mixed": (F32, BF16, F32, BF16, BF16, F32)}
CONFIGS = ("w4", "w2", "w1", "hsdp22")


def same_bits(a, b) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)))


def matrices(dtypes, seed):
    """The layers' full gradient matrices of a job (every rank of it makes the same ones)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dt) for shape, dt in zip(LAYERS, dtypes)]


def owner_function(layer, m):
    """What an owner does with a whole matrix in the test: ``A @ M @ B`` with random A, B."""
    g = torch.Generator().manual_seed(100 + layer)
    a, b = torch.randn(m.shape[0], m.shape[0], generator=g), torch.randn(m.shape[1], m.shape[1], generator=g)
    return (a @ m.float() @ b).to(m.dtype)


# ------------------------------------------------------------------ one process


def test_row_ranges_are_torch_chunks():
    assert [len(r) for r in row_ranges(33, 2)] == [17, 16]
    assert [len(r) for r in row_ranges(33, 4)] == [9, 9, 9, 6]
    assert row_ranges(3, 4) == [range(0, 1), range(1, 2), range(2, 3), range(3, 3)]
    for rows, ranks in itertools.product(range(1, 41), range(1, 9)):
        ranges = row_ranges(rows, ranks)
        chunks = torch.arange(rows).chunk(ranks)  # fewer chunks than ranks when rows run out
        assert [list(r) for r in ranges] == [c.tolist() for c in chunks] + [[]] * (ranks - len(chunks))
        assert all(row_range(rows, ranks, r) == ranges[r] for r in range(ranks))


def loads(plan, strategy):
    load = [0] * plan.ranks
    for (rows, cols), owner in zip(plan.shapes, plan.owners):
        load[owner] += layer_cost((cols, rows), strategy)
    return load


@pytest.mark.parametrize("strategy", ["compute", "memory"])
def test_owners_are_load_balanced(strategy):
    # four equally expensive layers and small ones on 4 ranks: one expensive layer per rank
    plan = RowShardPlan.balanced([(64, 65), (3, 4), (64, 65), (2, 3), (64, 65), (64, 65), (1, 2)], F32, 4, strategy)
    assert sorted(plan.owners[i] for i in (0, 2, 4, 5)) == [0, 1, 2, 3]
    # random layers: LPT's guarantee, the heaviest rank exceeds the lightest by at most the largest cost
    rng = random.Random(0)
    for ranks in (2, 3, 4, 8):
        shapes = [(rng.randint(1, 300), rng.randint(1, 300)) for _ in range(rng.randint(1, 25))]
        plan = RowShardPlan.balanced(shapes, F32, ranks, strategy)
        load = loads(plan, strategy)
        assert max(load) - min(load) <= max(layer_cost((c, r), strategy) for r, c in shapes), (ranks, load)
        if len(shapes) >= ranks:
            assert min(load) > 0
    # the strategy is the cost: a (100, 1) layer costs more flops than a (75, 75) one, but less memory
    shapes = [(100, 1), (75, 75), (1, 1)]
    assert RowShardPlan.balanced(shapes, F32, 2, "compute").owners == (0, 1, 1)
    assert RowShardPlan.balanced(shapes, F32, 2, "memory").owners == (1, 0, 1)


def test_volume_by_hand():
    # one (3, 2) fp32 layer owned by rank 0 of 2: rank 1 holds row 2 (8 bytes); FSDP2 pads to 4 rows
    plan = RowShardPlan([(3, 2)], F32, 2, [0])
    assert plan.volume(0) == StepVolume(gather_sent=0, gather_received=8, reduce_scatter=16)
    assert plan.volume(1) == StepVolume(gather_sent=8, gather_received=0, reduce_scatter=16)
    assert plan.volume(0).exchange == 8
    # bf16 (5, 3) owned by rank 3 of 4 (rows 2, 2, 1, 0) and fp32 (1, 4) owned by rank 0 (rows 1, 0, 0, 0)
    plan = RowShardPlan([(5, 3), (1, 4)], [BF16, F32], 4, [3, 0])
    assert [plan.volume(r).gather_sent for r in range(4)] == [12, 12, 6, 0]
    assert [plan.volume(r).gather_received for r in range(4)] == [0, 0, 0, 30]
    assert plan.volume(2).reduce_scatter == 3 * (2 * 3 * 2 + 1 * 4 * 4)
    assert plan.gather_splits(0) == ([16, 0, 0, 12], [16, 0, 0, 0])  # its own layer 1: a local copy


def test_the_volume_table_of_the_docs():
    """docs/sharding.md's table (one BERT-base encoder block in fp32) is what ``volume`` gives."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "sharding.md").read_text()
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) MiB \| ([\d.]+) MiB \| ([\d.]+) MiB \|$", page, re.M)
    assert [int(w) for w, *_ in rows] == [2, 4, 8, 16]
    shapes = [(768, 769)] * 4 + [(3072, 769), (768, 3073)]
    for ranks, mean, busiest, reduce_scatter in rows:
        volumes = [RowShardPlan.balanced(shapes, F32, int(ranks)).volume(r) for r in range(int(ranks))]
        mib = [v.exchange / 2 ** 20 for v in volumes]
        assert (f"{sum(mib) / len(mib):.1f}", f"{max(mib):.1f}", f"{volumes[0].reduce_scatter / 2 ** 20:.1f}") == (
            mean, busiest, reduce_scatter), ranks
        assert len({v.reduce_scatter for v in volumes}) == 1


def test_bad_arguments_raise_before_any_communication():
    with pytest.raises(ValueError, match=r"shapes\[1\]"):
        RowShardPlan([(2, 3), (0, 3)], F32, 2, [0, 1])
    with pytest.raises(ValueError, match="dtypes"):
        RowShardPlan([(2, 3)], [F32, F32], 2, [0])
    with pytest.raises(ValueError, match="ranks"):
        RowShardPlan.balanced([(2, 3)], F32, 0)
    with pytest.raises(ValueError, match=r"owners\[0\]"):
        RowShardPlan([(2, 3)], F32, 2, [2])
    with pytest.raises(ValueError, match="assignment_strategy"):
        RowShardPlan.balanced([(2, 3)], F32, 2, "fast")
    plan = RowShardPlan([(2, 3), (4, 1)], [F32, BF16], 1, [0, 0])
    good = [torch.zeros(2, 3), torch.zeros(4, 1, dtype=BF16)]
    with pytest.raises(ValueError, match="group: has 1 ranks, the plan was built for 2"):
        gather_to_owners(RowShardPlan([(2, 3)], F32, 2, [0]), good[:1])
    with pytest.raises(ValueError, match="blocks: expected one per layer"):
        gather_to_owners(plan, good[:1])
    with pytest.raises(ValueError, match=r"blocks\[1\].*\(4, 1\), torch.bfloat16"):
        gather_to_owners(plan, [good[0], torch.zeros(4, 1)])
    with pytest.raises(ValueError, match=r"blocks\[0\]"):
        gather_to_owners(plan, [torch.zeros(3, 2), good[1]])
    with pytest.raises(ValueError, match=r"results\[0\]: expected a tensor"):
        scatter_from_owners(plan, [None, good[1]])
    with pytest.raises(ValueError, match="plan"):
        scatter_from_owners(plan.shapes, good)


def test_one_rank_round_trip_returns_new_tensors():
    plan = RowShardPlan.balanced(LAYERS, DTYPES["mixed"], 1)
    full = matrices(DTYPES["mixed"], 0)
    gathered = gather_to_owners(plan, full)
    assert all(same_bits(g, m) and g.data_ptr() != m.data_ptr() for g, m in zip(gathered, full))
    back = scatter_from_owners(plan, [owner_function(i, g) for i, g in enumerate(gathered)])
    assert all(same_bits(b, owner_function(i, m)) for i, (b, m) in enumerate(zip(back, full)))
    # a non-contiguous block (a transposed view) is read in row-major order
    plan = RowShardPlan([(3, 4)], F32, 1, [0])
    t = torch.randn(4, 3)
    assert same_bits(gather_to_owners(plan, [t.T])[0], t.T.contiguous())


# ------------------------------------------------------------------ 4 processes


class CountedAllToAll:
    """Replaces ``dist.all_to_all_single`` while active, recording each call's byte splits."""

    def __init__(self):
        self.calls = []

    def __enter__(self):
        self.real = dist.all_to_all_single
        dist.all_to_all_single = self
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self.real

    def __call__(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                 async_op=False):
        size = input.element_size()
        self.calls.append(dict(rank=dist.get_rank(group), sent=[n * size for n in input_split_sizes],
                               received=[n * size for n in output_split_sizes],
                               send_buffer=input.numel() * size, receive_buffer=output.numel() * size))
        return self.real(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)


def exchange_runs(group, seed):
    """Every dtype set through gather -> owner_function -> scatter on ``group``; returns per dtype set
    what the parent checks, and the error of a scatter given a result on every rank (raised on every
    rank before any communication: no rank waits in a collective)."""
    out = {}
    me = collectives.rank(group)
    plan = RowShardPlan.balanced(LAYERS, F32, collectives.world_size(group))
    try:
        scatter_from_owners(plan, [torch.zeros(shape) for shape in LAYERS], group)
        out["error"] = None
    except ValueError as exc:
        out["error"] = str(exc)
    for name, dtypes in DTYPES.items():
        plan = RowShardPlan.balanced(LAYERS, dtypes, collectives.world_size(group))
        full = matrices(dtypes, seed)
        blocks = [m[plan.rows(i, me).start:plan.rows(i, me).stop].clone() for i, m in enumerate(full)]
        async_op = name == "mixed"
        with CountedAllToAll() as gather_calls:
            gathered = gather_to_owners(plan, blocks, group, async_op=async_op)
            gathered = gathered.wait() if async_op else gathered
        results = [None if g is None else owner_function(i, g) for i, g in enumerate(gathered)]
        with CountedAllToAll() as scatter_calls:
            back = scatter_from_owners(plan, results, group, async_op=async_op)
            back = back.wait() if async_op else back
        expected = [owner_function(i, m)[plan.rows(i, me).start:plan.rows(i, me).stop] for i, m in enumerate(full)]
        out[name] = dict(me=me, plan=plan, full=full, gathered=gathered, back=back, expected=expected,
                         gather_calls=gather_calls.calls, scatter_calls=scatter_calls.calls)
    return out


def dtensor_chunks(rank, meshes):
    """(label, local shard, expected rows of the full tensor) for distribute_tensor and fully_shard."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh4, mesh22, mesh41 = meshes
    out = []
    for rows in (1, 2, 3, 5, 7, 9, 33):
        full = torch.arange(rows * 2.0).view(rows, 2)
        for label, mesh, placements, ranks, me in (
                ("w4", mesh4, [Shard(0)], 4, rank), ("hsdp22", mesh22, [Replicate(), Shard(0)], 2,
                                                     mesh22.get_local_rank("shard")),
                ("w1", mesh41, [Replicate(), Shard(0)], 1, 0)):
            local = distribute_tensor(full, mesh, placements).to_local()
            r = row_range(rows, ranks, me)
            out.append((f"distribute_tensor {label} rows={rows}", local, full[r.start:r.stop]))
    for label, mesh, ranks, me in (("w4", mesh4, 4, rank), ("hsdp22", mesh22, 2, mesh22.get_local_rank("shard"))):
        model = fsdp_model(mesh)
        for name, p in model.named_parameters():
            r = row_range(p.shape[0], ranks, me)
            out.append((f"fully_shard {label} {name}", p.detach().to_local(), p.detach().full_tensor()[r.start:r.stop]))
    return out


def build_model():
    """float64: the comparison with one process then sees the exchange, not fp32 rounding amplified by
    the ill-conditioned factors of a tiny batch."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 33), nn.Tanh(),
                         nn.Linear(33, 7)).double()


def fsdp_model(mesh):
    from torch.distributed.fsdp import fully_shard

    model = build_model()
    for layer in layers_of(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def layers_of(model):
    return [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]


GLOBAL_BATCH = 8
DAMPING = 1e-2


def data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(GLOBAL_BATCH, 2, 4, 4, generator=g, dtype=torch.float64),
            torch.randn(GLOBAL_BATCH, 7, generator=g, dtype=torch.float64))


def gradient_rows(layer, part):
    """``[dW | db]`` rows of a layer's gradient: ``part`` maps a (DTensor or plain) gradient to a tensor."""
    w, b = part(layer.weight.grad), part(layer.bias.grad)
    return torch.cat([w.reshape(w.shape[0], math.prod(w.shape[1:])), b[:, None]], 1)  # rows may be 0


def kfac_factors(model, x, t):
    """Forward and backward of the mean loss on this batch; the layers' K-FAC factors of it
    ``A = mean_rows a a^T`` (input rows with a 1 for the bias; a Conv2d's patches) and
    ``G = mean_samples sum_rows dl/dy dl/dy^T`` (per-sample output gradients: ``B g``)."""
    layers, captured = layers_of(model), {}

    def forward_hook(layer, inputs, output):
        captured[layer] = [inputs[0].detach()]
        output.register_hook(lambda g: captured[layer].append(g.detach()))

    hooks = [layer.register_forward_hook(forward_hook) for layer in layers]
    ((model(x) - t) ** 2).sum(1).mean().backward()
    for h in hooks:
        h.remove()
    factors = []
    for layer in layers:
        a, g = captured[layer]
        if isinstance(layer, nn.Conv2d):
            patch = a.shape[1] * layer.kernel_size[0] * layer.kernel_size[1]
            a = F.unfold(a, layer.kernel_size, padding=layer.padding).transpose(1, 2).reshape(-1, patch)
            g = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
        g = g * x.shape[0]
        factors += [a.T @ a / a.shape[0], g.T @ g / x.shape[0]]
    return factors


def precondition(v, a, g):
    """``(G + damping I)^-1 V (A + damping I)^-1``."""
    left = torch.linalg.solve(g + DAMPING * torch.eye(g.shape[0], dtype=g.dtype), v)
    return torch.linalg.solve(a + DAMPING * torch.eye(a.shape[0], dtype=a.dtype), left.T).T


def sharded_kfac(model, x, t, share, shares, group, dp_group):
    """K-FAC's preconditioned gradients under FSDP2: factors averaged over the data-parallel ranks,
    gradient rows gathered to the owners (over the shard group ``group``), preconditioned there,
    scattered back into the local gradient shards. Returns the full preconditioned gradients."""
    size = GLOBAL_BATCH // shares
    factors = kfac_factors(model, x[share * size:(share + 1) * size], t[share * size:(share + 1) * size])
    collectives.all_reduce_average_async(factors, dp_group).wait()
    layers = layers_of(model)
    blocks = [gradient_rows(layer, lambda g: g.to_local()) for layer in layers]
    plan = RowShardPlan.balanced([(layer.weight.shape[0], blocks[i].shape[1]) for i, layer in enumerate(layers)],
                                 torch.float64, collectives.world_size(group))
    gathered = gather_to_owners(plan, blocks, group)
    results = [None if v is None else precondition(v, factors[2 * i], factors[2 * i + 1])
               for i, v in enumerate(gathered)]
    for layer, block in zip(layers, scatter_from_owners(plan, results, group)):
        w, b = layer.weight.grad.to_local(), layer.bias.grad.to_local()
        w.copy_(block[:, :-1].reshape(w.shape))
        b.copy_(block[:, -1])
    return [gradient_rows(layer, lambda g: g.full_tensor()) for layer in layers], plan.owners


class CountedReduceScatter:
    """Records the bytes and group size of FSDP2's reduce-scatters (``dist.reduce_scatter_single``)."""

    def __init__(self):
        self.calls = []

    def __enter__(self):
        self.real = dist.reduce_scatter_single
        dist.reduce_scatter_single = self
        return self

    def __exit__(self, *exc):
        dist.reduce_scatter_single = self.real

    def __call__(self, output, input, *args, group=None, **kwargs):
        self.calls.append((input.numel() * input.element_size(), dist.get_world_size(group)))
        return self.real(output, input, *args, group=group, **kwargs)


def fsdp_gradients(rank, mesh4):
    """Real FSDP2 gradients of the model on 4 ranks: the local rows gathered to the owners, the full
    gradients, the plan, and FSDP2's reduce-scatter calls of the backward."""
    x, t = data()
    model = fsdp_model(mesh4)
    with CountedReduceScatter() as counted:
        ((model(x[2 * rank:2 * rank + 2]) - t[2 * rank:2 * rank + 2]) ** 2).sum(1).mean().backward()
    layers = layers_of(model)
    blocks = [gradient_rows(layer, lambda g: g.to_local()) for layer in layers]
    plan = RowShardPlan.balanced([(layer.weight.shape[0], b.shape[1]) for layer, b in zip(layers, blocks)],
                                 torch.float64, 4)
    gathered = gather_to_owners(plan, blocks)
    full = [gradient_rows(layer, lambda g: g.full_tensor()) for layer in layers]
    return dict(gathered=gathered, full=full, plan=plan, reduce_scatters=counted.calls)


def row_shard_runs(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh4 = init_device_mesh("cpu", (4,))
    mesh22 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    mesh41 = init_device_mesh("cpu", (4, 1), mesh_dim_names=("replicate", "shard"))
    pairs, _ = dist.new_subgroups_by_enumeration([[0, 2], [1, 3]])
    groups = {"w4": (None, 0), "w2": (pairs, rank % 2), "w1": (mesh41.get_group("shard"), rank),
              "hsdp22": (mesh22.get_group("shard"), 0)}
    out = {"exchange": {config: exchange_runs(*groups[config]) for config in CONFIGS},
           "chunks": dtensor_chunks(rank, (mesh4, mesh22, mesh41)),
           "fsdp": fsdp_gradients(rank, mesh4)}
    x, t = data()
    kfac = {"w4": (mesh4, rank, 4, None, None), "w2": (mesh22["shard"], mesh22.get_local_rank("shard"), 2,
                                                       mesh22.get_group("shard"), mesh22.get_group("shard")),
            "w1": (mesh41["shard"], 0, 1, mesh41.get_group("shard"), mesh41.get_group("shard")),
            "hsdp22": (mesh22, rank, 4, mesh22.get_group("shard"), None)}
    out["kfac"] = {config: sharded_kfac(fsdp_model(mesh), x, t, share, shares, group, dp_group)
                   for config, (mesh, share, shares, group, dp_group) in kfac.items()}
    return out


_RUNS = []


def runs():
    if not _RUNS:
        _RUNS.append(run_distributed(row_shard_runs, 4, timeout=180))
    return _RUNS[0]


@pytest.mark.distributed
def test_row_chunks_match_distribute_tensor_and_fully_shard():
    for rank, out in enumerate(runs()):
        for label, local, expected in out["chunks"]:
            assert same_bits(local, expected), f"rank {rank}: {label}: {local.shape} vs {expected.shape}"


@pytest.mark.distributed
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtypes", list(DTYPES))
def test_gather_owner_scatter_is_bitwise_the_function_of_the_full_matrix(config, dtypes):
    ranks = runs()
    for rank, out in enumerate(ranks):
        run = out["exchange"][config][dtypes]
        plan, me = run["plan"], run["me"]
        assert plan.owners == ranks[0]["exchange"][config][dtypes]["plan"].owners  # one assignment everywhere
        for layer, (gathered, m) in enumerate(zip(run["gathered"], run["full"])):
            if plan.owners[layer] == me:
                assert same_bits(gathered, m), f"rank {rank}: layer {layer} gathered wrongly"
            else:
                assert gathered is None
        for layer, (back, expected) in enumerate(zip(run["back"], run["expected"])):
            assert len(plan.rows(layer, me)) == expected.shape[0]
            assert same_bits(back, expected), f"rank {rank}: layer {layer} scattered wrongly"
    if config == "w2":  # the jobs {0, 2} and {1, 3} have different data: a mixed-up exchange fails above
        job0, job1 = ranks[0]["exchange"][config][dtypes], ranks[1]["exchange"][config][dtypes]
        assert not same_bits(job0["full"][2], job1["full"][2])
    if config == "hsdp22":  # replicas {0, 2} and {1, 3} end with identical shards
        for rank in (2, 3):
            mine, replica = ranks[rank]["exchange"][config][dtypes], ranks[rank - 2]["exchange"][config][dtypes]
            assert all(same_bits(a, b) for a, b in zip(mine["back"], replica["back"]))


@pytest.mark.distributed
@pytest.mark.parametrize("config", ["w4", "w2", "hsdp22"])
def test_a_result_off_its_owner_raises_on_every_rank_before_communicating(config):
    for rank, out in enumerate(runs()):
        plan = RowShardPlan.balanced(LAYERS, F32, 4 if config == "w4" else 2)
        me = rank if config == "w4" else rank // 2 if config == "w2" else rank % 2
        first = next(i for i, owner in enumerate(plan.owners) if owner != me)
        assert out["exchange"][config]["error"].startswith(
            f"results[{first}]: layer {first} is owned by group rank {plan.owners[first]}, not this rank ({me})")


@pytest.mark.distributed
@pytest.mark.parametrize("config", CONFIGS)
def test_one_collective_per_exchange_moving_the_bytes_the_volume_counts(config):
    ranks = runs()
    for dtypes in DTYPES:
        sent_total = received_total = 0
        for rank, out in enumerate(ranks):
            run = out["exchange"][config][dtypes]
            plan, me = run["plan"], run["me"]
            volume = plan.volume(me)
            if plan.ranks == 1:
                assert run["gather_calls"] == run["scatter_calls"] == []
                assert volume.exchange == volume.reduce_scatter == 0
                continue
            assert len(run["gather_calls"]) == len(run["scatter_calls"]) == 1, (config, dtypes, rank)
            for call in run["gather_calls"] + run["scatter_calls"]:
                assert call["rank"] == me
                assert call["send_buffer"] == sum(call["sent"]) and call["receive_buffer"] == sum(call["received"])
            gather, scatter = run["gather_calls"][0], run["scatter_calls"][0]
            over_network = lambda splits: sum(splits) - splits[me]  # noqa: E731
            assert volume.gather_sent == over_network(gather["sent"]) == over_network(scatter["received"])
            assert volume.gather_received == over_network(gather["received"]) == over_network(scatter["sent"])
            sent_total += volume.gather_sent
            received_total += volume.gather_received
        if config != "w1":
            # what the owners miss of their matrices, counted from the full matrices of the jobs
            plan = ranks[0]["exchange"][config][dtypes]["plan"]
            missing = sum((m.shape[0] - len(plan.rows(i, plan.owners[i]))) * m[0].numel() * m.element_size()
                          for i, m in enumerate(ranks[0]["exchange"][config][dtypes]["full"]))
            jobs = 4 // plan.ranks
            assert sent_total == received_total == jobs * missing


@pytest.mark.distributed
def test_real_fsdp2_gradient_rows_gather_to_the_full_gradients_and_reduce_scatter_volume():
    for rank, out in enumerate(runs()):
        run = out["fsdp"]
        plan = run["plan"]
        assert [len(plan.rows(i, rank)) for i in range(3)] == [[1, 1, 1, 0][rank], [9, 9, 9, 6][rank],
                                                                [2, 2, 2, 1][rank]]
        for layer, (gathered, full) in enumerate(zip(run["gathered"], run["full"])):
            if plan.owners[layer] == rank:
                assert same_bits(gathered, full), f"rank {rank} layer {layer}"
            else:
                assert gathered is None
        # FSDP2 reduce-scatters each layer's padded gradients (one call per fully_shard unit)
        assert len(run["reduce_scatters"]) == 3 and all(world == 4 for _, world in run["reduce_scatters"])
        ring = sum(nbytes * 3 // 4 for nbytes, _ in run["reduce_scatters"])
        assert plan.volume(rank).reduce_scatter == ring


def single_process_kfac():
    model = build_model()
    factors = kfac_factors(model, *data())
    return [precondition(gradient_rows(layer, lambda g: g), factors[2 * i], factors[2 * i + 1])
            for i, layer in enumerate(layers_of(model))]


@pytest.mark.distributed
@pytest.mark.parametrize("config", CONFIGS)
def test_kfac_preconditioning_sharded_equals_single_process(config):
    reference = single_process_kfac()
    ranks = runs()
    for rank, out in enumerate(ranks):
        full, owners = out["kfac"][config]
        assert owners == ranks[0]["kfac"][config][1]
        for layer, (p, q) in enumerate(zip(full, reference)):
            err = ((p.double() - q.double()).norm() / q.double().norm()).item()
            assert err < 1e-10, f"rank {rank} layer {layer}: {err}"
            assert torch.equal(p, ranks[0]["kfac"][config][0][layer]), f"rank {rank} layer {layer} differs"
