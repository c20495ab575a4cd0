"""Whole ``optimizer.step()`` on a GPT-2-small-shaped transformer (cases: perf.cases.OPTIMIZERS).

The model (perf.models.GPT, fp32 parameters) runs one forward/backward under bf16 autocast to get
real gradients; each optimizer is then checked against its reference (one step from the same
weights and gradients) and its step is timed on those gradients. Also recorded: optimizer-state
bytes, the transient memory of the first step, and (GPU) the latency of a whole training iteration.
"""

import contextlib

import pytest
import torch

from perf.cases import OPTIMIZERS, STEP_MODEL, optimizer_case, torch_backend
from perf.checking import rel_error
from perf.config import DEVICE, MODE, SMOKE
from perf.models import GPT
from perf.timing import host_and_latency

# SONew's kernel costs ~1 s per tensor per step in the interpreter: its kfopt path is smoke-tested
# in test_elementwise.py; here the smoke run covers its reference path (same optimizer class).
SMOKE_SKIP = {("sonew-band1", "kfopt"), ("sonew-band4", "kfopt")}
TOL = 1e-4  # fp32 parameters: relative error of the update against the reference

CASES = [pytest.param(case, id=f"{case.method}-{case.impl}") for case in OPTIMIZERS]


def make_model() -> GPT:
    cfg, _, _ = STEP_MODEL[MODE]
    torch.manual_seed(0)
    with torch.device(DEVICE):
        return GPT(cfg)


def backward(model: GPT, seed: int = 0) -> None:
    cfg, batch, seq = STEP_MODEL[MODE]
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    idx = torch.randint(0, cfg.vocab, (batch, seq + 1), generator=gen, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()


def stepper(opt, backend):
    def step():
        with torch_backend() if backend == "torch" else contextlib.nullcontext():
            opt.step()
    return step


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("case", CASES)
def test_optimizer_step(bench, case):
    reason = case.available()
    if reason:
        pytest.skip(reason)
    if SMOKE and (case.method, case.impl) in SMOKE_SKIP:
        pytest.skip("smoke run: kernel path covered by test_elementwise (the interpreter is too slow for a model)")
    model = make_model()
    backward(model)
    p0 = [p.detach().clone() for p in model.parameters()]
    opt = case.build(model)
    step = stepper(opt, case.backend)

    # first step: memory of the state it creates and of its transients
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    step()
    memory = {"state_bytes": state_bytes(opt)}
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        memory["first_step_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - before
        memory["first_step_transient_bytes"] = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()

    check = None
    if case.reference:
        ref_case = optimizer_case(case.method, case.reference)
        ref_model = make_model()
        for p, q, w in zip(model.parameters(), ref_model.parameters(), p0):
            q.data.copy_(w)
            q.grad = p.grad.clone()
        stepper(ref_case.build(ref_model), ref_case.backend)()
        err = rel_error([p.detach() - w for p, w in zip(model.parameters(), p0)],
                        [q.detach() - w for q, w in zip(ref_model.parameters(), p0)])
        assert err <= TOL, f"{case.method}/{case.impl}: update differs from {case.method}/{case.reference} by {err:.2e}"
        check = {"against": f"{case.method}/{case.reference}", "max_rel_err": err, "tol": TOL}
        del ref_model
    else:
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())

    cfg, batch, seq = STEP_MODEL[MODE]
    n_params = sum(p.numel() for p in model.parameters())
    rec = bench.run(
        step, family="step", method=case.method, impl=case.impl, role=case.role,
        group=f"step|gpt2-small-shaped|fp32-params-bf16-autocast", shape=f"gpt{cfg.n_layer}x{cfg.d}",
        dtype="fp32+bf16-autocast",
        params={"n_layer": cfg.n_layer, "d": cfg.d, "vocab": cfg.vocab, "batch": batch, "seq": seq,
                "n_params": n_params, "n_tensors": len(p0)},
        bytes=case.bytes(model), check=check,
        extra=dict(memory, state_bytes_per_param=memory["state_bytes"] / n_params),
    )
    if DEVICE.type == "cuda" and rec.get("median_s") is not None:
        def iteration():
            opt.zero_grad(set_to_none=False)
            backward(model)
            step()
        rec["extra"]["iteration_latency_s"] = host_and_latency(iteration, reps=3)[1]
        rec["extra"]["step_share_of_iteration"] = rec["median_s"] / rec["extra"]["iteration_latency_s"]
