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

import pytest

from perf.cases import OPTIMIZERS
from perf.config import SMOKE
from perf.run_cases import optimizer_step_case

# SONew's kernel costs ~1 s per tensor per step in the interpreter: its kfopt path is smoke-tested
# in test_elementwise.py; here the smoke run covers its reference path (same optimizer class).
SMOKE_SKIP = {("sonew-band1", "kfopt"), ("sonew-band4", "kfopt")}

CASES = [pytest.param(case, id=f"{case.method}-{case.impl}") for case in OPTIMIZERS]


@pytest.mark.parametrize("case", CASES)
def test_optimizer_step(bench, case):
    if SMOKE and (case.method, case.impl) in SMOKE_SKIP:
        pytest.skip("smoke run: kernel path covered by test_elementwise (the interpreter is too slow for a model)")
    optimizer_step_case(bench, case)
