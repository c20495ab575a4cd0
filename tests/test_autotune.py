"""kfopt.autotune: cache round trip, concurrent writers, interpreter path, tuning with restore, and
config agreement across ranks (gloo processes)."""

import json
import multiprocessing as mp

import pytest
import torch
import torch.distributed as dist
import triton
from distributed import run_distributed

import kfopt.autotune.space as space
from kfopt.autotune import (
    Config,
    ConfigSpace,
    TuningCache,
    agree_on_configs,
    configs_per_rank,
    default_configs,
    get_cache,
    shape_bucket,
    timing_candidates,
    tuning_key,
)

CANDIDATES = [Config({"BLOCK": b}, num_warps=w) for b in (64, 128) for w in (2, 4)]


@pytest.fixture
def cache_path(tmp_path, monkeypatch):
    path = tmp_path / "tune.json"
    monkeypatch.setenv("KFOPT_AUTOTUNE_CACHE", str(path))
    return path


def test_cache_round_trip(cache_path):
    key = tuning_key("k", "NVIDIA H100", "3.6.0", (1024, 64), "torch.bfloat16")
    assert key == "k|NVIDIA H100|triton-3.6.0|1024x64|torch.bfloat16"
    TuningCache().put(key, {"config": CANDIDATES[1].to_json()})
    fresh = TuningCache(cache_path)
    assert Config.from_json(fresh.get(key)["config"]) == CANDIDATES[1]
    assert fresh.get("missing") is None
    assert get_cache().path == cache_path


def _write_keys(path, worker, count):
    cache = TuningCache(path)
    for i in range(count):
        cache.put(f"w{worker}-{i}", {"config": {"params": {"BLOCK": i}, "num_warps": 4, "num_stages": 2}})


def test_concurrent_writers_lose_nothing(cache_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_keys, args=(str(cache_path), w, 15)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    data = json.loads(cache_path.read_text())
    assert set(data) == {f"w{w}-{i}" for w in range(4) for i in range(15)}


def test_corrupt_cache_is_tuned_afresh(cache_path):
    cache_path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        assert TuningCache(cache_path).get("x") is None


def test_interpreter_uses_default_without_timing(cache_path):
    calls = []
    cs = ConfigSpace("kernel", CANDIDATES, default=CANDIDATES[2])
    chosen = cs.select(device=torch.device("cpu"), bucket=(128,), dtype=torch.float32, run=calls.append)
    assert chosen == CANDIDATES[2] and calls == [] and not cache_path.exists()


def test_tuning_times_each_candidate_restores_buffers_and_caches(cache_path, monkeypatch):
    """On a (simulated) GPU: every candidate is timed, in-place effects are undone, the winner is cached."""
    buffer = torch.arange(5.0)
    timed = []

    def fake_benchmark(fn):
        for _ in range(3):  # like do_bench, run the candidate several times
            fn()
        return {64: 2.0, 128: 1.0}[timed[-1]["BLOCK"]] + timed[-1].num_warps * 0.1

    def run(config):
        timed.append(config)
        buffer.add_(1.0)  # an in-place kernel

    monkeypatch.setattr(space, "can_benchmark", lambda device: True)
    monkeypatch.setattr(space, "benchmark", fake_benchmark)
    cs = ConfigSpace("inplace", CANDIDATES, default=CANDIDATES[0])
    chosen = cs.select(device=torch.device("cpu"), bucket=shape_bucket(100), dtype=torch.float32, run=run,
                       restore=[buffer])
    assert chosen == Config({"BLOCK": 128}, num_warps=2)
    assert torch.equal(buffer, torch.arange(5.0)), "tuning must leave in-place buffers as they were"
    assert len({c for c in timed}) == len(CANDIDATES)
    entry = json.loads(cache_path.read_text())
    assert len(entry) == 1 and "inplace|cpu|triton-" in next(iter(entry))
    timed.clear()
    assert cs.select(device=torch.device("cpu"), bucket=shape_bucket(120), dtype=torch.float32, run=run) == chosen
    assert timed == [], "a cached decision (same bucket) must not be timed again"


def test_timing_candidates_is_true_only_while_timing(cache_path, monkeypatch):
    """Launchers skip their collectives while a candidate is timed (``timing_candidates``), and only then."""
    seen = []
    monkeypatch.setattr(space, "can_benchmark", lambda device: True)
    monkeypatch.setattr(space, "benchmark", lambda fn: fn() or 1.0)
    cs = ConfigSpace("flag", CANDIDATES, default=CANDIDATES[0])
    chosen = cs.launch(device=torch.device("cpu"), bucket=(1,), dtype=torch.float32,
                       run=lambda config: seen.append(timing_candidates()))
    assert chosen is None and seen == [True] * len(CANDIDATES) + [False]
    assert not timing_candidates()


def test_default_configs_overrides_an_enclosing_context(cache_path, monkeypatch):
    """Under several ranks ``default_configs()`` launches the default, untimed, even inside
    ``agree_on_configs()`` or ``configs_per_rank()``."""
    timed = []
    monkeypatch.setattr(space, "can_benchmark", lambda device: True)
    monkeypatch.setattr(space, "benchmark", lambda fn: timed.append(1) or 1.0)
    monkeypatch.setattr(space, "_several_ranks", lambda: True)
    cs = ConfigSpace("outer", CANDIDATES, default=CANDIDATES[2])
    for outer in (agree_on_configs, configs_per_rank):
        with outer(), default_configs():
            assert cs.select(device=torch.device("cpu"), bucket=(1,), dtype=torch.float32, run=None) == CANDIDATES[2]
    assert timed == []
    with configs_per_rank():  # the enclosing context applies again after the block
        cs.select(device=torch.device("cpu"), bucket=(1,), dtype=torch.float32, run=lambda c: None)
    assert len(timed) == len(CANDIDATES)


@pytest.mark.parametrize("error", [
    triton.runtime.errors.OutOfResources(300000, 232448, "shared memory"),
    triton.runtime.errors.PTXASError("ptxas fatal: too many registers"),
    triton.compiler.errors.CompilationError("src", None, "bad tile"),
])
def test_candidates_that_cannot_compile_or_launch_are_skipped(cache_path, monkeypatch, error):
    """A candidate failing to compile (front end or ptxas) or to launch is skipped; when every candidate
    fails, select says so instead of returning a config that cannot run."""
    def run(config):
        if config["BLOCK"] == 128:
            raise error

    monkeypatch.setattr(space, "can_benchmark", lambda device: True)
    monkeypatch.setattr(space, "benchmark", lambda fn: fn() or 1.0)
    cs = ConfigSpace("failing", CANDIDATES, default=CANDIDATES[3])
    chosen = cs.select(device=torch.device("cpu"), bucket=(64,), dtype=torch.float32, run=run)
    assert chosen["BLOCK"] == 64
    with pytest.raises(RuntimeError, match="no candidate config"):
        ConfigSpace("failing", CANDIDATES[2:], default=CANDIDATES[3]).select(
            device=torch.device("cpu"), bucket=(64,), dtype=torch.float32, run=run)


def test_launch_runs_on_the_tensors_cuda_device(monkeypatch):
    """Triton launches on the current CUDA device: ``launch`` makes the tensors' device current for
    the selection and the launch (simulated: no GPU here)."""
    current = []

    class FakeDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            current.append(self.device)

        def __exit__(self, *exc):
            current.pop()

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    monkeypatch.setattr(space, "can_benchmark", lambda device: False)
    cs = ConfigSpace("k", CANDIDATES, default=CANDIDATES[1])
    cuda1 = torch.device("cuda", 1)
    seen = cs.launch(device=cuda1, bucket=(64,), dtype=torch.float32, run=lambda config: (config, list(current)))
    assert seen == (CANDIDATES[1], [cuda1]) and current == []
    assert cs.launch(device=torch.device("cpu"), bucket=(64,), dtype=torch.float32,
                     run=lambda config: list(current)) == []


def test_default_must_be_a_candidate():
    with pytest.raises(ValueError, match="default"):
        ConfigSpace("k", CANDIDATES, default=Config({"BLOCK": 7}))


def test_shape_bucket():
    assert shape_bucket(1, 17, 129, 1024) == (1, 32, 256, 1024)


def _choices_on_ranks(rank, world_size, cache_dir):
    """Each rank times the candidates differently (its own fastest: CANDIDATES[rank]); returns the
    config chosen outside any context, per rank, in agreement across all ranks (twice: the second is
    remembered, no collective), in agreement within the group of ranks 1 and 2, and the error every
    rank gets when tuning fails on rank 1 only."""
    import os
    os.environ["KFOPT_AUTOTUNE_CACHE"] = os.path.join(cache_dir, f"rank{rank}.json")  # per-node caches
    space.can_benchmark = lambda device: True
    timed = []

    def fake_benchmark(fn):
        fn()
        return 0.0 if timed[-1] == CANDIDATES[rank] else 1.0

    space.benchmark = fake_benchmark
    cs = ConfigSpace("agreed", CANDIDATES, default=CANDIDATES[3])

    def select(bucket):
        return cs.select(device=torch.device("cpu"), bucket=(bucket,), dtype=torch.float32, run=timed.append)

    subgroup = dist.new_group([1, 2])
    chosen = {"default": select(64), "per_rank": None, "world": None, "world_again": None, "pair": None}
    with configs_per_rank():
        chosen["per_rank"] = select(64)
    with agree_on_configs():
        chosen["world"] = select(128)
        timed.clear()
        chosen["world_again"] = select(128)
        assert timed == [], "an agreed config is remembered: no retiming, no collective"
    if rank in (1, 2):
        with agree_on_configs(subgroup):
            chosen["pair"] = select(256)

    def fails_on_rank_1(config):
        if rank == 1:
            raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
        timed.append(config)

    try:
        with agree_on_configs():
            cs.select(device=torch.device("cpu"), bucket=(512,), dtype=torch.float32, run=fails_on_rank_1)
    except RuntimeError as err:
        chosen["failure"] = str(err)
    return chosen


@pytest.mark.distributed
def test_ranks_agree_on_tuned_configs(tmp_path):
    """Under torch.distributed: outside a context the default (equal on every rank, no communication),
    per-rank tuning inside configs_per_rank, the first rank's choice inside agree_on_configs (of the
    world or of a subgroup) even though every rank times a different candidate fastest."""
    results = run_distributed(_choices_on_ranks, 3, str(tmp_path))
    for rank, chosen in enumerate(results):
        assert chosen["default"] == CANDIDATES[3]
        assert chosen["per_rank"] == CANDIDATES[rank]
        assert chosen["world"] == chosen["world_again"] == CANDIDATES[0]
        assert chosen["pair"] == (CANDIDATES[1] if rank in (1, 2) else None)
        # tuning failed on rank 1 only: every rank raises (none waits in a collective rank 1 never makes)
        assert ("no candidate config" if rank == 1 else "failed on 1 rank") in chosen["failure"]
