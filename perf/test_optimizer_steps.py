"""Whole ``optimizer.step()`` on a GPT-2-small-shaped transformer (cases: perf.cases.OPTIMIZERS).

Per case: build the model (perf.models.GPT, fp32 parameters) and the optimizer, one forward/backward
under bf16 autocast, one step (optimizer-state bytes, first-step memory), the check against the
reference implementation of the same method, then the timed step. Every kfopt optimizer is a case,
and AdamW(fused) is the shared baseline of all of them (speed-up, and optimizer-state bytes relative
to it: ``state_bytes_vs_adamw_fused``).

Memory: ``state_bytes`` counts every tensor the optimizer holds (its state and, for the
Kronecker-factored optimizers, their factors, eigen/inverse data and base optimizer's state; each
storage once, never the model's parameters or gradients): ``kfopt.compare.runner.state_bytes``.

Kronecker-factored optimizers (``case.hooks``: K-FAC, MKOR, MKOR-H, SINGD) capture statistics with
hooks during the forward/backward and consume them in ``step()``; so the optimizer is built first,
and before every timed step (untimed, in the ``reset`` hook) the same batch runs forward/backward
again, which refills the statistics and the gradients (the step replaces the gradients by
preconditioned ones). The timed step is built with every update interval 1: each step updates the
factors and the inverse/eigen data (the worst case; K-FAC's eigendecompositions synchronise with
the host). What the hooks compute inside the forward/backward (K-FAC's covariances, SINGD's
projected inner products) is not in the step time; ``iteration_latency_s`` (forward + backward +
step, recorded for every case, AdamW included) is. ``amortised_step_s``: the same optimizer at
kfopt's default intervals in a training loop (a fresh batch per step), device time of each
``step()`` between CUDA events (host gaps inside the step included), mean over one period of the
intervals (``cycle_steps``) after one period of warm-up.

The check: the reference (for kfopt optimizers the same class on kfopt's fp32 PyTorch references,
``KFOPT_BACKEND=torch``, for a hook-based one also in the forward/backward its hooks see) starts from
the same weights and runs the same batch; attention runs on its math backend in the checked
passes, so both forward/backward passes are deterministic and the statistics agree to the kernels'
rounding; the gradients are then made bitwise equal (copied). Compared: the parameter update d of
every tensor, as ``||max(|d - d_ref| - ulp, 0)|| / ||d_ref||`` (``ulp``: one unit in the last place of
the fp32 parameter; both paths round the same update into the parameter and may round a hair
differently, which is storage, not arithmetic). The largest over all tensors must be <= ``case.tol``
(1e-4). Both paths do fp32 arithmetic in different orders (~1e-7..1e-6 relative), and the
Kronecker-factored methods' first step starts from identity factors: K-FAC eigendecomposes
0.95 I + 0.05 A_batch (and G), MKOR updates the inverse of 0.95 I + 0.05 v v^T, SINGD moves K and C
away from I by lr_cov = 0.05 times a bounded step; these are well conditioned, so they amplify the
rounding differences little. Smoke run: <= 2e-6 (K-FAC), 3e-7 (MKOR), 2e-7 (SINGD). A wrong
factor, damping or scaling changes the update by more: e.g. K-FAC's damping 2e-3 instead of 1e-3
gives 5e-4, MKOR's decay 0.96 instead of 0.95 5e-2. The reference must have changed the parameters
(else the check is vacuous); tensors it left unchanged are listed in the record.
"""

import contextlib
import gc
import statistics

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kfopt.compare.runner import state_bytes
from perf.cases import OPTIMIZERS, STEP_MODEL, optimizer_case, torch_backend
from perf.checking import rel_error, rel_error_beyond_ulp
from perf.config import DEVICE, MODE, SMOKE
from perf.models import GPT
from perf.timing import host_and_latency

# SONew's kernel costs ~1 s per tensor per step in the interpreter: its kfopt path is smoke-tested
# in test_elementwise.py; here the smoke run covers its reference path (same optimizer class).
SMOKE_SKIP = {("sonew-band1", "kfopt"), ("sonew-band4", "kfopt")}

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


def backend(name: str | None):
    """The context a case's optimizer runs in (kfopt's PyTorch references for ``"torch"``)."""
    return torch_backend() if name == "torch" else contextlib.nullcontext()


def stepper(opt, backend_name):
    def step():
        with backend(backend_name):
            opt.step()
    return step


def refresher(model, opt, backend_name):
    """A hook-based optimizer's ``reset``: a fresh forward/backward of the same batch."""
    def refresh():
        with backend(backend_name):
            opt.zero_grad(set_to_none=False)
            backward(model)
    return refresh


def check_update(case, model, p0, g0) -> dict:
    """The update of ``model`` (stepped once from ``p0`` with gradients ``g0``) against the reference's."""
    ref_case = optimizer_case(case.method, case.reference)
    ref_model = make_model()
    with torch.no_grad():
        for q, w in zip(ref_model.parameters(), p0):
            q.copy_(w)
    with backend(ref_case.backend):
        ref_opt = ref_case.build(ref_model)
        if ref_case.hooks:
            with sdpa_kernel(SDPBackend.MATH):
                backward(ref_model)
    for q, g in zip(ref_model.parameters(), g0):
        q.grad = g.clone()
    stepper(ref_opt, ref_case.backend)()
    names = [n for n, _ in model.named_parameters()]
    delta = [p.detach() - w for p, w in zip(model.parameters(), p0)]
    ref_delta = [q.detach() - w for q, w in zip(ref_model.parameters(), p0)]
    unchanged = [n for n, d in zip(names, ref_delta) if not bool(d.ne(0).any())]
    assert len(unchanged) < len(names), f"{case.method}/{case.reference} changed no parameter: the check is vacuous"
    errors = {n: rel_error_beyond_ulp(p.detach(), q.detach(), w)
              for n, p, q, w in zip(names, model.parameters(), ref_model.parameters(), p0)}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= case.tol, (f"{case.method}/{case.impl}: update of {worst} differs from "
                                       f"{case.method}/{case.reference} by {errors[worst]:.2e} > {case.tol:.0e}")
    return {"against": f"{case.method}/{case.reference}", "max_rel_err": errors[worst], "worst_tensor": worst,
            "rel_err_all_tensors": rel_error(delta, ref_delta), "tol": case.tol,
            "tensors_unchanged_by_reference": unchanged}


def amortised_step(case) -> dict:
    """``case.build_default`` (kfopt's default intervals) in a training loop: per-step device time.

    GPU: one period of ``case.cycle`` steps of warm-up, then one timed period (CUDA events around each
    ``step()``). Smoke run: one period and one more step through kfopt's PyTorch references (the
    interpreter is too slow for a loop), which keeps the loop from rotting but times nothing.
    """
    model = make_model()
    name = "torch" if SMOKE else case.backend
    with backend(name):
        opt = case.build_default(model)
    step = stepper(opt, name)
    warm = case.cycle if not SMOKE else 0
    events = []
    for k in range(warm + case.cycle + (1 if SMOKE else 0)):
        with backend(name):
            opt.zero_grad(set_to_none=False)
            backward(model, seed=k)
        if SMOKE or k < warm:
            step()
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        events.append((start, end))
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if not events:
        return {"cycle_steps": case.cycle}
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) / 1e3 for s, e in events]
    return {"cycle_steps": case.cycle, "amortised_step_s": statistics.mean(times), "cycle_step_s": times}


@pytest.mark.parametrize("case", CASES)
def test_optimizer_step(bench, case):
    if SMOKE and (case.method, case.impl) in SMOKE_SKIP:
        pytest.skip("smoke run: kernel path covered by test_elementwise (the interpreter is too slow for a model)")
    model = make_model()
    p0 = [p.detach().clone() for p in model.parameters()]
    with backend(case.backend):
        opt = case.build(model)  # before the forward/backward: hook-based optimizers capture statistics in it
        with sdpa_kernel(SDPBackend.MATH) if case.hooks else contextlib.nullcontext():
            backward(model)
    g0 = [p.grad.detach().clone() for p in model.parameters()]
    step = stepper(opt, case.backend)

    # first step: memory of the state it creates and of its transients
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    step()
    memory = {"state_bytes": state_bytes(opt, model)}
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        memory["first_step_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - before
        memory["first_step_transient_bytes"] = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()

    check = None
    if case.reference:
        check = check_update(case, model, p0, g0)
    else:
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    del p0, g0

    cfg, batch, seq = STEP_MODEL[MODE]
    n_params = sum(p.numel() for p in model.parameters())
    extra = dict(memory, state_bytes_per_param=memory["state_bytes"] / n_params)
    if case.hooks:
        extra["timed_step"] = "every update due (intervals 1); statistics refreshed by an untimed forward/backward"
    reset = refresher(model, opt, case.backend) if case.hooks else None
    rec = bench.run(
        step, family="step", method=case.method, impl=case.impl, role=case.role,
        group="step|gpt2-small-shaped|fp32-params-bf16-autocast", shape=f"gpt{cfg.n_layer}x{cfg.d}",
        dtype="fp32+bf16-autocast",
        params={"n_layer": cfg.n_layer, "d": cfg.d, "vocab": cfg.vocab, "batch": batch, "seq": seq,
                "n_params": n_params, "n_tensors": len(list(model.parameters()))},
        bytes=case.bytes(model) if case.bytes else None, reset=reset, check=check, extra=extra,
    )
    if DEVICE.type == "cuda" and rec.get("median_s") is not None:
        def iteration():
            with backend(case.backend):
                opt.zero_grad(set_to_none=False)
                backward(model)
            step()
        rec["extra"]["iteration_latency_s"] = host_and_latency(iteration, reps=3)[1]
        rec["extra"]["step_share_of_iteration"] = rec["median_s"] / rec["extra"]["iteration_latency_s"]
    del opt, model, step, reset
    free_memory()
    if case.build_default:
        rec["extra"].update(amortised_step(case))
        free_memory()


def free_memory() -> None:
    """Free the GPU memory of a finished model and optimizer now: the capture's hook closures form
    reference cycles with the optimizer, which only the garbage collector frees."""
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
