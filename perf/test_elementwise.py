"""Element-wise optimizer steps on realistic tensor-size mixes (cases: perf.cases.ELEMENTWISE).

Each case: build the mix's params and grads, check the implementation against the method's
reference over a few steps from the same state (parameter updates and state), then time one step.
"""

import pytest
import torch

from perf.cases import ELEMENTWISE, ParamSet, dtype_name, elementwise_mix
from perf.checking import max_ulp_difference, rel_error
from perf.config import DEVICE, INTERPRETER, MODE

CASES = [
    pytest.param(method, impl, mix, total, dtype,
                 id=f"{method.name}-{impl.name}-{elementwise_mix(mix, total, method.smoke_tensors).label}-"
                    f"{dtype_name(dtype)}")
    for method in ELEMENTWISE
    for impl in method.impls if impl.bench
    for mix, total, dtype in method.sizes(MODE)
]


def check_against_reference(method, impl, runner, ps: ParamSet) -> dict:
    """Step ``runner`` and the reference from the same state (fresh grads each step); return the
    relative errors of the parameter update and of every shared state tensor.

    kfopt kernels under Triton's interpreter (the smoke run) take one step (the interpreter is slow);
    it truncates fp32 -> bf16 stores (the GPU rounds to nearest even), so for bf16/fp16 parameters
    there the check is parameters within 1 ulp of the reference and state to the usual tolerance.
    """
    half = ps.dtype != torch.float32
    interpreted = impl.role == "kernel" and INTERPRETER
    truncating = half and interpreted
    steps = 1 if interpreted else method.check_steps
    ref_ps = ps.clone()
    p0 = [p.detach().float().clone() for p in ps.params]
    ref = method.impl(method.reference).make(ref_ps)
    for k in range(steps):
        if k:
            ps.refresh_grads(k)
            ref_ps.refresh_grads(k)
        runner.step()
        ref.step()
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
    ulps = max_ulp_difference(ps.params, ref_ps.params) if half and impl.role == "kernel" else None
    if ulps is not None and ulps > steps:
        bad["max_ulp_difference"] = ulps
    assert not bad, (f"{method.name}/{impl.name} differs from {method.name}/{method.reference} after {steps} "
                     f"step(s): {bad} (tolerance: update {tol_delta:.0e}, state {tol_state:.0e}, params "
                     f"{steps} ulp)")
    return {"against": f"{method.name}/{method.reference}", "steps": steps,
            "max_rel_err": max(errors.values()), "rel_err": errors, "max_ulp_difference": ulps,
            "params_changed_by_reference": changed}


@pytest.mark.parametrize("method,impl,mix_name,total,dtype", CASES)
def test_elementwise_step(bench, method, impl, mix_name, total, dtype):
    mix = elementwise_mix(mix_name, total, method.smoke_tensors)
    ps = ParamSet(mix, dtype, DEVICE)
    runner = impl.make(ps)
    check = None
    if impl.name != method.reference:
        check = check_against_reference(method, impl, runner, ps)
    else:
        runner.step()  # the reference is what the others are checked against (tests/ check it in float64)
        assert all(bool(torch.isfinite(p).all()) for p in ps.params), f"{method.name}/{impl.name}: non-finite params"
    bench.run(
        runner.step, family="elementwise", method=method.name, impl=impl.name, role=impl.role,
        group=f"elementwise|{mix.label}|{dtype_name(dtype)}", shape=mix.label, dtype=dtype_name(dtype),
        params={"mix": mix.name, "total": mix.total, "n_tensors": len(mix.shapes), "width": mix.width},
        bytes=method.bytes(mix.shapes, dtype), compulsory_bytes=method.compulsory_bytes(mix.shapes, dtype),
        check=check, extra={"bytes_per_param": method.bytes(mix.shapes, dtype) / mix.total},
    )
