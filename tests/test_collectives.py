"""kfopt.collectives: no-op behaviour in one process; bucketed average all-reduce, broadcast, packed
symmetric transfer and sub-groups on 2 and 4 gloo processes; the run_distributed helper itself."""

import time

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed

from kfopt import collectives as C

# bucket_bytes for the multi-process checks, and the tensors each rank averages: (shape, dtype) with
# odd sizes, a 0-d tensor, a non-contiguous view and three dtypes interleaved. With 64-byte buckets:
# fp32 [5, 7, 3] (60 B) | [10] | [30] (120 B, alone); fp64 [(2, 2)] (32 B) | [5] (would make 72 B);
# bf16 [9, ()] -> 6 buckets, hence 6 all_reduce calls.
BUCKET_BYTES = 64
SPECS = [((5,), torch.float32), ((2, 2), torch.float64), ((7,), torch.float32), ((9,), torch.bfloat16),
         ((3,), torch.float32), ((5,), torch.float64), ((2, 5), torch.float32), ((5, 6), torch.float32),
         ((), torch.bfloat16)]
EXPECTED_BUCKETS = 6


def rank_tensors(rank: int) -> list[torch.Tensor]:
    """Fresh random tensors that depend on the rank (the parent recomputes them to get the mean)."""
    g = torch.Generator().manual_seed(1000 + rank)
    out = [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for shape, dtype in SPECS]
    out[6] = out[6].t()  # a non-contiguous (5, 2) view
    return out


def rank_symmetric(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2000 + rank)
    batched = torch.randn(2, 3, 7, 7, generator=g)
    single = torch.randn(1, 1, generator=g, dtype=torch.float64)
    square = torch.randn(4, 4, generator=g)
    return [batched + batched.transpose(-1, -2), single, square.mT @ square]


def mean_over(ranks, make):
    per_rank = [make(r) for r in ranks]
    return [torch.stack([p[i].double() for p in per_rank]).mean(0) for i in range(len(per_rank[0]))]


def close(out, ref, dtype):
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype]
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.allclose(out.double(), ref, rtol=tol, atol=tol), (out, ref)


# ------------------------------------------------------------------ one process: no-ops, packing


def test_single_process_is_a_no_op():
    assert not C.is_distributed() and C.world_size() == 1 and C.rank() == 0
    tensors = rank_tensors(0)
    before = [t.clone() for t in tensors]
    C.all_reduce_average_async(tensors).wait()
    C.broadcast(tensors, src=0)
    C.broadcast_async(tensors, src=0).wait()
    not_symmetric = torch.randn(3, 5, 5)
    saved = not_symmetric.clone()
    C.all_reduce_symmetric_average_async([not_symmetric]).wait()
    for t, b in zip(tensors, before):
        assert torch.equal(t, b)
    assert torch.equal(not_symmetric, saved)
    assert C.new_groups([[0], [0]]) == [None, None]


def test_input_errors():
    with pytest.raises(TypeError, match="floating"):
        C.all_reduce_average_async([torch.ones(3, dtype=torch.int64)])
    with pytest.raises(TypeError, match="sequence of tensors"):
        C.all_reduce_average_async(torch.ones(3))
    with pytest.raises(ValueError, match="bucket_bytes"):
        C.all_reduce_average_async([torch.ones(3)], bucket_bytes=0)
    with pytest.raises(ValueError, match="d, d"):
        C.all_reduce_symmetric_average_async([torch.ones(3, 4)])
    with pytest.raises(ValueError, match="last dimension"):
        C.unpack_upper(torch.ones(5), 3)
    with pytest.raises(ValueError, match="rank_lists"):
        C.new_groups([[0, 1]])


@pytest.mark.parametrize("d", [1, 2, 5, 17])
def test_pack_upper_round_trip(d):
    sym = torch.randn(3, 2, d, d, dtype=torch.float64)
    sym = sym + sym.transpose(-1, -2)
    packed = C.pack_upper(sym)
    assert packed.shape == (3, 2, d * (d + 1) // 2)
    assert torch.equal(C.unpack_upper(packed, d), sym)
    # only the upper triangle is read; row-major order
    garbage = sym.tril(-1) * 0 + torch.randn(3, 2, d, d, dtype=torch.float64).tril(-1) + sym.triu()
    assert torch.equal(C.pack_upper(garbage), packed)
    rows, cols = torch.triu_indices(d, d)
    assert torch.equal(packed[1, 0], torch.stack([sym[1, 0, i, j] for i, j in zip(rows, cols)]))


# ------------------------------------------------------------------ several processes


def collectives_on_ranks(rank, world):
    """Every collective on this rank's data; returns the results for the parent to check."""
    calls = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        tensors = rank_tensors(rank)
        handle = C.all_reduce_average_async(tensors, bucket_bytes=BUCKET_BYTES)
        handle.wait()
        handle.wait()  # a second wait changes nothing
        buckets = len(calls)
    finally:
        dist.all_reduce = real_all_reduce

    src = world - 1
    sent = [torch.full((3, 5), float(rank)), torch.arange(7) * (rank + 1), torch.randn(4, 4).t()]
    C.broadcast(sent, src=src, bucket_bytes=BUCKET_BYTES)
    again = [torch.full((2,), float(rank))]
    C.broadcast_async(again, src=1).wait()

    sym = rank_symmetric(rank)
    C.all_reduce_symmetric_average_async(sym, bucket_bytes=BUCKET_BYTES).wait()

    assert C.is_distributed() and C.world_size() == world and C.rank() == rank
    with pytest.raises(ValueError, match="not a rank of the group"):
        C.broadcast([torch.ones(1)], src=world)
    out = {"tensors": tensors, "contiguous": tensors[6].is_contiguous(), "buckets": buckets, "sent": sent,
           "again": again, "sym": sym}
    if world == 4:
        pairs = C.new_groups([[0, 1], [2, 3]])  # e.g. KAISA grad-worker groups ...
        strided = C.new_groups([[0, 2], [1, 3]])  # ... and receiver groups
        mine, other = pairs[rank // 2], pairs[1 - rank // 2]
        assert C.world_size(mine) == 2 and C.rank(mine) == rank % 2 and C.rank(other) == -1
        in_pair = rank_tensors(rank)
        C.all_reduce_average_async(in_pair, group=mine, bucket_bytes=BUCKET_BYTES).wait()
        in_column = rank_symmetric(rank)
        C.all_reduce_symmetric_average_async(in_column, group=strided[rank % 2]).wait()
        from_second = [torch.full((3,), float(rank))]
        C.broadcast(from_second, src=(rank // 2) * 2 + 1, group=mine)  # src: a global rank
        with pytest.raises(ValueError, match="not a member"):
            C.all_reduce_average_async([torch.ones(1)], group=other)
        out.update(in_pair=in_pair, in_column=in_column, from_second=from_second)
    return out


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_collectives_on_several_processes(world):
    results = run_distributed(collectives_on_ranks, world, timeout=120)
    mean = mean_over(range(world), rank_tensors)
    sym_mean = mean_over(range(world), rank_symmetric)
    for rank, res in enumerate(results):
        assert res["buckets"] == EXPECTED_BUCKETS
        assert not res["contiguous"]  # the view was written through, not replaced
        for out, ref, (_, dtype) in zip(res["tensors"], mean, SPECS):
            close(out, ref, dtype)
        src = world - 1
        assert torch.equal(res["sent"][0], torch.full((3, 5), float(src)))
        assert torch.equal(res["sent"][1], torch.arange(7) * (src + 1))
        assert torch.equal(res["sent"][2], results[src]["sent"][2])
        assert torch.equal(res["again"][0], torch.full((2,), 1.0))
        for out, ref in zip(res["sym"], sym_mean):
            close(out, ref, out.dtype)
            assert torch.equal(out, out.transpose(-1, -2))
        if world == 4:
            pair = [r for r in range(4) if r // 2 == rank // 2]
            column = [r for r in range(4) if r % 2 == rank % 2]
            for out, ref, (_, dtype) in zip(res["in_pair"], mean_over(pair, rank_tensors), SPECS):
                close(out, ref, dtype)
            for out, ref in zip(res["in_column"], mean_over(column, rank_symmetric)):
                close(out, ref, out.dtype)
            assert torch.equal(res["from_second"][0], torch.full((3,), float(pair[1])))


# ------------------------------------------------------------------ the helper fails loudly


def raise_on_rank_one(rank, world):
    if rank == 1:
        raise ValueError("boom from rank one")
    dist.barrier()  # rank 0 would wait forever for rank 1: the helper must not wait for it
    return rank


def hang_on_rank_one(rank, world):
    if rank == 1:
        time.sleep(600)
    return rank


@pytest.mark.distributed
@pytest.mark.slow
def test_helper_reports_a_raising_rank():
    with pytest.raises(pytest.fail.Exception) as err:
        run_distributed(raise_on_rank_one, 2, timeout=60)
    message = str(err.value)
    assert "--- rank 1 raised" in message and "ValueError: boom from rank one" in message
    assert "raise_on_rank_one" in message


@pytest.mark.distributed
@pytest.mark.slow
def test_helper_reports_a_hanging_rank():
    start = time.monotonic()
    # (on a loaded machine rank 0 may still be starting up at the deadline: then it is listed too)
    with pytest.raises(pytest.fail.Exception, match=r"rank\(s\) \[(0, )?1\] did not finish within 10 s"):
        run_distributed(hang_on_rank_one, 2, timeout=10)
    assert time.monotonic() - start < 25  # killed, not waited for

