"""One command that validates and measures kfopt on a GPU within minutes (run by perf/gpu_check.sh).

    bash perf/gpu_check.sh [OUTDIR]          # a machine with one NVIDIA GPU
    bash perf/gpu_check.sh --dry-run         # any machine: print the plan, run nothing
    bash perf/gpu_check.sh --cpu-smoke [OUTDIR]   # CPU: the same driver through Triton's interpreter

Work runs in priority order (``STAGES``), so a run cut short still answers the most important
questions; before each item the driver compares its estimate with the time left before the deadline
(``KFOPT_GPU_CHECK_DEADLINE_S`` seconds after the script started, default 450) and skips what no
longer fits. A timer raises at the deadline inside whatever runs, and SIGTERM does the same: the
results measured so far are then written as usual. Every item's outcome is also appended to
``OUTDIR/gpu_check_items.jsonl`` as soon as it is known, so even a killed run keeps them.

Compilation: every kernel launches its declared default config (``KFOPT_AUTOTUNE=default``: one
compile per kernel and constexpr signature, no tuning; tuning is measured separately in stage 7).
Stage 2 (correctness) runs in parallel worker processes that share one Triton cache, so the kernels
compile there on all CPU cores; its large shapes are the later stages' shapes (same dtype, same
alignment class), so the timed stages load those kernels from the cache. The Triton cache is a fresh
folder per run (``KFOPT_GPU_CHECK_TRITON_CACHE`` reuses one): the number of kernels compiled (cubin
files written) is counted per stage, and the summary splits the wall time into compilation and
tuning (stage 2, and each timed case's first call) and measurement.

Results: ``perf/results/<gpu>.jsonl`` (appended, mode "gpu-check") and ``perf/results/<gpu>.png``,
as ``pytest perf/`` writes them; ``OUTDIR/gpu_check_summary.md`` (cases, targets, correctness
failures, skipped items) and the log (the shell script tees it to ``OUTDIR/gpu_check.log``).
The CPU smoke run writes its results to a temporary folder, never to perf/results/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DEADLINE_S = 450.0
#: Wall seconds to compile one Triton kernel signature on one core (an estimate for the plan; the
#: run measures the real figure).
COMPILE_S_EST = 1.5
#: Seconds for a worker process to start (import torch, triton, kfopt; create a CUDA context).
WORKER_START_S = 12.0
#: Stage 2's worker processes on the target machine (16 CPU cores: one left for the main process).
TARGET_WORKERS = 15
#: Seconds kept back at the deadline for writing the results, the plot and the summary.
FINALIZE_S = 15.0


class DeadlineReached(Exception):
    """Raised (by a timer or SIGTERM) when the run must stop and write what it has."""


STAGES = {
    1: ("environment", "GPU, driver, torch/triton versions, copy bandwidth, bf16/fp16/fp32 matmul rates"),
    2: ("correctness", "every public kernel in each dtype at an awkward and a large shape against its float64 "
                       "reference; two steps of every optimizer against its PyTorch reference path (parallel "
                       "worker processes: the kernels compile here)"),
    3: ("elementwise", "LAMB, LARS, Adam grafting, SONew band 1 and 4 on GPT-2 small's parameter shapes (124M; "
                       "fp32, bf16) against AdamW(fused) and their foreach baselines; floor fraction"),
    4: ("steps", "whole steps on the GPT-2-small-shaped model: K-FAC, MKOR, MKOR-H, SINGD (dense, "
                 "block-diagonal, Toeplitz/diagonal) against AdamW(fused): every update due, amortised, state"),
    5: ("factor", "factor kernels at d = 1024 and 4096 (bf16, fp32): covariance vs torch.matmul(x.T, x), "
                  "rank-1 update, eigen preconditioning, structured products vs dense matmul"),
    6: ("torch.compile", "the LAMB and SONew steps in PyTorch compiled by torch.compile, timed after compiling"),
    7: ("rest", "tuning cost (fresh processes), then the other sizes of pytest perf/"),
}

#: The Triton kernels each public kernel launches (estimates for the plan's compile count; the run
#: counts the real number). Every name of ``kfopt.kernels`` without ``_reference`` must be here.
KERNEL_LAUNCHES = {
    "lamb_step": ("_grad_sumsq_kernel", "_clip_coef_kernel", "_segment_norms_kernel", "_lamb_moments_kernel",
                  "_lamb_apply_kernel"),
    "lars_step": ("_grad_sumsq_kernel", "_clip_coef_kernel", "_segment_norms_kernel", "_lars_direction_kernel",
                  "_lars_apply_kernel"),
    "sonew_step": ("_grad_sumsq_kernel", "_clip_coef_kernel", "_segment_norms_kernel", "_sonew_halo_kernel",
                   "_sonew_row_sum_kernel", "_segment_max_kernel", "_sonew_direction_kernel", "_sonew_apply_kernel"),
    "graft_step": ("_graft_partials_kernel", "_segment_norms_kernel", "_graft_verdict_kernel", "_graft_apply_kernel"),
    "symmetric_covariance": ("_symmetric_covariance_kernel",),
    "eigen_precondition": ("_grouped_gemm_kernel[rotate]", "_grouped_gemm_kernel[scale]",
                           "_grouped_gemm_kernel[back]"),
    "rank1_inverse_update": ("_matvec_kernel", "_coefficients_kernel", "_apply_kernel"),
    "kronecker_precondition": ("_left_kernel", "_right_kernel", "_norms_kernel", "_rescale_kernel"),
    "block_diagonal_matmul": ("_block_matmul_kernel",),
    "block_covariance": ("_block_covariance_kernel",),
    "diagonal_matmul": ("_diagonal_matmul_kernel",),
    "diagonal_from_inner": ("_diagonal_inner_kernel",),
    "hierarchical_matmul": ("_hierarchical_kernel[a]", "_hierarchical_kernel[bcd]", "_hierarchical_kernel[e]"),
    "triangular_matmul": ("_lower_triangular_kernel",),
    "toeplitz_matmul": ("_lower_triangular_kernel[toeplitz]",),
    "lag_sums": ("_lag_sums_kernel",),
}
DTYPES = ("fp32", "bf16", "fp16")

#: Optimizers of stage 2's two-step check: name -> (public kernels they launch, a perf.cases case
#: name or an extra builder key).
OPTIMIZER_KERNELS = {
    "lamb": ("lamb_step",), "lars": ("lars_step",), "sonew-band1": ("sonew_step",), "sonew-band4": ("sonew_step",),
    "kfac": ("symmetric_covariance", "eigen_precondition"),
    "kfac-inverse-lamb": ("symmetric_covariance", "kronecker_precondition", "lamb_step"),
    "mkor": ("rank1_inverse_update", "kronecker_precondition", "lamb_step"),
    "mkorh": ("rank1_inverse_update", "kronecker_precondition", "lamb_step"),
    "kfac-graft": ("symmetric_covariance", "eigen_precondition", "graft_step"),
    "singd-dense": ("symmetric_covariance",),
    "singd-graft": ("symmetric_covariance", "graft_step"),
    "singd-block32": ("block_diagonal_matmul", "block_covariance"),
    "singd-toeplitz": ("toeplitz_matmul", "lag_sums", "diagonal_matmul", "diagonal_from_inner"),
    "singd-tril": ("triangular_matmul",),
    "singd-hierarchical": ("hierarchical_matmul",),
    "heavyball": (),  # PyTorch only (SINGD's default base): checked against float64 on the GPU
}
KRONECKER_STEP_CASES = ("kfac", "mkor", "mkorh", "singd-dense", "singd-block32", "singd-toeplitz")
ELEMENTWISE_METHODS = ("adamw", "lamb", "sonew-band1", "lars", "graft", "sonew-band4")  # stage 3, in this order
#: the public kernel of each element-wise method of stage 3 (perf.cases.ELEMENTWISE)
ELEMENTWISE_KERNELS = {"lamb": "lamb_step", "lars": "lars_step", "graft": "graft_step", "sonew-band1": "sonew_step",
                       "sonew-band4": "sonew_step"}
GPT2_SMALL_PARAMS = 124_439_808


# ============================================================================ the plan


@dataclass
class Item:
    """One unit of work: ``kind`` selects the runner, ``args`` its arguments; ``est_s`` the wall seconds
    it takes once its kernels are compiled; ``compiles`` its compile keys (kernel | dtype | alignment);
    ``parallel``: runs in stage 2's worker processes; ``heavy``: holds GPT-2-small-sized tensors (float64
    copies included, up to ~17 GiB of GPU memory), at most ``HEAVY_AT_ONCE`` of them run at a time."""

    stage: int
    name: str
    kind: str
    args: dict = field(default_factory=dict)
    est_s: float = 1.0
    compiles: tuple = ()
    parallel: bool = False
    heavy: bool = False


#: stage 2's heavy items running at once: 15 workers each holding ~10-17 GiB ran the H200 (140 GiB) out
#: of memory
HEAVY_AT_ONCE = 5


def _launch_keys(kernels, dtype: str, shape: str) -> tuple:
    return tuple(f"{k}|{dtype}|{shape}" for fn in kernels for k in KERNEL_LAUNCHES[fn])


def build_plan(smoke: bool) -> list[Item]:
    """The ordered plan (the same on a GPU and in the CPU smoke run; only sizes differ)."""
    items: list[Item] = [Item(1, "environment and ceilings", "environment", est_s=8.0)]
    # -- stage 2: correctness (parallel)
    shapes = ("awkward", "large")
    for fn in KERNEL_LAUNCHES:
        for dtype in DTYPES:
            for shape in shapes:
                variants = [None]
                if fn == "sonew_step" and shape == "large":
                    variants = [1, 4]  # the two bands of stage 3
                for band in variants:
                    suffix = f" band {band}" if band else ""
                    big = shape == "large" and fn in ELEMENTWISE_KERNELS.values()
                    items.append(Item(2, f"kernel {fn} {dtype} {shape}{suffix}", "kernel-check",
                                      dict(kernel=fn, dtype=dtype, shape=shape, band=band),
                                      est_s=(6.0 if big else 0.8), compiles=_launch_keys([fn], dtype, shape),
                                      parallel=True, heavy=big))
    for opt, fns in OPTIMIZER_KERNELS.items():
        items.append(Item(2, f"optimizer {opt} two steps vs reference", "optimizer-check", dict(optimizer=opt),
                          est_s=4.0, compiles=_launch_keys(fns, "fp32", "large"), parallel=True))
    if not smoke:  # the stage-4 model's kernels, compiled here in parallel (one untimed step, batch 1)
        for method in KRONECKER_STEP_CASES:
            items.append(Item(2, f"prewarm step {method} gpt2-small", "prewarm-step", dict(method=method),
                              est_s=8.0, compiles=_launch_keys(OPTIMIZER_KERNELS[method], "fp32", "large"),
                              parallel=True, heavy=True))
    # -- stage 3: element-wise steps on GPT-2 small's shapes
    for dtype in ("fp32", "bf16"):
        for method in ELEMENTWISE_METHODS:
            impls = ("torch-fused",) if method == "adamw" else ("kfopt", "foreach")
            if method == "sonew-band4":
                impls = ("kfopt",)
            for impl in impls:
                keys = _launch_keys([ELEMENTWISE_KERNELS[method]], dtype, "large") if impl == "kfopt" else ()
                items.append(Item(3, f"elementwise {method} {impl} gpt2-small {dtype}", "elementwise",
                                  dict(method=method, impl=impl, dtype=dtype, mix="gpt2-small",
                                       total=GPT2_SMALL_PARAMS),
                                  est_s=5.0 if method.startswith("sonew") else 3.0, compiles=keys))
    # -- stage 4: whole steps
    items.append(Item(4, "step adamw torch-fused gpt2-small", "step", dict(method="adamw", impl="torch-fused"),
                      est_s=6.0))
    for method in KRONECKER_STEP_CASES:
        items.append(Item(4, f"step {method} kfopt gpt2-small", "step", dict(method=method, impl="kfopt"),
                          est_s=18.0, compiles=_launch_keys(OPTIMIZER_KERNELS[method], "fp32", "large")))
    # -- stage 5: factor kernels
    factor_impls = {"symmetric_covariance": ("kfopt", "torch.matmul"), "rank1_inverse_update": ("kfopt", "torch-two-op"),
                    "eigen_precondition": ("kfopt", "reference"), "block_diagonal_matmul": ("kfopt", "dense-matmul"),
                    "triangular_matmul": ("kfopt", "dense-matmul"), "toeplitz_matmul": ("kfopt", "dense-matmul")}
    for d in (1024, 4096):
        for dtype in ("bf16", "fp32"):
            for method, impls in factor_impls.items():
                for impl in impls:
                    keys = _launch_keys([method], dtype, "large") if impl == "kfopt" else ()
                    items.append(Item(5, f"factor {method} {impl} d={d} {dtype}", "factor",
                                      dict(method=method, impl=impl, d=d, dtype=dtype),
                                      est_s=1.5 if d == 1024 else 3.0, compiles=keys))
    # -- stage 6: torch.compile baselines (inductor compiles its own kernels: not in the Triton count)
    for dtype in ("fp32", "bf16"):
        for method in ("lamb", "sonew-band1"):
            items.append(Item(6, f"torch.compile {method} gpt2-small {dtype}", "elementwise",
                              dict(method=method, impl="torch.compile", dtype=dtype, mix="gpt2-small",
                                   total=GPT2_SMALL_PARAMS), est_s=90.0 if method == "lamb" else 150.0))
    # -- stage 7: tuning cost, then the rest of pytest perf/
    for kernel in ("lamb_step", "symmetric_covariance"):
        items.append(Item(7, f"autotune cost {kernel}", "autotune", dict(kernel=kernel), est_s=60.0))
    for dtype in ("fp32", "bf16"):
        for total in (int(1e7), int(1e8)):
            for method in ("adamw", "lamb", "lars", "sonew-band1"):
                impls = ("torch-fused",) if method == "adamw" else ("kfopt", "foreach")
                for impl in impls:
                    items.append(Item(7, f"elementwise {method} {impl} bert-large@{total:.0e} {dtype}",
                                      "elementwise", dict(method=method, impl=impl, dtype=dtype, mix="bert-large",
                                                          total=total), est_s=4.0))
    for dtype in ("bf16", "fp32"):
        for method in factor_impls:
            for impl in factor_impls[method]:
                items.append(Item(7, f"factor {method} {impl} d=256 {dtype}", "factor",
                                  dict(method=method, impl=impl, d=256, dtype=dtype), est_s=1.0))
    return items


def plan_summary(items: list[Item], workers: int) -> dict:
    """Per stage: items, new compile keys (not needed by an earlier stage), estimated seconds."""
    seen: set = set()
    stages = {}
    for s in STAGES:
        its = [i for i in items if i.stage == s]
        new = {k for i in its for k in i.compiles} - seen
        seen |= new
        work = sum(i.est_s for i in its)
        compile_s = len(new) * COMPILE_S_EST
        if any(i.parallel for i in its):
            wall = WORKER_START_S + (work + compile_s) / max(1, workers)
        else:
            wall = work + compile_s
        stages[s] = {"name": STAGES[s][0], "what": STAGES[s][1], "items": len(its), "new_compiles": len(new),
                     "compile_s": compile_s, "work_s": work, "wall_s": wall, "parallel": any(i.parallel for i in its)}
    return {"stages": stages, "compiles": len(seen), "workers": workers,
            "compile_s": sum(v["compile_s"] for v in stages.values()),
            "wall_s": sum(v["wall_s"] for v in stages.values())}


def print_plan(items: list[Item], workers: int, deadline_s: float, out=sys.stdout) -> dict:
    summary = plan_summary(items, workers)
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"kfopt GPU check plan: {len(items)} items in {len(STAGES)} stages, priority order; deadline {deadline_s:.0f} s")
    p(f"kernels launch their default config (KFOPT_AUTOTUNE=default); stage 2 runs on {workers} worker processes")
    elapsed = 0.0
    for s, st in summary["stages"].items():
        elapsed += st["wall_s"]
        fits = "fits" if elapsed <= deadline_s - FINALIZE_S else "past the deadline: cut short or skipped"
        p(f"stage {s} {st['name']}: {st['items']} items, estimated compiles {st['new_compiles']} "
          f"(~{st['compile_s']:.0f} s of compilation{' over ' + str(workers) + ' processes' if st['parallel'] else ''}), "
          f"estimated {st['wall_s']:.0f} s, cumulative {elapsed:.0f} s ({fits})")
        p(f"  {st['what']}")
        for i in (i for i in items if i.stage == s):
            p(f"    - {i.name}  [est {i.est_s:.1f} s, {len(set(i.compiles))} compile keys]")
    p(f"estimated cold compile count: {summary['compiles']} Triton kernel signatures "
      f"(kernel x dtype x alignment class; ~{summary['compile_s']:.0f} s of single-core compilation)")
    p(f"estimated total: {summary['wall_s']:.0f} s (deadline {deadline_s:.0f} s; stages that do not fit are cut short, "
      f"lowest priority first)")
    covered_kernels = sorted({i.args["kernel"] for i in items if i.kind == "kernel-check"})
    covered_opts = sorted({i.args["optimizer"] for i in items if i.kind == "optimizer-check"})
    p(f"public kernels checked: {', '.join(covered_kernels)}")
    p(f"optimizers checked: {', '.join(covered_opts)}")
    return summary


# ============================================================================ stage 2: correctness


def _tensors_map(obj, fn):
    import torch
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tensors_map(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _tensors_map(v, fn) for k, v in obj.items()}
    return obj


def _to64(t):
    import torch
    return t.detach().clone().double() if t.is_floating_point() else t.detach().clone()


def kernel_problem(name: str, dtype, shape: str, device, band=None, large: int = 1024):
    """(args, kwargs, result, elementwise) of one check: ``kfopt.kernels.<name>(*args, **kwargs)`` then
    ``result(returned, args)`` is compared with the same call on float64 copies through the PyTorch
    reference. ``large``: the side of the large shape (1024 on a GPU)."""
    import torch

    from perf import cases
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(f"{name}|{shape}|{band}".encode()))
    rn = lambda *s, dt=dtype: torch.randn(*s, generator=gen, device=device).to(dt)  # noqa: E731

    def spd(d, dt=dtype):
        a = torch.randn(d, d, generator=gen, device=device) / math.sqrt(d)
        return (torch.eye(d, device=device) + 0.1 * (a + a.T)).to(dt)

    def orth(n, dt=dtype):
        return torch.linalg.qr(torch.randn(n, n, generator=gen, device=device))[0].to(dt)

    L = large
    aw = shape == "awkward"
    out_like = lambda x: None if aw else torch.empty_like(x)  # noqa: E731 (large: an out in x's dtype, as perf/ does)
    same = lambda ret, args: ret  # noqa: E731
    if name == "symmetric_covariance":
        x = rn(33, 19) if aw else rn(L, L)
        return (x,), {}, same, False
    if name == "eigen_precondition":
        layers = [(24, 20), (9, 33)] if aw else [(L, L)]
        return ([rn(m, n) for m, n in layers], [orth(n) for _, n in layers],
                [torch.rand(n, generator=gen, device=device) ** 2 for _, n in layers],
                [orth(m) for m, _ in layers], [torch.rand(m, generator=gen, device=device) ** 2 for m, _ in layers],
                1e-3), {}, same, False
    if name == "rank1_inverse_update":
        sides = [17, 5] if aw else [L]
        args = ([spd(d) for d in sides], [rn(d) / math.sqrt(d) for d in sides],
                torch.ones(len(sides), device=device))
        scaled = lambda ret, a: [s * f for s, f in zip(a[2].unbind(), a[0])]  # noqa: E731
        return args, {"decay": cases.RANK1_GAMMA}, scaled, False
    if name == "kronecker_precondition":
        if aw:
            args = ([spd(6), spd(6)], [rn(6, 9), rn(6, 9)], [spd(10), spd(9)], [rn(6), None])
        else:
            args = ([spd(L)], [rn(L, L)], [spd(L + 1)], [rn(L)])
        return args, {}, lambda ret, a: list(a[1]) + [b for b in a[3] if b is not None], False
    if name == "block_diagonal_matmul":
        blocks, x = (rn(4, 5, 5), rn(20, 7)) if aw else (rn(L // 32, 32, 32) / math.sqrt(32), rn(L, L))
        return (blocks, x), {"out": out_like(x)}, same, False
    if name == "block_covariance":
        return ((rn(9, 19), 5) if aw else (rn(L, L), 32)), {"scale": 0.5}, same, False
    if name == "diagonal_matmul":
        diag, x = (rn(19), rn(19, 5)) if aw else (rn(L), rn(L, L))
        return (diag, x), {"out": out_like(x)}, same, False
    if name == "diagonal_from_inner":
        return ((rn(20), rn(9, 20)) if aw else (rn(L), rn(L, L))), {}, same, False
    if name == "hierarchical_matmul":
        k1, m, k2, n = (3, 14, 2, 5) if aw else (32, L - 64, 32, L)
        x = rn(k1 + m + k2, n)
        return (rn(k1, k1), rn(k1, m + k2), rn(m), rn(k2, m), rn(k2, k2), x), {"out": out_like(x)}, same, False
    if name == "lag_sums":
        return ((rn(9, 19),) if aw else (rn(L, L),)), {}, same, False
    if name == "toeplitz_matmul":
        d, x = (19, rn(19, 5)) if aw else (L, rn(L, L))
        return (rn(d) / math.sqrt(d), x), {"out": out_like(x)}, same, False
    if name == "triangular_matmul":
        d, x = (19, rn(19, 5)) if aw else (L, rn(L, L))
        return (rn(d * (d + 1) // 2) / math.sqrt(d), x), {"out": out_like(x)}, same, False
    # element-wise steps: the awkward shape, or the parameter shapes of stage 3 (GPT-2 small on a GPU)
    if aw:
        shapes = [(17, 9), (33,), (1, 129)]
    else:
        shapes = list(cases.elementwise_mix("gpt2-small", GPT2_SMALL_PARAMS if L >= 1024 else 3000).shapes)
    params = [rn(*s) * 0.02 for s in shapes]
    grads = [rn(*s) * (2.0 / math.sqrt(sum(p.numel() for p in params))) for s in shapes]
    f32 = lambda s, scale: torch.randn(*s, generator=gen, device=device) * scale  # noqa: E731
    steps = [torch.full((), 3.0, device=device) for _ in shapes]
    if name == "lamb_step":
        m = [f32(s, 1e-4) for s in shapes]
        v = [f32(s, 1e-4).square() + 1e-9 for s in shapes]
        return ((params, grads, m, v, steps), dict(cases.LAMB_HP, adapt=True), lambda ret, a: (a[0], a[2], a[3]),
                True)
    if name == "lars_step":
        mom = [f32(s, 1e-5) for s in shapes]
        return ((params, grads, mom), dict(cases.LARS_HP, adapt=True, max_grad_norm=None),
                lambda ret, a: (a[0], a[2]), True)
    if name == "sonew_step":
        b = band or 2
        mu = [f32(s, 1e-4) for s in shapes]
        n = [math.prod(s) for s in shapes]
        diag = [f32((k,), 1e-4).square() + 1e-8 for k in n]
        off = [f32((cases.sonew_tensor_band(s, b), k), 1e-10) for s, k in zip(shapes, n)]
        kw = dict(cases.SONEW_HP, precondition=[len(s) > 1 for s in shapes])
        return (params, grads, mu, diag, off, steps), kw, lambda ret, a: (a[0], a[2], a[3], a[4]), True
    if name == "graft_step":  # vectors not preconditioned (no buffer), as K-FAC's biases-free layers' norms
        pre = [len(s) > 1 for s in shapes]
        directions = [rn(*s) * (2.0 / math.sqrt(sum(p.numel() for p in params))) for s in shapes]
        m = [f32(s, 1e-4) for s in shapes]
        v = [f32(s, 1e-4).square() + 1e-9 for s in shapes]
        bufs = [f32(s, 1e-4) if p else None for s, p in zip(shapes, pre)]
        kw = dict(cases.GRAFT_HP, graft="adam", precondition=pre,
                  momentum=[cases.GRAFT_HP["momentum"] * p for p in pre])
        return ((params, grads, directions, m, v, bufs, steps), kw,
                lambda ret, a: (a[0], a[3], a[4], [b for b in a[5] if b is not None]), True)
    raise KeyError(f"no check for kernel {name!r}")


def run_kernel_check(args: dict, device, large: int) -> dict:
    """One public kernel against the float64 reference. Element-wise steps run two calls and compare the
    parameter update (fp32 params: relative 1e-4; 16-bit params: the params, 1e-2) and the state (1e-4);
    the others their result with the test suite's tolerance (fp32 1e-5, bf16/fp16 1e-2)."""
    import torch

    import kfopt.kernels as K
    from perf.cases import torch_backend
    from perf.checking import rel_error
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args["dtype"]]
    fn = getattr(K, args["kernel"])
    a, kw, result, elementwise = kernel_problem(args["kernel"], dtype, args["shape"], device, args.get("band"), large)
    a64, kw64 = _tensors_map(a, _to64), _tensors_map(kw, _to64)
    if args["kernel"] == "rank1_inverse_update":  # its scales are fp32 whatever the factors' dtype
        a64 = (*a64[:2], a[2].clone(), *a64[3:])
    before = [p.detach().clone() for p in a[0]] if elementwise else None
    calls = 2 if elementwise else 1
    for _ in range(calls):
        ret = fn(*a, **kw)
    with torch_backend():
        for _ in range(calls):
            ret64 = fn(*a64, **kw64)
    if device.type == "cuda":
        torch.cuda.synchronize()
    got, want = result(ret, a), result(ret64, a64)
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    errors, tols = {}, {}
    if elementwise:
        params, params64 = got[0], want[0]
        if dtype == torch.float32:
            errors["update"] = rel_error([p - b for p, b in zip(params, before)],
                                         [q - b.double() for q, b in zip(params64, before)])
            tols["update"] = 1e-4
        else:
            errors["params"] = rel_error(params, params64)
            tols["params"] = 1e-2
        for k, (g, w) in enumerate(zip(got[1:], want[1:])):
            errors[f"state{k}"] = rel_error(g, w)
            tols[f"state{k}"] = 1e-4
    else:
        out_dtype = got[0].dtype
        tol = 1e-5 if out_dtype == torch.float32 and dtype == torch.float32 else 1e-2
        errors["result"] = rel_error(got, want)
        tols["result"] = tol
    bad = {k: v for k, v in errors.items() if not v <= tols[k]}
    return {"ok": not bad, "errors": errors, "tols": tols,
            "error": None if not bad else "; ".join(f"{k}: relative error {v:.3e} > {tols[k]:.0e}" for k, v in bad.items())}


def _optimizer_builder(name: str):
    from perf import cases
    if name in ("lamb", "lars"):
        return {"lamb": cases._lamb, "lars": cases._lars}[name]
    if name == "heavyball":
        return lambda model: cases.REGISTRY["heavy_ball"].build(model, lr=1e-3)
    if name.startswith("sonew-band"):
        return cases._sonew(int(name[len("sonew-band"):]))
    variants = {"kfac-inverse-lamb": ("kfac", dict(compute_method="inverse", base="lamb")),
                "kfac-graft": ("kfac-graft", {}), "singd-graft": ("singd-graft", {}),
                "singd-tril": ("singd", dict(structures=("tril", "triu"))),
                "singd-hierarchical": ("singd", dict(structures=("hierarchical3_2", "dense")))}
    if name in variants:
        entry, hyperparameters = variants[name]
        return cases.kronecker_factored(entry, **hyperparameters)(True)
    return cases.optimizer_case(name, "kfopt").build


def run_optimizer_check(args: dict, shape, tol: float = 1e-4) -> dict:
    """Two steps of an optimizer on its kernels against the same optimizer on kfopt's PyTorch references
    (for a hook-based one also in its hooks) on the same batches (attention on its math backend), as
    perf/test_optimizer_steps.py checks one step: each step starts every copy from the kernels' weights,
    and the update of every tensor must agree within ``tol`` (relative, one fp32 ulp per element not
    counted). The optimizers' states are not synchronised: their decay from step 1 into step 2 is checked.

    Why every step restarts from the kernels' weights: the gradients come from a bf16-autocast forward,
    so weights one fp32 ulp apart flip bf16 roundings and change gradients far beyond the optimizers'
    arithmetic; the key bias of attention has an exactly zero gradient whose floating-point residue is
    such noise, and an optimizer that normalises per element turns it into O(lr) updates that differ
    completely.

    Element-wise optimizers (LAMB, LARS, SONew, HeavyBall) take the kernels' gradients and are also stepped in
    float64: every tensor's update must be within ``tol`` of float64, or within 4x the largest error the
    fp32 PyTorch path makes on any tensor of the model. SONew's band > 1 solves amplify the fp32 rounding
    of their statistics by the band matrices' condition number (with the default absolute ``eps`` of
    1e-8, ~1e-3 relative on the GPT-2 check model, varying from tensor to tensor and run to run) in
    either implementation."""
    import copy

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from perf.checking import rel_error_beyond_ulp
    from perf.run_cases import backend, backward, make_model
    name = args["optimizer"]
    elementwise = name in ("lamb", "lars", "heavyball") or name.startswith("sonew-band")
    build = _optimizer_builder(name)
    model, twin = make_model(shape), make_model(shape)
    copies = {"kfopt": model, "reference": twin}
    if elementwise:
        copies["float64"] = copy.deepcopy(model).double()
    opts = {}
    for impl, m in copies.items():
        with backend(None if impl == "kfopt" else "torch"):
            opts[impl] = build(m)
    names = [n for n, _ in model.named_parameters()]
    params = {impl: list(m.parameters()) for impl, m in copies.items()}
    errors, fp32_path, moved = dict.fromkeys(names, 0.0), 0.0, 0
    for k in range(2):
        with torch.no_grad():
            for impl, ps in params.items():
                for q, p in zip(ps, params["kfopt"]):
                    q.copy_(p)
        before = [p.detach().clone() for p in params["kfopt"]]
        for impl, m in copies.items():
            with backend(None if impl == "kfopt" else "torch"), sdpa_kernel(SDPBackend.MATH):
                if impl == "kfopt" or not elementwise:
                    opts[impl].zero_grad(set_to_none=False)
                    backward(m, seed=k, shape=shape)
                else:  # copies, never aliases of the kernels' gradients
                    for q, p in zip(params[impl], params["kfopt"]):
                        q.grad = p.grad.to(q.dtype, copy=True)
                opts[impl].step()
        want = params["float64" if elementwise else "reference"]
        for n, p, q, r, w in zip(names, params["kfopt"], params["reference"], want, before):
            errors[n] = max(errors[n], rel_error_beyond_ulp(p.detach(), r.detach(), w))
            if elementwise:
                fp32_path = max(fp32_path, rel_error_beyond_ulp(q.detach(), r.detach(), w))
        moved += sum(bool((q.detach() != w).any()) for q, w in zip(params["reference"], before))
    allowed = max(tol, 4 * fp32_path)
    worst = max(errors, key=errors.get)
    ok = errors[worst] <= allowed and moved > 0
    against = "float64" if elementwise else "the reference"
    return {"ok": ok, "errors": {"worst": errors[worst], "fp32_path": fp32_path}, "tols": {"worst": allowed},
            "worst_tensor": worst,
            "error": None if ok else (f"update of {worst} differs from {against} by {errors[worst]:.3e} > {allowed:.1e}"
                                      if moved else "the reference changed no parameter")}


def run_prewarm_step(args: dict) -> dict:
    """One untimed step of a stage-4 optimizer on the GPT-2-small-shaped model (batch 1): compiles the
    kernels of its shapes in a worker process."""
    from perf import cases
    from perf.run_cases import backward, free_memory, make_model
    shape = (cases.STEP_MODEL["full"][0], 1, cases.STEP_MODEL["full"][2])
    model = make_model(shape)
    opt = cases.optimizer_case(args["method"], "kfopt").build(model)
    backward(model, shape=shape)
    opt.step()
    del opt, model
    free_memory()
    return {"ok": True, "errors": {}, "tols": {}, "error": None}


# ============================================================================ running one item


def _dtype(name: str):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def run_check_item(item: Item, smoke: bool) -> dict:
    """Stage 2's items (in a worker process or inline): returns the outcome, never raises."""
    import torch

    from perf import config
    t = time.perf_counter()
    try:
        if item.kind == "kernel-check":
            out = run_kernel_check(item.args, config.DEVICE, 48 if smoke else 1024)
        elif item.kind == "optimizer-check":
            from perf.models import GPTConfig
            shape = (GPTConfig(n_layer=1, n_head=2, d=32, vocab=64, ctx=16), 2, 16) if smoke else \
                (GPTConfig(n_layer=2, n_head=2, d=128, vocab=256, ctx=64), 2, 64)
            out = run_optimizer_check(item.args, shape)
        elif item.kind == "prewarm-step":
            out = run_prewarm_step(item.args)
        else:
            raise ValueError(item.kind)
    except DeadlineReached:
        raise
    except Exception as err:  # noqa: BLE001 - reported, the run goes on
        out = {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000],
               "traceback": traceback.format_exc()[-3000:]}
    finally:
        if config.DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    out["wall_s"] = time.perf_counter() - t
    return out


_HEAVY_SLOTS = None  # a worker's handle on the driver's semaphore of heavy items


def _worker_init(deadline: float, heavy_slots=None):
    global _HEAVY_SLOTS
    _HEAVY_SLOTS = heavy_slots
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch  # noqa: F401  (import here: the first task should not pay for it alone)

    from perf import config  # noqa: F401
    import kfopt  # noqa: F401
    os.environ["KFOPT_GPU_CHECK_WORKER_DEADLINE"] = str(deadline)


def _worker_run(item: Item, smoke: bool) -> dict:
    deadline = float(os.environ.get("KFOPT_GPU_CHECK_WORKER_DEADLINE", "inf"))
    if time.time() + item.est_s > deadline:
        return {"ok": None, "skipped": "deadline", "wall_s": 0.0}
    if item.heavy and _HEAVY_SLOTS is not None:
        with _HEAVY_SLOTS:
            return run_check_item(item, smoke)
    return run_check_item(item, smoke)


# ============================================================================ the driver


def _in_repo(path) -> str:
    """``path`` relative to the checkout when inside it (a summary is committed beside the results)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except (TypeError, ValueError):  # None (nothing written) or outside the checkout
        return str(path)


def count_cubins(cache_dir: str | None) -> int:
    if not cache_dir or not os.path.isdir(cache_dir):
        return 0
    return sum(1 for _, _, files in os.walk(cache_dir) for f in files if f.endswith(".cubin"))


class Driver:
    def __init__(self, items: list[Item], smoke: bool, outdir: Path, deadline: float, t0: float, workers: int,
                 triton_cache: str | None):
        import torch

        from perf import config
        from perf.results import Recorder
        self.items, self.smoke, self.outdir, self.deadline, self.t0 = items, smoke, outdir, deadline, t0
        self.workers, self.triton_cache = workers, triton_cache
        self.torch, self.config = torch, config
        self.recorder = Recorder("gpu-check-smoke" if smoke else "gpu-check", config.DEVICE,
                                 "none" if smoke else "cuda-events (perf.timing.measure_rounds)")
        self.outcomes: list[dict] = []
        self.stage_info: dict[int, dict] = {}
        self.stopped: str | None = None
        self.items_file = outdir / "gpu_check_items.jsonl"
        self.budget_s = float(os.environ.get("KFOPT_PERF_BUDGET_S") or 0.25)

    # -- bookkeeping ----------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.time()

    def log(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:6.1f} s] {msg}", flush=True)

    def note(self, item: Item, outcome: dict) -> None:
        entry = {"stage": item.stage, "item": item.name, "kind": item.kind, **item.args,
                 **{k: v for k, v in outcome.items() if k != "record"}}
        self.outcomes.append(entry)
        with open(self.items_file, "a") as f:
            f.write(json.dumps(entry, default=str) + "\n")
        status = "ok" if outcome.get("ok") else ("SKIPPED (" + outcome["skipped"] + ")" if outcome.get("skipped")
                                                 else "FAILED: " + str(outcome.get("error")))
        self.log(f"stage {item.stage} {item.name}: {status} ({outcome.get('wall_s', 0):.1f} s)")

    # -- stages ---------------------------------------------------------------------------
    def run(self) -> None:
        for s in STAGES:
            its = [i for i in self.items if i.stage == s]
            if not its:
                continue
            if self.stopped:
                for i in its:
                    self.note(i, {"ok": None, "skipped": self.stopped, "wall_s": 0.0})
                continue
            cubins, t = count_cubins(self.triton_cache), time.time()
            self.log(f"== stage {s} {STAGES[s][0]}: {STAGES[s][1]} ({len(its)} items, {self.left():.0f} s left)")
            try:
                if s == 2:
                    self.run_parallel(its)
                else:
                    for i in its:
                        self.run_item(i)
            except DeadlineReached as err:
                self.stopped = f"deadline ({err})"
                self.log(f"stopping: {self.stopped}")
            finally:
                self.stage_info[s] = {"wall_s": time.time() - t, "compiled": count_cubins(self.triton_cache) - cubins}
            if self.stopped:
                done = {o["item"] for o in self.outcomes}
                for i in its:
                    if i.name not in done:
                        self.note(i, {"ok": None, "skipped": self.stopped, "wall_s": 0.0})

    def fits(self, item: Item) -> bool:
        return self.left() - FINALIZE_S >= item.est_s

    def run_item(self, item: Item) -> None:
        if not self.fits(item):
            self.note(item, {"ok": None, "skipped": f"deadline (needs ~{item.est_s:.0f} s, {self.left():.0f} s left)",
                             "wall_s": 0.0})
            return
        t = time.perf_counter()
        try:
            outcome = self.dispatch(item)
        except DeadlineReached:
            self.note(item, {"ok": False, "error": "cut short at the deadline", "wall_s": time.perf_counter() - t})
            raise
        except Exception as err:  # noqa: BLE001 - reported, the run goes on
            outcome = {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000],
                       "traceback": traceback.format_exc()[-3000:]}
        outcome["wall_s"] = time.perf_counter() - t
        self.note(item, outcome)
        if self.config.DEVICE.type == "cuda":
            from perf.run_cases import free_memory
            free_memory()

    def dispatch(self, item: Item) -> dict:
        from perf import cases, run_cases
        from perf.bench import Bench
        bench = Bench(None, self.recorder, budget_s=self.budget_s)
        a = item.args
        if item.kind == "environment":
            return self.environment()
        if item.kind in ("kernel-check", "optimizer-check", "prewarm-step"):
            return run_check_item(item, self.smoke)
        if item.kind == "elementwise":
            method = next(m for m in cases.ELEMENTWISE if m.name == a["method"])
            impl = method.impl(a["impl"])
            mix, total = a["mix"], a["total"]
            if self.smoke:
                mix, total, _ = cases.ELEMENTWISE_SIZES["smoke"][0]
            rec = run_cases.elementwise_case(bench, method, impl, mix, total, _dtype(a["dtype"]))
            return {"ok": True, "record": rec, "first_call_s": rec["extra"].get("first_call_s")}
        if item.kind == "factor":
            method = next(m for m in cases.FACTOR if m.name == a["method"])
            impl = next(i for i in method.impls if i.name == a["impl"])
            p = self.factor_params(method, a["d"], _dtype(a["dtype"]))
            rec = run_cases.factor_case(bench, method, impl, p)
            return {"ok": True, "record": rec, "first_call_s": rec["extra"].get("first_call_s")}
        if item.kind == "step":
            case = cases.optimizer_case(a["method"], a["impl"])
            rec = run_cases.optimizer_step_case(bench, case)
            return {"ok": True, "record": rec, "first_call_s": rec["extra"].get("first_call_s")}
        if item.kind == "autotune":
            return self.autotune_cost(a["kernel"])
        raise ValueError(item.kind)

    def factor_params(self, method, d: int, dtype) -> dict:
        """The shape params of a factor case at side ``d`` (the smoke grid's first entry in the smoke run)."""
        from perf import cases
        if self.smoke:
            return next(p for p in method.grid["smoke"] if p["dtype"] == dtype)
        rows = 4096
        if method.name == "symmetric_covariance":
            return {"d": d, "rows": rows, "dtype": dtype}
        if method.name == "eigen_precondition":
            return {"layers": [(d, d)], "dtype": dtype}
        if method.name == "rank1_inverse_update":
            return {"sides": [d], "dtype": dtype}
        block = cases.BLOCK["full"]
        p = {"d": d, "rows": rows, "dtype": dtype}
        return dict(p, d=d - d % block, block=block) if method.name == "block_diagonal_matmul" else p

    def environment(self) -> dict:
        torch = self.torch
        from perf import timing
        env = dict(self.recorder.env)
        if self.config.DEVICE.type == "cuda":
            props = torch.cuda.get_device_properties(0)
            env.update(sm=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                       memory_gib=props.total_memory / 2**30)
            try:
                env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                               capture_output=True, text=True, timeout=20).stdout.strip() or None
            except (OSError, subprocess.SubprocessError):
                env["driver"] = None
            self.recorder.ceilings = timing.measure_ceilings()
            self.recorder.ceilings["environment"] = env
        self.env = env
        return {"ok": True, "environment": env, "ceilings": self.recorder.ceilings}

    def autotune_cost(self, kernel: str) -> dict:
        """perf/autotune_probe.py in a fresh process with tuning on (cold tuning cache, warm Triton cache)."""
        cache = self.outdir / f"autotune-{kernel}.json"
        env = dict(os.environ, KFOPT_AUTOTUNE="tune", KFOPT_PERF_AUTOTUNE_CACHE=str(cache),
                   KFOPT_PERF_MODE="smoke" if self.smoke else "quick")
        left = max(5.0, self.left() - FINALIZE_S)
        out = subprocess.run([sys.executable, "-m", "perf.autotune_probe", kernel], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=left)
        if out.returncode != 0:
            return {"ok": False, "error": out.stderr[-2000:]}
        probe = json.loads(out.stdout.strip().splitlines()[-1])
        self.recorder.add(family="autotune", method=kernel, impl="kfopt", role="autotune", group=f"autotune|{kernel}",
                          shape=probe["shape"], dtype=probe["dtype"], median_s=None, params={},
                          check={"against": "autotune contract", "max_rel_err": 0.0},
                          extra={"first_call_s": probe["first_call_s"], "n_configs": probe["n_configs"],
                                 "cached_call_s": probe["cached_call_s"], "chosen": probe["chosen"]})
        return {"ok": True, "tuning_first_call_s": probe["first_call_s"], "n_configs": probe["n_configs"]}

    def run_parallel(self, items: list[Item]) -> None:
        """Stage 2 in worker processes (spawned: the parent already holds a CUDA context); longest first."""
        todo = sorted(items, key=lambda i: -i.est_s)
        if self.workers <= 1:
            for i in todo:
                self.run_item(i)
            return
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        spawn = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=spawn, initializer=_worker_init,
                                   initargs=(self.deadline - FINALIZE_S, spawn.BoundedSemaphore(HEAVY_AT_ONCE)))
        futures = {pool.submit(_worker_run, i, self.smoke): i for i in todo}
        cut = False
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=max(0.1, self.left() - FINALIZE_S), return_when=FIRST_COMPLETED)
                for fut in done:
                    try:
                        outcome = fut.result()
                    except Exception as err:  # noqa: BLE001 - a worker died: report, go on
                        outcome = {"ok": False, "error": f"worker: {type(err).__name__}: {err}"[:2000], "wall_s": 0.0}
                    self.note(futures[fut], outcome)
                if not done and self.left() - FINALIZE_S <= 0.1:
                    cut = True
                    raise DeadlineReached("stage 2 workers still running at the deadline")
        except BaseException:
            cut = True
            raise
        finally:
            if cut:  # workers may be inside a long compilation: end them (our own processes, by their pids)
                for proc in list((getattr(pool, "_processes", None) or {}).values()):
                    if proc.is_alive():
                        proc.terminate()
            pool.shutdown(wait=not cut, cancel_futures=True)

    # -- output ---------------------------------------------------------------------------
    def finish(self, argv: list[str]) -> dict:
        from perf.results import results_folder
        rec = self.recorder
        rec.finalize()
        folder = results_folder(self.smoke or not rec.timed(), str(self.outdir / "untimed-results"))
        report = {"jsonl": rec.write_jsonl(folder) if rec.records or rec.ceilings else None,
                  "png": rec.write_png(folder) if rec.records else "no cases ran: no plot"}
        summary = self.summary(argv, report)
        path = self.outdir / "gpu_check_summary.md"
        path.write_text(summary)
        report["summary"] = path
        return report

    def summary(self, argv, report) -> str:
        rec = self.recorder
        env = getattr(self, "env", rec.env)
        c = rec.ceilings or {}
        lines = [f"# kfopt GPU check: {rec.env['device_name']}", ""]
        lines.append(f"run {rec.run_id}, commit {rec.env.get('commit')}{' (dirty)' if rec.env.get('commit_dirty') else ''}, "
                     f"`{' '.join(['bash perf/gpu_check.sh'] + argv)}`")
        if self.smoke:
            lines.append("")
            lines.append("**CPU smoke run through the Triton interpreter: nothing was timed; results in a temporary folder.**")
        total = time.time() - self.t0
        lines += ["", f"- stopped early: {self.stopped}" if self.stopped else "- completed every stage that fit",
                  f"- wall time {total:.0f} s (deadline {self.deadline - self.t0:.0f} s)",
                  f"- GPU {rec.env['device_name']}, driver {env.get('driver')}, torch {rec.env['torch']}, "
                  f"triton {rec.env['triton']}, python {rec.env['python']}, CUDA {rec.env.get('cuda')}"]
        if c:
            rates = ", ".join(f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in c["matmul_flops_per_s"].items())
            lines.append(f"- copy bandwidth {c['copy_bytes_per_s'] / 1e9:.0f} GB/s (read + write); matmul {rates} "
                         f"(fp32 under precision '{c['float32_matmul_precision']}')")
        compile_first = sum(o.get("first_call_s") or 0.0 for o in self.outcomes if o["stage"] >= 3)
        s2 = self.stage_info.get(2, {})
        measure = sum((o.get("wall_s") or 0.0) - (o.get("first_call_s") or 0.0) for o in self.outcomes if o["stage"] >= 3)
        compiled = sum(v.get("compiled", 0) for v in self.stage_info.values())
        lines.append(f"- compilation and tuning: {s2.get('wall_s', 0.0) + compile_first:.0f} s (stage 2 on "
                     f"{self.workers} processes: {s2.get('wall_s', 0.0):.0f} s wall, {s2.get('compiled', 0)} kernels "
                     f"compiled; first calls of the timed cases: {compile_first:.0f} s); measurement: {measure:.0f} s; "
                     f"Triton kernels compiled in this run: {compiled} (cubins; torch.compile's own not included "
                     f"unless it shares the cache)")
        lines += ["", "## Stages", "", "| stage | items | ok | failed | skipped | wall s | kernels compiled |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for s, (name, _) in STAGES.items():
            os_ = [o for o in self.outcomes if o["stage"] == s]
            info = self.stage_info.get(s, {})
            lines.append(f"| {s} {name} | {len(os_)} | {sum(o.get('ok') is True for o in os_)} | "
                         f"{sum(o.get('ok') is False for o in os_)} | {sum(bool(o.get('skipped')) for o in os_)} | "
                         f"{info.get('wall_s', 0):.0f} | {info.get('compiled', 0)} |")
        lines += ["", "## Measured cases", "",
                  "| case | impl | shape | dtype | time ms | floor | speed-up vs baselines | first call s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rec.records:
            if r["family"] == "autotune":
                continue
            t = r.get("median_s")
            ratios = " ".join(f"{k}: {v:.2f}x" for k, v in r["ratios"].items()) or "-"
            ff = r.get("floor_fraction")
            extra = r.get("extra", {})
            if r["family"] == "step" and extra.get("amortised_step_s"):
                ratios += f"; amortised {1e3 * extra['amortised_step_s']:.3f} ms"
            if r["family"] == "step" and extra.get("state_bytes_vs_adamw_fused"):
                ratios += f"; state {extra['state_bytes_vs_adamw_fused']:.2f}x AdamW"
            fc = extra.get("first_call_s")
            lines.append(f"| {r['case']} | {r['impl']} | {r['shape']} | {r['dtype']} | "
                         f"{'-' if t is None else f'{1e3 * t:.3f}'} | {'-' if ff is None else f'{100 * ff:.0f}%'} | "
                         f"{ratios} | {'-' if fc is None else f'{fc:.1f}'} |")
        lines += ["", "## Targets (benchmarks, not tests)", ""]
        lines += [f"    {line}" for line in rec.target_lines()]
        lines += amortised_target_lines(rec.records)
        lines += ["", "## Correctness failures", ""]
        fails = [o for o in self.outcomes if o.get("ok") is False]
        if not fails:
            lines.append("none")
        for o in fails:
            where = " ".join(str(o[k]) for k in ("kernel", "optimizer", "method", "impl", "dtype", "shape", "band", "d")
                             if o.get(k) is not None)
            lines.append(f"- stage {o['stage']} {o['item']} ({where}): {o.get('error')}")
        skipped = [o for o in self.outcomes if o.get("skipped")]
        lines += ["", f"## Skipped ({len(skipped)})", ""]
        lines += [f"- stage {o['stage']} {o['item']}: {o['skipped']}" for o in skipped] or ["none"]
        lines += ["", f"results: {_in_repo(report['jsonl'])}", f"plot: {_in_repo(report['png'])}", ""]
        return "\n".join(lines)


def amortised_target_lines(records: list[dict]) -> list[str]:
    """Every Kronecker-factored optimizer's amortised step <= 1.5x AdamW(fused)'s step on GPT-2 small."""
    base = next((r for r in records if r["family"] == "step" and r["method"] == "adamw"
                 and r["impl"] == "torch-fused" and r.get("median_s")), None)
    rows = [r for r in records if r["family"] == "step" and r["method"] in KRONECKER_STEP_CASES
            and r["impl"] == "kfopt" and r["extra"].get("amortised_step_s")]
    if not base or not rows:
        return ["    [----] every Kronecker-factored optimizer's amortised step <= 1.5x AdamW(fused): not measured"]
    out, met = [], 0
    for r in rows:
        ratio = r["extra"]["amortised_step_s"] / base["median_s"]
        ok = ratio <= 1.5
        met += ok
        out.append(f"        {r['method']}: {ratio:.2f}x AdamW(fused) (<= 1.50x) "
                   f"{'met' if ok else f'missed by {ratio - 1.5:.2f}x ({100 * (ratio - 1.5) / 1.5:.0f}% of the target)'}")
    head = f"    [{'MET ' if met == len(rows) else 'MISS'}] every Kronecker-factored optimizer's amortised step <= " \
           f"1.5x AdamW(fused): {met}/{len(rows)} cases"
    return [head] + out


def _raise_deadline(signum, frame):
    raise DeadlineReached("SIGTERM" if signum == signal.SIGTERM else "time is up")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="perf/gpu_check.sh", description=__doc__.split("\n")[0])
    parser.add_argument("outdir", nargs="?", help="folder for the summary, the log and the per-item outcomes")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (stages, compile counts, time "
                                                               "estimates) and exit; runs nothing")
    parser.add_argument("--cpu-smoke", action="store_true", help="run the plan on the CPU through Triton's "
                                                                 "interpreter (tiny sizes, nothing timed)")
    parser.add_argument("--only", default=None, help="run only the items whose name contains one of these "
                                                     "comma-separated words (stage 1 always runs)")
    parser.add_argument("--workers", type=int, default=None, help="stage 2's processes (default: CPU cores - 1, at "
                                                                  "most 16; 2 in the CPU smoke run)")
    args = parser.parse_args(argv)
    t0 = float(os.environ.get("KFOPT_GPU_CHECK_T0") or time.time())
    deadline_s = float(os.environ.get("KFOPT_GPU_CHECK_DEADLINE_S") or DEFAULT_DEADLINE_S)
    smoke = args.cpu_smoke
    if args.workers:
        workers = args.workers
    elif smoke:
        workers = 2
    elif args.dry_run:
        workers = TARGET_WORKERS  # the plan of a run on the target machine
    else:
        workers = max(1, min(TARGET_WORKERS, (os.cpu_count() or 2) - 1))
    items = build_plan(smoke)
    if args.only:
        words = [w.strip() for w in args.only.split(",") if w.strip()]
        items = [i for i in items if i.stage == 1 or any(w in i.name for w in words)]
    if args.dry_run:
        print_plan(items, workers, deadline_s)
        return 0

    # -- set-up before anything imports triton
    os.environ["KFOPT_PERF_MODE"] = "smoke" if smoke else "quick"
    os.environ.setdefault("KFOPT_AUTOTUNE", "default")
    triton_cache = None
    if not smoke:
        triton_cache = os.environ.get("KFOPT_GPU_CHECK_TRITON_CACHE") or tempfile.mkdtemp(prefix="kfopt-gpu-check-triton-")
        os.environ["TRITON_CACHE_DIR"] = triton_cache
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="kfopt-gpu-check-inductor-"))
    outdir = Path(args.outdir) if args.outdir else Path(tempfile.mkdtemp(prefix="kfopt-gpu-check-"))
    outdir.mkdir(parents=True, exist_ok=True)
    os.environ["KFOPT_PERF_AUTOTUNE_CACHE"] = str(outdir / "autotune-cache.json")

    import torch
    if not smoke and not torch.cuda.is_available():
        print("perf/gpu_check.sh: no CUDA GPU is visible (use --dry-run or --cpu-smoke on a CPU)", file=sys.stderr)
        return 2
    deadline = t0 + deadline_s
    print_plan(items, workers, deadline_s)
    driver = Driver(items, smoke, outdir, deadline, t0, workers, triton_cache)
    import kfopt.kernels
    driver.log(f"kfopt.kernels from {Path(kfopt.kernels.__file__).parent}, KFOPT_AUTOTUNE="
               f"{os.environ['KFOPT_AUTOTUNE']}, Triton cache {triton_cache or 'default'}, outdir {outdir}")
    signal.signal(signal.SIGTERM, _raise_deadline)
    signal.signal(signal.SIGALRM, _raise_deadline)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, deadline - FINALIZE_S / 3 - time.time()))
    try:
        driver.run()
    except DeadlineReached as err:
        driver.stopped = driver.stopped or f"deadline ({err})"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    report = driver.finish(argv)
    print(Path(report["summary"]).read_text())
    driver.log(f"summary: {report['summary']}; results: {report['jsonl']}; plot: {report['png']}")
    failed = sum(o.get("ok") is False for o in driver.outcomes)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
