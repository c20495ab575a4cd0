"""Factor kernels against cuBLAS and the unfused PyTorch sequences (cases: perf.cases.FACTOR).

Each case: random inputs, the implementation's result checked against the float64 truth, then timed.
Families: symmetric covariance vs ``torch.matmul(x.T, x)``; eigen-basis preconditioning vs the unfused
PyTorch sequence; rank-1 inverse updates (in place; ``reset`` restores the factors and their scales
before every timed round) vs the two-op PyTorch version and kfopt's reference; SINGD's structured
products (block-diagonal, packed triangular, triangular Toeplitz) vs the dense ``torch.matmul`` of the
same logical d x d factor.
"""

import pytest

from perf.cases import FACTOR, dtype_name
from perf.checking import assert_close
from perf.config import DEVICE, MODE

CASES = [
    pytest.param(method, impl, p, id=f"{method.name}-{impl.name}-{method.label(p)}-{dtype_name(p['dtype'])}")
    for method in FACTOR
    for impl in method.impls
    for p in method.grid[MODE]
]


@pytest.mark.parametrize("method,impl,p", CASES)
def test_factor_kernel(bench, method, impl, p):
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
    bench.run(
        lambda: impl.run(inputs), family="factor", method=method.name, impl=impl.name, role=impl.role,
        group=f"factor|{method.name}|{method.label(p)}|{dtype_name(p['dtype'])}", shape=method.label(p),
        dtype=dtype_name(p["dtype"]), params=shape_params,
        bytes=(impl.bytes or method.bytes)(p), flops=(impl.flops or method.flops)(p),
        flops_dtype=str(p["dtype"]).replace("torch.", ""), reset=reset,
        check={"against": "float64 truth", "max_rel_err": err, "tol": tol},
    )
