"""kfopt.autotune: cache round trip, concurrent writers, interpreter path, tuning with restore."""

import json
import multiprocessing as mp

import pytest
import torch
import triton

import kfopt.autotune.space as space
from kfopt.autotune import Config, ConfigSpace, TuningCache, get_cache, shape_bucket, tuning_key

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


def test_default_must_be_a_candidate():
    with pytest.raises(ValueError, match="default"):
        ConfigSpace("k", CANDIDATES, default=Config({"BLOCK": 7}))


def test_shape_bucket():
    assert shape_bucket(1, 17, 129, 1024) == (1, 32, 256, 1024)
