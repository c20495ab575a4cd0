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
from perf.config import MODE
from perf.run_cases import factor_case

CASES = [
    pytest.param(method, impl, p, id=f"{method.name}-{impl.name}-{method.label(p)}-{dtype_name(p['dtype'])}")
    for method in FACTOR
    for impl in method.impls
    for p in method.grid[MODE]
]


@pytest.mark.parametrize("method,impl,p", CASES)
def test_factor_kernel(bench, method, impl, p):
    factor_case(bench, method, impl, p)
