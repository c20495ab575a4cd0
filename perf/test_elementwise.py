"""Element-wise optimizer steps on realistic tensor-size mixes (cases: perf.cases.ELEMENTWISE).

Each case: build the mix's params and grads, check the implementation against the method's
reference over a few steps from the same state (parameter updates and state), then time one step
(the body: ``perf.run_cases.elementwise_case`` and its ``check_against_reference``).
"""

import pytest

from perf.cases import ELEMENTWISE, dtype_name, elementwise_mix
from perf.config import MODE
from perf.run_cases import elementwise_case

CASES = [
    pytest.param(method, impl, mix, total, dtype,
                 id=f"{method.name}-{impl.name}-{elementwise_mix(mix, total, method.smoke_tensors).label}-"
                    f"{dtype_name(dtype)}")
    for method in ELEMENTWISE
    for impl in method.impls if impl.bench
    for mix, total, dtype in method.sizes(MODE, impl)
]


@pytest.mark.parametrize("method,impl,mix_name,total,dtype", CASES)
def test_elementwise_step(bench, method, impl, mix_name, total, dtype):
    elementwise_case(bench, method, impl, mix_name, total, dtype)
