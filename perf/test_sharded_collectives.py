"""The extra collectives per step of LAMB, LARS and SONew (band 1) under FSDP2 (cases: perf.cases.SHARDED).

The real sharded step on ``SHARD_WORLD`` ranks (perf/sharded_collectives.py: NCCL when that many GPUs are
visible, one per rank; else gloo on CPU tensors, kfopt's PyTorch path there) on the GPT-2-shaped model
(``SHARD_MODEL``; one tiny block in the smoke run). Checked on every rank and every step: the collectives
kfopt issued (counted by wrapping ``torch.distributed``'s functions) are exactly the documented ones
(``case.collectives``: count, reduce op and bytes, README "Sharded training"), and the wrapped copy's
parameters are bitwise those of an unwrapped copy stepped on the same gradients. Recorded (family
``sharded``): rank 0's step time (median over ``SHARD_STEPS``), the collectives' count and bytes per rank,
the time spent inside them (``extra.collective_s``: each synchronised, median per step) and its share of the
step; the smoke run records no timings.
"""

import statistics

import pytest
import torch

from perf.cases import SHARD_MODEL, SHARD_STEPS, SHARD_WORLD, SHARDED
from perf.config import MODE, SMOKE
from perf.sharded_collectives import run_case


def _backend() -> str:
    return "nccl" if not SMOKE and torch.cuda.device_count() >= SHARD_WORLD else "gloo"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.method) for c in SHARDED])
def test_sharded_collectives(recorder, case):
    backend = _backend()
    timed = SHARD_STEPS[MODE] > 0
    spec = dict(registry=case.registry, lr=case.lr, cfg=SHARD_MODEL[MODE], steps=2, timed=timed,
                timed_steps=SHARD_STEPS[MODE], kfopt_backend=None if backend == "nccl" else "torch")
    ranks = run_case(spec, SHARD_WORLD, backend)
    expected = case.collectives(ranks[0]["bands"])
    for rank, res in enumerate(ranks):
        for step, calls in enumerate(res["per_step"]):
            assert [tuple(c) for c in calls] == expected, (
                f"{case.method}, rank {rank}, step {step}: issued {calls}, documented {expected}")
        assert all(res["equal"]), f"{case.method}, rank {rank}: the instrumented step changed the parameters"
    r0 = ranks[0]
    extra = {"world": SHARD_WORLD, "backend": backend, "collectives": len(expected),
             "collective_bytes": sum(b for *_, b in expected), "calls": [list(c) for c in expected],
             "tensors": r0["tensors"]}
    times = {}
    if timed:
        collective_s = statistics.median(r0["collective_s"])
        step_s = statistics.median(r0["step_s"])
        extra.update(collective_s=collective_s, collective_share=collective_s / step_s,
                     instrumented_step_s=statistics.median(r0["instrumented_step_s"]))
        q = statistics.quantiles(r0["step_s"], n=4)
        times = dict(median_s=step_s, min_s=min(r0["step_s"]), max_s=max(r0["step_s"]), iqr_s=q[2] - q[0],
                     rounds=len(r0["step_s"]))
    cfg = SHARD_MODEL[MODE]
    recorder.add(family="sharded", method=case.method, impl="kfopt", role="kernel",
                 group=f"sharded|{case.method}|w{SHARD_WORLD}",
                 shape=f"gpt n_layer={cfg.n_layer} d={cfg.d} w={SHARD_WORLD}",
                 dtype="fp32", params={"world": SHARD_WORLD, "backend": backend, "device": r0["device"]},
                 check={"max_rel_err": 0.0, "against": "the documented collectives; an uninstrumented step"},
                 extra=extra, **times)
