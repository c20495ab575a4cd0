"""The body of every benchmark case, shared by the pytest suite (perf/test_*.py parametrize over
perf/cases.py and call these) and by perf/gpu_check.py, without pytest.

* ``elementwise_case``: an element-wise step on a parameter mix, checked against the method's
  reference over a few steps, then timed (perf/test_elementwise.py);
* ``factor_case``: a factor kernel checked against its float64 truth, then timed
  (perf/test_factor_kernels.py);
* ``optimizer_step_case`` and its helpers: a whole ``optimizer.step()`` on the GPT-2-shaped model,
  checked against the reference implementation, then timed (perf/test_optimizer_steps.py).

``bench`` is a ``perf.bench.Bench``; each case returns its record.
"""

import contextlib
import gc
import statistics

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kfopt.compare.runner import state_bytes
from perf.cases import ParamSet, STEP_MODEL, dtype_name, elementwise_mix, optimizer_case, torch_backend
from perf.checking import assert_close, max_ulp_difference, rel_error, rel_error_beyond_ulp, seed_fresh_state
from perf.config import DEVICE, INTERPRETER, MODE, SMOKE
from perf.models import GPT
from perf.timing import host_and_latency

# ----------------------------------------------------------------------------- element-wise steps


def check_against_reference(method, impl, runner, ps: ParamSet) -> dict:
    """Step ``runner`` and the reference from the same state (fresh grads each step); return the
    relative errors of the parameter update and of every shared state tensor.

    Fresh (all-zero) state is first seeded with the same random values in both
    (``perf.checking.seed_fresh_state``): from zero state a wrong decay of old state would pass. Triton's
    interpreter (the smoke run) truncates fp32 -> bf16 stores (the GPU rounds to nearest even), so for
    bf16/fp16 parameters there the reference continues from the checked implementation's weights at
    each step, and the check is parameters within 1 ulp per step of the reference and state to the usual
    tolerance.
    """
    half = ps.dtype != torch.float32
    interpreted = impl.role == "kernel" and INTERPRETER
    truncating = half and interpreted
    steps = method.check_steps
    ref_ps = ps.clone()
    p0 = [p.detach().float().clone() for p in ps.params]
    peak = [p.abs() for p in p0]  # each element's largest magnitude so far (ulps are measured at it)
    ref = method.impl(method.reference).make(ref_ps)
    seed_fresh_state([runner, ref], ps.params, ps.grads)
    for k in range(steps):
        if k:
            ps.refresh_grads(k)
            ref_ps.refresh_grads(k)
            if truncating:  # truncated stores bias the weights (so ||w||, r) by ~1/2 ulp: not what is checked here
                for q, p in zip(ref_ps.params, ps.params):
                    q.copy_(p)
        runner.step()
        ref.step()
        for m, p, q in zip(peak, ps.params, ref_ps.params):
            torch.maximum(m, torch.maximum(p.detach().float().abs(), q.detach().float().abs()), out=m)
    changed = sum(int((p.float() != q).sum()) for p, q in zip(ref_ps.params, p0))
    assert changed, f"{method.name}/{method.reference} changed no parameter: the check would be vacuous"
    errors = {}
    if not truncating:
        errors["delta"] = rel_error([p.float() - q for p, q in zip(ps.params, p0)],
                                    [p.float() - q for p, q in zip(ref_ps.params, p0)])
    for name in sorted(set(runner.state) & set(ref.state)):
        errors[name] = rel_error(runner.state[name], ref.state[name])
    tol_delta, tol_state = method.tol[dtype_name(ps.dtype)]
    bad = {k: v for k, v in errors.items() if v > (tol_delta if k == "delta" else tol_state)}
    ulps = max_ulp_difference(ps.params, ref_ps.params, peak) if half and impl.role == "kernel" else None
    if ulps is not None and ulps > steps:
        bad["max_ulp_difference"] = ulps
    assert not bad, (f"{method.name}/{impl.name} differs from {method.name}/{method.reference} after {steps} "
                     f"step(s): {bad} (tolerance: update {tol_delta:.0e}, state {tol_state:.0e}, params "
                     f"{steps} ulp)")
    return {"against": f"{method.name}/{method.reference}", "steps": steps,
            "max_rel_err": max(errors.values()), "rel_err": errors, "max_ulp_difference": ulps,
            "params_changed_by_reference": changed}


def elementwise_case(bench, method, impl, mix_name, total, dtype) -> dict:
    """One element-wise case: the check against the method's reference, then the timed step."""
    mix = elementwise_mix(mix_name, total, method.smoke_tensors)
    ps = ParamSet(mix, dtype, DEVICE)
    runner = impl.make(ps)
    check = None
    if impl.name != method.reference:
        check = check_against_reference(method, impl, runner, ps)
    else:
        runner.step()  # the reference is what the others are checked against (tests/ check it in float64)
        assert all(bool(torch.isfinite(p).all()) for p in ps.params), f"{method.name}/{impl.name}: non-finite params"
    return bench.run(
        runner.step, family="elementwise", method=method.name, impl=impl.name, role=impl.role,
        group=f"elementwise|{mix.label}|{dtype_name(dtype)}", shape=mix.label, dtype=dtype_name(dtype),
        params={"mix": mix.name, "total": mix.total, "n_tensors": len(mix.shapes), "width": mix.width},
        bytes=method.bytes(mix.shapes, dtype), compulsory_bytes=method.compulsory_bytes(mix.shapes, dtype),
        check=check, extra={"bytes_per_param": method.bytes(mix.shapes, dtype) / mix.total},
    )


# ----------------------------------------------------------------------------- factor kernels


def factor_case(bench, method, impl, p) -> dict:
    """One factor-kernel case: the result against the float64 truth, then timed."""
    inputs = method.make_inputs(p, DEVICE)
    out = impl.run(inputs)
    got = impl.result(out, inputs, p) if impl.result else out
    tol = method.tol(p, impl.name)
    err = assert_close(f"{method.name}/{impl.name} {method.label(p)} {dtype_name(p['dtype'])}", got,
                       method.truth(inputs, p), tol)
    del out, got
    reset = (lambda: method.reset(inputs)) if method.reset else None
    if reset:
        reset()
    shape_params = {k: v for k, v in p.items() if k != "dtype"}
    return bench.run(
        lambda: impl.run(inputs), family="factor", method=method.name, impl=impl.name, role=impl.role,
        group=f"factor|{method.name}|{method.label(p)}|{dtype_name(p['dtype'])}", shape=method.label(p),
        dtype=dtype_name(p["dtype"]), params=shape_params,
        bytes=(impl.bytes or method.bytes)(p), flops=(impl.flops or method.flops)(p),
        flops_dtype=str(p["dtype"]).replace("torch.", ""), reset=reset,
        check={"against": "float64 truth", "max_rel_err": err, "tol": tol},
    )


# ----------------------------------------------------------------------------- whole optimizer steps


def make_model(shape=None) -> GPT:
    """The step cases' model: ``shape`` = (GPTConfig, batch, sequence length), default ``STEP_MODEL[MODE]``."""
    cfg, _, _ = shape or STEP_MODEL[MODE]
    torch.manual_seed(0)
    with torch.device(DEVICE):
        return GPT(cfg)


def backward(model: GPT, seed: int = 0, shape=None) -> None:
    cfg, batch, seq = shape or STEP_MODEL[MODE]
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


def refresher(model, opt, backend_name, shape=None):
    """A hook-based optimizer's ``reset``: a fresh forward/backward of the same batch."""
    def refresh():
        with backend(backend_name):
            opt.zero_grad(set_to_none=False)
            backward(model, shape=shape)
    return refresh


def check_update(case, model, p0, g0, shape=None) -> dict:
    """The update of ``model`` (stepped once from ``p0`` with gradients ``g0``) against the reference's."""
    ref_case = optimizer_case(case.method, case.reference)
    ref_model = make_model(shape)
    with torch.no_grad():
        for q, w in zip(ref_model.parameters(), p0):
            q.copy_(w)
    with backend(ref_case.backend):
        ref_opt = ref_case.build(ref_model)
        if ref_case.hooks:
            with sdpa_kernel(SDPBackend.MATH):
                backward(ref_model, shape=shape)
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


def amortised_step(case, shape=None) -> dict:
    """``case.build_default`` (kfopt's default intervals) in a training loop: per-step device time.

    GPU: one period of ``case.cycle`` steps of warm-up, then one timed period (CUDA events around each
    ``step()``). Smoke run: one period and one more step through kfopt's PyTorch references (the
    interpreter is too slow for a loop), which keeps the loop from rotting but times nothing.
    """
    model = make_model(shape)
    name = "torch" if SMOKE else case.backend
    with backend(name):
        opt = case.build_default(model)
    step = stepper(opt, name)
    warm = case.cycle if not SMOKE else 0
    events = []
    for k in range(warm + case.cycle + (1 if SMOKE else 0)):
        with backend(name):
            opt.zero_grad(set_to_none=False)
            backward(model, seed=k, shape=shape)
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


def optimizer_step_case(bench, case, shape=None) -> dict:
    """One whole-step case (perf/test_optimizer_steps.py says what is measured); ``shape`` = (GPTConfig,
    batch, sequence length), default ``STEP_MODEL[MODE]``."""
    model = make_model(shape)
    p0 = [p.detach().clone() for p in model.parameters()]
    with backend(case.backend):
        opt = case.build(model)  # before the forward/backward: hook-based optimizers capture statistics in it
        with sdpa_kernel(SDPBackend.MATH) if case.hooks else contextlib.nullcontext():
            backward(model, shape=shape)
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
        check = check_update(case, model, p0, g0, shape)
    else:
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    del p0, g0

    cfg, batch, seq = shape or STEP_MODEL[MODE]
    n_params = sum(p.numel() for p in model.parameters())
    extra = dict(memory, state_bytes_per_param=memory["state_bytes"] / n_params)
    if case.hooks:
        extra["timed_step"] = "every update due (intervals 1); statistics refreshed by an untimed forward/backward"
    reset = refresher(model, opt, case.backend, shape) if case.hooks else None
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
                backward(model, shape=shape)
            step()
        rec["extra"]["iteration_latency_s"] = host_and_latency(iteration, reps=3)[1]
        rec["extra"]["step_share_of_iteration"] = rec["median_s"] / rec["extra"]["iteration_latency_s"]
    del opt, model, step, reset
    free_memory()
    if case.build_default:
        rec["extra"].update(amortised_step(case, shape))
        free_memory()
    return rec


def free_memory() -> None:
    """Free the GPU memory of a finished model and optimizer now: the capture's hook closures form
    reference cycles with the optimizer, which only the garbage collector frees."""
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
