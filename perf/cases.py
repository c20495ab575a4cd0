"""The case registry: what is benchmarked, with which baselines, and its bytes/flops model.

Adding a method = adding an entry to one of the lists below (``ELEMENTWISE``, ``FACTOR``,
``OPTIMIZERS``, ``AUTOTUNE_CASES``) and, if the issue names one, a ``Target``. The test modules
parametrize over these lists.

Conventions
* "bytes" is the traffic floor of the algorithm the kernel implements, from its docstring (each
  pass's compulsory reads and writes); "compulsory_bytes" (elementwise) is the one-pass lower bound
  (every input read once, every output written once), reported for comparison.
* "flops" counts 2 per multiply-add of the useful work (a symmetric product counts only one
  triangle; a structured product only the multiply-adds with the structure's own entries).
* floor = max(bytes / copy bandwidth, flops / matmul rate of the dtype), both measured in the same
  run (``perf.timing.measure_ceilings``). floor fraction = floor / measured time.
* ratio to a baseline = baseline time / case time (> 1: the kfopt kernel is faster); per-byte ratio
  to a shared baseline of another method (AdamW) = (case bytes / case time) / (baseline bytes /
  baseline time), i.e. achieved bandwidth over achieved bandwidth.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from perf.config import MODE  # noqa: I001  (first: sets TRITON_INTERPRET in the smoke run, before triton loads)

import kfopt
from kfopt.compare.registry import REGISTRY as COMPARE
from kfopt.kernels import (
    block_diagonal_matmul,
    eigen_precondition,
    eigen_precondition_reference,
    graft_step,
    lamb_step,
    lars_step,
    rank1_inverse_update,
    rank1_inverse_update_reference,
    sonew_step,
    symmetric_covariance,
    symmetric_covariance_reference,
    toeplitz_matmul,
    triangular_matmul,
)
from kfopt.kernels.graft import GRAFT
from kfopt.kernels.lamb import LAMB
from kfopt.kernels.lars import LARS
from kfopt.kernels.sonew import DROP_TOL as SONEW_DROP_TOL
from kfopt.kernels.sonew import SONEW
from kfopt.kernels.triangular import unpack_lower
from kfopt.registry import REGISTRY
from perf import baselines
from perf.models import GPT2_SMALL, GPTConfig, Mix, scaled_mix


@contextlib.contextmanager
def torch_backend():
    """Route kfopt kernel calls to their PyTorch references (``KFOPT_BACKEND=torch``)."""
    old = os.environ.get("KFOPT_BACKEND")
    os.environ["KFOPT_BACKEND"] = "torch"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("KFOPT_BACKEND", None)
        else:
            os.environ["KFOPT_BACKEND"] = old


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def size_of(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ============================================================================ element-wise steps
# The parameter sets: realistic mixes (perf.models) scaled to the totals of the issue.

ELEMENTWISE_SIZES = {
    "full": [(mix, int(total), dtype) for mix in ("gpt2-small", "bert-large") for total in (1e6, 1e7, 1e8)
             for dtype in (torch.float32, torch.bfloat16)],
    "quick": [("gpt2-small", int(1e7), torch.float32), ("gpt2-small", int(1e7), torch.bfloat16)],
    # the embeddings and the first tensors of layer 1 (6 tensors): the interpreter runs a program per chunk
    "smoke": [("gpt2-small", 3000, torch.float32), ("bert-large", 3000, torch.bfloat16)],
}
SMOKE_TENSORS = 6


def elementwise_mix(name: str, total: int, max_tensors: int | None = None) -> Mix:
    if MODE != "smoke":
        return scaled_mix(name, total)
    return scaled_mix(name, total, n_layer=1, max_tensors=max_tensors or SMOKE_TENSORS)


class ParamSet:
    """Parameters and gradients of a mix: params ~ N(0, 0.02^2), grads with a global norm of ~2 (so
    LAMB's default clipping at 1.0 is active at every size). Deterministic in ``seed``."""

    def __init__(self, mix: Mix, dtype: torch.dtype, device: torch.device, seed: int = 0):
        self.mix, self.dtype, self.device, self.seed = mix, dtype, device, seed
        gen = torch.Generator(device=device).manual_seed(seed)
        self.params = [(torch.randn(s, generator=gen, device=device) * 0.02).to(dtype) for s in mix.shapes]
        self.grads = [torch.empty(s, device=device, dtype=dtype) for s in mix.shapes]
        self.refresh_grads(0)

    def refresh_grads(self, k: int) -> None:
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 1000 + k + 1)
        scale = 2.0 / math.sqrt(self.mix.total)
        for g in self.grads:
            g.copy_(torch.randn(g.shape, generator=gen, device=self.device) * scale)

    def clone(self) -> "ParamSet":
        other = object.__new__(ParamSet)
        other.mix, other.dtype, other.device, other.seed = self.mix, self.dtype, self.device, self.seed
        other.params = [p.clone() for p in self.params]
        other.grads = [g.clone() for g in self.grads]
        return other


# Hyperparameters of every element-wise case (lr large enough that a bf16 step is visible).
LR = 1e-2
LAMB_HP = dict(lr=LR, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, max_grad_norm=1.0)
LARS_HP = dict(lr=1.0, momentum=0.9, weight_decay=1e-4, eta=0.001)
SONEW_HP = dict(lr=LR, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, graft="adam", graft_eps=1e-8)
ADAMW_HP = dict(lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
# Adam grafting as K-FAC's graft="adam" takes it (its momentum 0.9 on the direction), AdamW's settings
GRAFT_HP = dict(lr=LR, beta1=0.9, beta2=0.999, graft_eps=1e-8, weight_decay=0.01, momentum=0.9)


class LambRunner:
    """kfopt's ``lamb_step`` (``backend="torch"``: its PyTorch reference through the same call)."""

    def __init__(self, ps: ParamSet, backend: str | None = None):
        self.ps, self.backend = ps, backend
        self.state = {"exp_avg": [torch.zeros_like(p, dtype=torch.float32) for p in ps.params],
                      "exp_avg_sq": [torch.zeros_like(p, dtype=torch.float32) for p in ps.params]}
        self.steps = [torch.zeros((), device=ps.device) for _ in ps.params]

    def step(self):
        with torch_backend() if self.backend == "torch" else contextlib.nullcontext():
            lamb_step(self.ps.params, self.ps.grads, self.state["exp_avg"], self.state["exp_avg_sq"],
                           self.steps, adapt=True, **LAMB_HP)


class LambForeachRunner:
    """BASELINE ``perf.baselines.lamb_foreach_update`` with the global clip coefficient."""

    def __init__(self, ps: ParamSet):
        self.ps, self.t = ps, 0
        self.state = {"exp_avg": [torch.zeros_like(p, dtype=torch.float32) for p in ps.params],
                      "exp_avg_sq": [torch.zeros_like(p, dtype=torch.float32) for p in ps.params]}

    def step(self):
        self.t += 1
        hp = dict(LAMB_HP)
        grads32 = baselines.as_fp32(self.ps.grads)
        _, coef = baselines.clip_coefficient(grads32, hp.pop("max_grad_norm"))
        baselines.lamb_foreach_update(self.ps.params, grads32, self.state["exp_avg"], self.state["exp_avg_sq"],
                                      step=self.t, adapt=True, clip_coef=coef, **hp)


class LarsRunner:
    def __init__(self, ps: ParamSet, backend: str | None = None):
        self.ps, self.backend = ps, backend
        self.state = {"momentum_buffer": [torch.zeros_like(p, dtype=torch.float32) for p in ps.params]}

    def step(self):
        with torch_backend() if self.backend == "torch" else contextlib.nullcontext():
            lars_step(self.ps.params, self.ps.grads, self.state["momentum_buffer"], adapt=True,
                           max_grad_norm=None, **LARS_HP)


class LarsForeachRunner:
    def __init__(self, ps: ParamSet):
        self.ps = ps
        self.state = {"momentum_buffer": [torch.zeros_like(p, dtype=torch.float32) for p in ps.params]}

    def step(self):
        baselines.lars_foreach_update(self.ps.params, self.ps.grads, self.state["momentum_buffer"], adapt=True,
                                      clip_coef=None, **LARS_HP)


class GraftRunner:
    """kfopt's ``graft_step`` (``backend="torch"``: its PyTorch reference through the same call), every
    tensor preconditioned with a momentum buffer: the step of K-FAC's ``graft="adam"`` after its
    preconditioner. The preconditioned gradients are fixed random tensors of the gradients' scale
    (seeded: the same in every runner of a ParamSet)."""

    def __init__(self, ps: ParamSet, backend: str | None = None):
        self.ps, self.backend = ps, backend
        gen = torch.Generator(device=ps.device).manual_seed(7)
        scale = 2.0 / math.sqrt(ps.mix.total)
        self.directions = [(torch.randn(p.shape, generator=gen, device=ps.device) * scale).to(ps.dtype)
                           for p in ps.params]
        self.state = {key: [torch.zeros_like(p, dtype=torch.float32) for p in ps.params]
                      for key in ("exp_avg", "exp_avg_sq", "momentum_buffer")}
        self.steps = [torch.zeros((), device=ps.device) for _ in ps.params]

    def step(self):
        with torch_backend() if self.backend == "torch" else contextlib.nullcontext():
            graft_step(self.ps.params, self.ps.grads, self.directions, self.state["exp_avg"],
                       self.state["exp_avg_sq"], self.state["momentum_buffer"], self.steps, graft="adam",
                       **GRAFT_HP)


class GraftForeachRunner(GraftRunner):
    """BASELINE ``perf.baselines.graft_foreach_update`` from GraftRunner's state and directions."""

    def __init__(self, ps: ParamSet):
        super().__init__(ps, backend="torch")
        self.t = 0

    def step(self):
        self.t += 1
        baselines.graft_foreach_update(self.ps.params, self.ps.grads, self.directions, self.state["exp_avg"],
                                       self.state["exp_avg_sq"], self.state["momentum_buffer"], step=self.t,
                                       **GRAFT_HP)


def sonew_tensor_band(shape, band: int) -> int:
    """The band kfopt.SONew gives a tensor: 0 (plain Adam) for <= 1 dimension, else min(band, n - 1)."""
    n = math.prod(shape)
    return 0 if len(shape) <= 1 else min(band, n - 1)


class SonewRunner:
    """kfopt's ``sonew_step``, starting from a mid-training state: the statistics of ``WARM_STEPS``
    random gradients (so that every (band + 1)-row block of S is well conditioned and the checks
    compare the banded inverse, not the all-edges-dropped first steps)."""

    WARM_STEPS = 12

    def __init__(self, ps: ParamSet, band: int, backend: str | None = None):
        self.ps, self.backend = ps, backend
        gen = torch.Generator(device=ps.device).manual_seed(ps.seed + 7)
        k, b1, b2 = self.WARM_STEPS, SONEW_HP["beta1"], SONEW_HP["beta2"]
        scale = 2.0 / math.sqrt(ps.mix.total)
        self.state = {"exp_avg": [], "diag": [], "offdiag": []}
        for p in ps.params:
            n, b = p.numel(), sonew_tensor_band(p.shape, band)
            m, v = torch.zeros(n, device=ps.device), torch.zeros(n, device=ps.device)
            off = torch.zeros((b, n), device=ps.device)
            for _ in range(k):
                g = torch.randn(n, generator=gen, device=ps.device) * scale
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                for j in range(1, b + 1):
                    off[j - 1, :-j].mul_(b2).addcmul_(g[:-j], g[j:], value=1 - b2)
            self.state["exp_avg"].append(m.view(p.shape))
            self.state["diag"].append(v)
            self.state["offdiag"].append(off)
        self.steps = [torch.full((), float(k), device=ps.device) for _ in ps.params]
        self.precondition = [p.dim() > 1 for p in ps.params]

    def step(self):
        with torch_backend() if self.backend == "torch" else contextlib.nullcontext():
            sonew_step(self.ps.params, self.ps.grads, self.state["exp_avg"], self.state["diag"],
                            self.state["offdiag"], self.steps, precondition=self.precondition, **SONEW_HP)


class SonewForeachRunner(SonewRunner):
    """BASELINE ``perf.baselines.sonew_tridiagonal_foreach_update`` (band 1) from SonewRunner's state."""

    def __init__(self, ps: ParamSet):
        super().__init__(ps, band=1, backend="torch")
        self.t = self.WARM_STEPS

    def step(self):
        self.t += 1
        hp = {k: v for k, v in SONEW_HP.items() if k != "graft"}
        baselines.sonew_tridiagonal_foreach_update(self.ps.params, self.ps.grads, self.state["exp_avg"],
                                                   self.state["diag"], self.state["offdiag"], step=self.t,
                                                   drop_tol=SONEW_DROP_TOL, **hp)


def compile_backend() -> str:
    """``torch.compile``'s backend for the compiled baselines: ``KFOPT_PERF_COMPILE_BACKEND``, default
    "inductor" (which generates Triton kernels on a GPU, C++ on the CPU)."""
    return os.environ.get("KFOPT_PERF_COMPILE_BACKEND") or "inductor"


def _lamb_compiled_step(params, grads, exp_avgs, exp_avg_sqs, t):
    t.add_(1)
    hp = dict(LAMB_HP)
    grads32 = baselines.as_fp32(grads)
    _, coef = baselines.clip_coefficient(grads32, hp.pop("max_grad_norm"))
    baselines.lamb_foreach_update(params, grads32, exp_avgs, exp_avg_sqs, step=t, adapt=True, clip_coef=coef, **hp)


class LambCompiledRunner(LambForeachRunner):
    """BASELINE: the same foreach LAMB step (global clip included) compiled by ``torch.compile``: what a
    user would reach for instead of hand-written kernels. The step count is a device tensor, so one graph
    serves every step; the compilation happens in the untimed first calls (``extra.first_call_s``)."""

    def __init__(self, ps: ParamSet):
        super().__init__(ps)
        self.t = torch.zeros((), device=ps.device)
        self.compiled = torch.compile(_lamb_compiled_step, backend=compile_backend())

    def step(self):
        self.compiled(self.ps.params, self.ps.grads, self.state["exp_avg"], self.state["exp_avg_sq"], self.t)


def _sonew_compiled_step(params, grads, exp_avgs, diags, offdiags, t):
    t.add_(1)
    hp = {k: v for k, v in SONEW_HP.items() if k != "graft"}
    baselines.sonew_tridiagonal_foreach_update(params, grads, exp_avgs, diags, offdiags, step=t,
                                               drop_tol=SONEW_DROP_TOL, **hp)


class SonewCompiledRunner(SonewForeachRunner):
    """BASELINE: the foreach tridiagonal SONew step (band 1) compiled by ``torch.compile``, from
    SonewRunner's state; the step count is a device tensor (one graph for every step)."""

    def __init__(self, ps: ParamSet):
        super().__init__(ps)
        self.t = torch.full((), float(self.WARM_STEPS), device=ps.device)
        self.compiled = torch.compile(_sonew_compiled_step, backend=compile_backend())

    def step(self):
        self.compiled(self.ps.params, self.ps.grads, self.state["exp_avg"], self.state["diag"],
                      self.state["offdiag"], self.t)


class AdamWRunner:
    """``torch.optim.AdamW`` (fused=True, or foreach=True as its correctness reference). State in the
    parameters' dtype, as torch keeps it."""

    def __init__(self, ps: ParamSet, fused: bool):
        self.ps = ps
        for p, g in zip(ps.params, ps.grads):
            p.grad = g
        kind = dict(fused=True) if fused else dict(foreach=True)
        self.opt = torch.optim.AdamW(ps.params, **ADAMW_HP, **kind)

    @property
    def state(self):
        return {k: [self.opt.state[p][k] for p in self.ps.params] for k in ("exp_avg", "exp_avg_sq")}

    def step(self):
        self.opt.step()


@dataclass
class Impl:
    """One implementation of a method. ``role``: "kernel" (kfopt) or "baseline"; ``bench=False``: used
    only as a correctness reference."""

    name: str
    role: str
    make: Callable[[ParamSet], object]
    bench: bool = True
    smoke_sizes: int | None = None  # in the smoke run: only the method's first N sizes (None: all)


@dataclass
class ElementwiseMethod:
    """An element-wise optimizer step on a list of tensors.

    ``bytes(shapes, dtype)``: the traffic floor of one step (see the module docstring);
    ``reference``: the impl every other impl's result is checked against, after ``check_steps``
    steps with fresh gradients each step; ``tol``: relative error allowed per storage dtype on the
    parameter update (``delta``) and on the state. For bf16/fp16 parameters the parameters must
    also agree to 1 unit in the last place (rounding of the same fp32 update may differ by one ulp;
    Triton's interpreter even truncates fp32 -> bf16 stores instead of rounding to nearest, so there
    only the ulp check and the state are checked).
    """

    name: str
    bytes: Callable[[tuple, torch.dtype], float]
    compulsory_bytes: Callable[[tuple, torch.dtype], float]
    impls: list[Impl]
    reference: str
    check_steps: int = 2
    tol: dict = field(default_factory=lambda: {"fp32": (1e-4, 1e-4), "bf16": (3e-2, 1e-4), "fp16": (3e-2, 1e-4)})
    shared_baseline: bool = False  # a baseline for every method of the family (AdamW)
    smoke_sizes: list | None = None  # replaces ELEMENTWISE_SIZES["smoke"] (interpreter cost)
    smoke_tensors: int | None = None

    def sizes(self, mode: str, impl: Impl | None = None) -> list:
        """The sizes of the mode (of ``impl``: its ``smoke_sizes`` first ones in the smoke run)."""
        sizes = self.smoke_sizes if mode == "smoke" and self.smoke_sizes is not None else ELEMENTWISE_SIZES[mode]
        if mode == "smoke" and impl is not None and impl.smoke_sizes is not None:
            sizes = sizes[:impl.smoke_sizes]
        return sizes

    def impl(self, name: str) -> Impl:
        return next(i for i in self.impls if i.name == name)


def _n(shapes) -> int:
    return sum(math.prod(s) for s in shapes)


def lamb_bytes(shapes, dtype):
    """The traffic model declared beside the LAMB launcher (``kernels.lamb.lamb_traffic``)."""
    return LAMB.traffic(shapes, dtype).bytes


def lars_bytes(shapes, dtype):
    """The traffic model declared beside the LARS launcher (``kernels.lars.lars_traffic``)."""
    return LARS.traffic(shapes, dtype).bytes


def sonew_bytes(band: int):
    def model(shapes, dtype):
        """The traffic model declared beside the SONew launcher (``kernels.sonew.sonew_traffic``), each
        tensor with its own band (0 for vectors)."""
        return SONEW.traffic(shapes, dtype, [sonew_tensor_band(sh, band) for sh in shapes]).bytes
    return model


def graft_bytes(shapes, dtype):
    """The traffic model declared beside the grafting launcher (``kernels.graft.graft_traffic``), every
    tensor preconditioned with a momentum buffer: 60 B per fp32 parameter."""
    return GRAFT.traffic(shapes, dtype, [True] * len(shapes)).bytes


def graft_compulsory_bytes(shapes, dtype):
    """One pass: w, g, P read, w written (4 s) + m, v, buf read and written (24)."""
    return _n(shapes) * (4 * size_of(dtype) + 24)


def adamw_fused_bytes(shapes, dtype):
    """torch AdamW(fused): one pass, p, g, m, v read and p, m, v written, state in the param dtype:
    2 s_p + s_g + 4 s_p (28 fp32, 14 bf16)."""
    return _n(shapes) * 7 * size_of(dtype)


def _one_pass(state_floats: Callable[[tuple], int]):
    def model(shapes, dtype):
        """One pass: w, g read, w written (3 s) + fp32 state read and written (8 per state float)."""
        return sum(math.prod(sh) * (3 * size_of(dtype)) + 8 * state_floats(sh) for sh in shapes)
    return model


# torch.compile's inductor compiles C++ on the CPU (~1 min per case on two CI cores): the smoke run
# checks the compiled baselines on each method's first smoke size only.
COMPILED_SMOKE_SIZES = 1

ELEMENTWISE: list[ElementwiseMethod] = [
    ElementwiseMethod(
        "adamw", adamw_fused_bytes, lambda sh, dt: adamw_fused_bytes(sh, dt),
        [Impl("torch-fused", "baseline", lambda ps: AdamWRunner(ps, fused=True)),
         Impl("torch-foreach", "baseline", lambda ps: AdamWRunner(ps, fused=False), bench=False)],
        reference="torch-foreach", shared_baseline=True,
        # fp32 state 1e-4: on CUDA the fused kernel takes 1 - beta2 in fp32 (1 - fp32(0.999) is 1.29e-5
        # off 0.001), the foreach path in double; exp_avg_sq differed by 1.29e-5 relative on an H200
        tol={"fp32": (1e-4, 1e-4), "bf16": (3e-2, 2e-2), "fp16": (1e-2, 1e-2)}),
    ElementwiseMethod(
        "lamb", lamb_bytes, _one_pass(lambda sh: 2 * math.prod(sh)),
        [Impl("kfopt", "kernel", lambda ps: LambRunner(ps)),
         Impl("foreach", "baseline", LambForeachRunner),
         Impl("torch.compile", "baseline", LambCompiledRunner, smoke_sizes=COMPILED_SMOKE_SIZES),
         Impl("reference", "baseline", lambda ps: LambRunner(ps, backend="torch"))],
        reference="reference"),
    ElementwiseMethod(
        "lars", lars_bytes, _one_pass(lambda sh: math.prod(sh)),
        [Impl("kfopt", "kernel", lambda ps: LarsRunner(ps)),
         Impl("foreach", "baseline", LarsForeachRunner),
         Impl("reference", "baseline", lambda ps: LarsRunner(ps, backend="torch"))],
        reference="reference"),
] + [
    ElementwiseMethod(
        f"sonew-band{band}", sonew_bytes(band),
        _one_pass(lambda sh, band=band: math.prod(sh) * (2 + sonew_tensor_band(sh, band))),
        [Impl("kfopt", "kernel", lambda ps, band=band: SonewRunner(ps, band)),
         *([Impl("foreach", "baseline", SonewForeachRunner),
            Impl("torch.compile", "baseline", SonewCompiledRunner, smoke_sizes=COMPILED_SMOKE_SIZES)]
           if band == 1 else []),
         Impl("reference", "baseline", lambda ps, band=band: SonewRunner(ps, band, backend="torch"))],
        reference="reference",
        # band 4 costs ~1 s per tensor per step in the interpreter: its smoke case is 3 tensors, fp32
        smoke_sizes=[("gpt2-small", 3000, torch.float32)] if band > 1 else None,
        smoke_tensors=3 if band > 1 else None)
    for band in (1, 4)
]
ELEMENTWISE.append(ElementwiseMethod(
    "graft", graft_bytes, graft_compulsory_bytes,
    [Impl("kfopt", "kernel", lambda ps: GraftRunner(ps)),
     Impl("foreach", "baseline", GraftForeachRunner),
     Impl("reference", "baseline", lambda ps: GraftRunner(ps, backend="torch"))],
    reference="reference"))
# SONew's foreach baseline covers band 1 (closed-form tridiagonal inverse); band 4's per-row 4 x 4
# eliminations have no foreach form worth writing: its baselines are AdamW(fused) and the reference.


# ============================================================================ factor kernels


@dataclass
class FactorImpl:
    """``run(inputs)`` computes the result (may work in place); ``result(out, inputs, params)``
    turns it into what is compared with the float64 truth (default: ``out`` itself)."""

    name: str
    role: str
    run: Callable[[dict], object]
    result: Callable | None = None
    bytes: Callable[[dict], float] | None = None   # default: the method's
    flops: Callable[[dict], float] | None = None


@dataclass
class FactorMethod:
    """A factor kernel: ``grid[mode]`` lists shape params (dicts with at least "dtype"), ``make_inputs``
    builds random inputs (``reset`` restores inputs that impls overwrite, before every timed round),
    ``truth`` the float64 answer, ``tol(params, impl)`` the relative error allowed."""

    name: str
    grid: dict
    make_inputs: Callable[[dict, torch.device], dict]
    truth: Callable[[dict, dict], object]
    tol: Callable[[dict, str], float]
    bytes: Callable[[dict], float]
    flops: Callable[[dict], float]
    impls: list[FactorImpl]
    label: Callable[[dict], str]
    reset: Callable[[dict], None] | None = None


def _grid(**axes):
    keys = list(axes)
    out = [{}]
    for k in keys:
        out = [dict(o, **{k: v}) for o in out for v in axes[k]]
    return out


HALF_AND_FULL = (torch.bfloat16, torch.float16, torch.float32)


def _half_tol(dtype, fp32_tol):
    return fp32_tol if dtype == torch.float32 else 1e-2


# --- symmetric covariance (K-FAC, KAISA): x^T x / rows, upper tiles only, fp32 out

def _cov_inputs(p, device):
    gen = torch.Generator(device=device).manual_seed(1)
    return {"x": torch.randn(p["rows"], p["d"], generator=gen, device=device).to(p["dtype"])}


def _cov_truth(inputs, p):
    x = inputs["x"].double()
    return x.T @ x / x.shape[0]


SYMMETRIC_COVARIANCE = FactorMethod(
    "symmetric_covariance",
    grid={"full": _grid(d=(256, 1024, 4096), rows=(4096, 16384), dtype=HALF_AND_FULL),
          "quick": _grid(d=(1024,), rows=(4096,), dtype=(torch.bfloat16, torch.float32)),
          "smoke": _grid(d=(70,), rows=(50,), dtype=HALF_AND_FULL)},
    make_inputs=_cov_inputs,
    truth=_cov_truth,
    tol=lambda p, impl: _half_tol(p["dtype"], 1e-4) if impl == "torch.matmul" else 1e-4,
    # x read once, the fp32 result written once
    bytes=lambda p: p["rows"] * p["d"] * size_of(p["dtype"]) + 4 * p["d"] ** 2,
    # one triangle (diagonal included) of x^T x
    flops=lambda p: p["rows"] * p["d"] * (p["d"] + 1),
    impls=[
        FactorImpl("kfopt", "kernel", lambda i: symmetric_covariance(i["x"])),
        FactorImpl("torch.matmul", "baseline", lambda i: baselines.covariance_matmul(i["x"]),
                   result=lambda out, i, p: out.double() / p["rows"],
                   bytes=lambda p: (p["rows"] * p["d"] + p["d"] ** 2) * size_of(p["dtype"]),
                   flops=lambda p: 2 * p["rows"] * p["d"] ** 2),
        FactorImpl("reference", "baseline", lambda i: symmetric_covariance_reference(i["x"])),
    ],
    label=lambda p: f"d={p['d']},rows={p['rows']}",
)


# --- eigen-basis preconditioning (K-FAC): QG [(QG^T V QA) / (dG dA^T + damping)] QA^T, all layers

GPT2_BLOCK_LAYERS = [(2304, 769), (768, 769), (3072, 769), (768, 3073)]  # (d_out, d_in + 1) of one block


def _orthogonal(n, gen, device):
    return torch.linalg.qr(torch.randn(n, n, generator=gen, device=device))[0]


def _eigen_inputs(p, device):
    gen = torch.Generator(device=device).manual_seed(2)
    dt = p["dtype"]
    layers = p["layers"]
    return {
        "grads": [torch.randn(m, n, generator=gen, device=device).to(dt) for m, n in layers],
        "qa": [_orthogonal(n, gen, device).to(dt) for _, n in layers],
        "da": [torch.rand(n, generator=gen, device=device) ** 2 for _, n in layers],
        "qg": [_orthogonal(m, gen, device).to(dt) for m, _ in layers],
        "dg": [torch.rand(m, generator=gen, device=device) ** 2 for m, _ in layers],
        "damping": 1e-3,
    }


def _eigen_call(fn):
    return lambda i: fn(i["grads"], i["qa"], i["da"], i["qg"], i["dg"], i["damping"])


def _eigen_truth(i, p):
    d64 = lambda ts: [t.double() for t in ts]  # noqa: E731
    return eigen_precondition_reference(d64(i["grads"]), d64(i["qa"]), d64(i["da"]), d64(i["qg"]), d64(i["dg"]),
                                        i["damping"])


EIGEN_PRECONDITION = FactorMethod(
    "eigen_precondition",
    grid={"full": _grid(layers=[[(d, d)] for d in (256, 1024, 4096)] + [GPT2_BLOCK_LAYERS], dtype=HALF_AND_FULL),
          "quick": _grid(layers=[[(1024, 1024)]], dtype=(torch.bfloat16, torch.float32)),
          "smoke": _grid(layers=[[(24, 20), (9, 33)]], dtype=HALF_AND_FULL)},
    make_inputs=_eigen_inputs,
    truth=_eigen_truth,
    tol=lambda p, impl: _half_tol(p["dtype"], 1e-4),
    # V, QA, QG, dA, dG read once, P written once (the fp32 intermediates are not compulsory)
    bytes=lambda p: sum((2 * m * n + m * m + n * n) * size_of(p["dtype"]) + 4 * (m + n) for m, n in p["layers"]),
    flops=lambda p: sum(4 * m * n * (m + n) for m, n in p["layers"]),
    impls=[
        FactorImpl("kfopt", "kernel", _eigen_call(eigen_precondition)),
        FactorImpl("reference", "baseline", _eigen_call(eigen_precondition_reference)),
    ],
    label=lambda p: ("gpt2-block" if p["layers"] == GPT2_BLOCK_LAYERS else
                     "+".join(f"{m}x{n}" for m, n in p["layers"])),
)


# --- rank-1 inverse update (MKOR): J <- (J - c (Jv)(Jv)^T / (1 + c v^T J v)) / gamma, many layers
# kfopt stores J = scales[i] * F_i (kernels/rank1_inverse.py): F starts as J (scale 1) and is
# renormalised in place (max|F| <= 1), the scale absorbing the rest; the check compares
# scales[i] * F_i with the float64 update of J.

RANK1_GAMMA = 0.95
GPT2_BLOCK_FACTORS = [769, 2304, 769, 768, 769, 3072, 3073, 768]  # sides of the 8 factors of one block


def _rank1_inputs(p, device):
    gen = torch.Generator(device=device).manual_seed(3)
    js, vs = [], []
    for d in p["sides"]:
        a = torch.randn(d, d, generator=gen, device=device) / math.sqrt(d)
        js.append((torch.eye(d, device=device) + 0.1 * (a + a.T)).to(p["dtype"]))  # symmetric, eigenvalues ~[0.7, 1.3]
        vs.append((torch.randn(d, generator=gen, device=device) / math.sqrt(d)).to(p["dtype"]))
    return {"J": js, "v": vs, "scales": torch.ones(len(js), dtype=torch.float32, device=device),
            "J0": [j.clone() for j in js]}


def _rank1_reset(i):
    """Restore the factors and (kfopt) their scales: every timed round updates the same J."""
    for j, j0 in zip(i["J"], i["J0"]):
        j.copy_(j0)
    i["scales"].fill_(1.0)


def _rank1_kfopt(update):
    return lambda i: update(i["J"], i["v"], i["scales"], decay=RANK1_GAMMA)


def _rank1_scaled(out, i, p):
    """J_i = scales[i] * F_i (kfopt's storage)."""
    return [s * f.double() for s, f in zip(i["scales"].double().unbind(), i["J"])]


RANK1_INVERSE_UPDATE = FactorMethod(
    "rank1_inverse_update",
    grid={"full": _grid(sides=[[256], [1024], [4096], GPT2_BLOCK_FACTORS * 12], dtype=HALF_AND_FULL),
          "quick": _grid(sides=[[1024]], dtype=(torch.float32,)),
          "smoke": _grid(sides=[[33, 8]], dtype=HALF_AND_FULL)},
    make_inputs=_rank1_inputs,
    truth=lambda i, p: [baselines.rank1_inverse_update_exact(j, v, RANK1_GAMMA) for j, v in zip(i["J0"], i["v"])],
    tol=lambda p, impl: _half_tol(p["dtype"], 1e-5),
    # kernels/rank1_inverse.py: F read twice (mat-vec pass, update pass), written once: 3 d^2 s
    # compulsory, plus v read (d s); the per-factor scale and the O(d) scratch vectors are not counted
    bytes=lambda p: sum((3 * d * d + d) * size_of(p["dtype"]) for d in p["sides"]),
    # useful work: the mat-vec (2 d^2) and the rank-1 update (2 d^2)
    flops=lambda p: sum(4 * d * d for d in p["sides"]),
    impls=[
        FactorImpl("kfopt", "kernel", _rank1_kfopt(rank1_inverse_update), result=_rank1_scaled),
        FactorImpl("torch-two-op", "baseline",
                   lambda i: baselines.rank1_inverse_update_torch(i["J"], i["v"], RANK1_GAMMA),
                   result=lambda out, i, p: i["J"]),
        # kfopt's own PyTorch twin: the same stabiliser and scale handling, one factor at a time
        FactorImpl("reference", "baseline", _rank1_kfopt(rank1_inverse_update_reference), result=_rank1_scaled),
    ],
    label=lambda p: "gpt2-12-blocks" if len(p["sides"]) > 8 else "+".join(map(str, p["sides"])),
    reset=_rank1_reset,
)


# --- structured factor products (SINGD): op(S) x for a structured d x d S and a dense d x rows x,
# against the dense torch.matmul of the same logical S. The kfopt kernels return fp32 unless given
# ``out``; here ``out`` is preallocated in the input dtype, the dtype torch.matmul returns, so both
# sides read and write the same tensors (SINGD itself asks for fp32 results, which writes 4 d rows
# bytes instead of s d rows).

STRUCTURED_GRID = {"full": _grid(d=(256, 1024, 4096), rows=(4096, 16384), dtype=HALF_AND_FULL),
                   "quick": _grid(d=(1024,), rows=(4096,), dtype=(torch.bfloat16,)),
                   "smoke": _grid(d=(37,), rows=(19,), dtype=HALF_AND_FULL)}
BLOCK = {"full": 32, "quick": 32, "smoke": 9}  # side of the diagonal blocks (d is rounded down to a multiple)


def _toeplitz_dense(coeffs):
    """The lower-triangular Toeplitz matrix L[i, j] = c[i - j] (i >= j)."""
    idx = torch.arange(coeffs.shape[0], device=coeffs.device)
    lag = idx[:, None] - idx[None, :]
    return torch.where(lag >= 0, coeffs[lag.clamp(min=0)], torch.zeros((), dtype=coeffs.dtype, device=coeffs.device))


@dataclass(frozen=True)
class StructuredProduct:
    """One SINGD structure and its kernel ``call(factor, x, out=)``: ``entries(p)`` the number of its
    free entries (what the kernel reads), ``macs(p)`` the useful multiply-adds per column of x (one per
    structural non-zero of S); ``make(p, gen, device)`` random free entries, ``dense(factor)`` the same
    matrix as a d x d tensor; ``params(p, mode)`` adjusts the shape params of the mode's grid."""

    kernel: str
    entries: Callable[[dict], int]
    macs: Callable[[dict], int]
    make: Callable[[dict, torch.Generator, torch.device], torch.Tensor]
    dense: Callable[[torch.Tensor], torch.Tensor]
    call: Callable[..., torch.Tensor]
    params: Callable[[dict, str], dict] = lambda p, mode: {}


def _triangle(p):
    return p["d"] * (p["d"] + 1) // 2


def _block_grid(p, mode):
    """The block side, and d rounded down to whole blocks."""
    b = BLOCK[mode]
    return {"d": p["d"] - p["d"] % b, "block": b}


STRUCTURES = [
    StructuredProduct(
        "block_diagonal_matmul", entries=lambda p: p["d"] * p["block"], macs=lambda p: p["d"] * p["block"],
        make=lambda p, gen, dev: torch.randn(p["d"] // p["block"], p["block"], p["block"], generator=gen,
                                             device=dev) / math.sqrt(p["block"]),
        dense=lambda blocks: torch.block_diag(*blocks), call=block_diagonal_matmul, params=_block_grid),
    StructuredProduct(
        "triangular_matmul", entries=_triangle, macs=_triangle,
        make=lambda p, gen, dev: torch.randn(_triangle(p), generator=gen, device=dev) / math.sqrt(p["d"]),
        dense=unpack_lower, call=triangular_matmul),
    StructuredProduct(
        "toeplitz_matmul", entries=lambda p: p["d"], macs=_triangle,
        make=lambda p, gen, dev: torch.randn(p["d"], generator=gen, device=dev) / math.sqrt(p["d"]),
        dense=_toeplitz_dense, call=toeplitz_matmul),
]


def _structured_method(st: StructuredProduct) -> FactorMethod:
    def inputs(p, device):
        gen = torch.Generator(device=device).manual_seed(4)
        factor = st.make(p, gen, device).to(p["dtype"])
        x = torch.randn(p["d"], p["rows"], generator=gen, device=device).to(p["dtype"])
        return {"factor": factor, "dense": st.dense(factor), "x": x, "out": torch.empty_like(x)}

    return FactorMethod(
        st.kernel,
        grid={mode: [dict(p, **st.params(p, mode)) for p in grid] for mode, grid in STRUCTURED_GRID.items()},
        make_inputs=inputs,
        truth=lambda i, p: i["dense"].double() @ i["x"].double(),
        tol=lambda p, impl: _half_tol(p["dtype"], 1e-4),
        # the structure's own entries and x read once, the result written once (input dtype)
        bytes=lambda p: (st.entries(p) + 2 * p["d"] * p["rows"]) * size_of(p["dtype"]),
        flops=lambda p: 2 * st.macs(p) * p["rows"],
        impls=[
            FactorImpl("kfopt", "kernel", lambda i: st.call(i["factor"], i["x"], out=i["out"])),
            FactorImpl("dense-matmul", "baseline", lambda i: baselines.structured_dense_matmul(i["dense"], i["x"]),
                       bytes=lambda p: (p["d"] ** 2 + 2 * p["d"] * p["rows"]) * size_of(p["dtype"]),
                       flops=lambda p: 2 * p["d"] ** 2 * p["rows"]),
        ],
        label=lambda p: (f"b={p['block']}," if "block" in p else "") + f"d={p['d']},rows={p['rows']}",
    )


STRUCTURED_PRODUCTS = [_structured_method(st) for st in STRUCTURES]

FACTOR: list[FactorMethod] = [SYMMETRIC_COVARIANCE, EIGEN_PRECONDITION, RANK1_INVERSE_UPDATE, *STRUCTURED_PRODUCTS]


# ============================================================================ whole optimizer steps

STEP_MODEL = {
    "full": (GPT2_SMALL, 8, 1024),
    "quick": (GPT2_SMALL, 8, 1024),
    "smoke": (GPTConfig(n_layer=1, n_head=2, d=32, vocab=64, ctx=16), 2, 16),
}  # (config, batch, sequence length); bf16 autocast, fp32 parameters


@dataclass
class OptimizerCase:
    """A whole ``optimizer.step()`` on the GPT-2-shaped model's gradients (perf/test_optimizer_steps.py).

    ``build(model)`` makes the optimizer; ``backend="torch"`` runs it on kfopt's PyTorch references
    (for a hook-based optimizer also the forward/backward its hooks see); ``bytes(model)``: one step's
    traffic floor, or None where the step is not bandwidth-bound (the Kronecker-factored optimizers:
    eigendecompositions, GEMMs); ``reference``: the impl of the same method it is checked against;
    ``tol``: the relative error allowed on the parameter update (test_optimizer_steps.py says why).

    ``hooks``: the optimizer is built around the model and captures statistics in the forward/backward
    (K-FAC, MKOR, SINGD). It is built before the forward/backward, and every timed step is preceded,
    untimed, by a fresh forward/backward (the step consumes and clears what the hooks captured).
    ``build`` sets every update interval to 1, so that each timed step updates the factors and the
    inverse/eigen data: the worst-case step. ``build_default`` is the same optimizer at kfopt's default
    intervals, whose amortised step (mean over ``cycle`` consecutive steps of a training loop) is
    recorded as well.
    """

    method: str
    impl: str
    role: str
    build: Callable[[torch.nn.Module], torch.optim.Optimizer]
    bytes: Callable[[torch.nn.Module], float] | None
    reference: str | None = None
    backend: str | None = None
    hooks: bool = False
    build_default: Callable[[torch.nn.Module], torch.optim.Optimizer] | None = None
    cycle: int = 1
    tol: float = 1e-4


def _param_shapes(model):
    return [(tuple(p.shape), p.dtype) for p in model.parameters()]


def _per_param_bytes(per_param: Callable[[tuple, torch.dtype], float]):
    return lambda model: sum(per_param([shape], dtype) for shape, dtype in _param_shapes(model))


def _groups(model, wd):
    return kfopt.param_groups(model, weight_decay=wd)


def _lamb(model):
    return REGISTRY["lamb"].build(model, lr=1e-3)


def _lars(model):
    return REGISTRY["lars"].build(model, lr=0.1)


def _foreach_lars(model):
    """The foreach baseline with the registry's LARS hyperparameters (``_lars``)."""
    entry = REGISTRY["lars"]
    return baselines.ForeachLARS(_groups(model, entry.default("weight_decay")), lr=0.1,
                                 always_adapt=entry.default("always_adapt"))


def _sonew(band: int):
    return lambda model: REGISTRY["sonew" if band == 1 else f"sonew{band}"].build(model, lr=1e-3)


def kronecker_factored(name: str, **hyperparameters):
    """``build(every_step)``: the optimizer ``kfopt.registry`` entry ``name`` with the learning rate and
    hyperparameters ``kfopt compare`` uses on its chars transformer (perf.models.GPT averages its loss
    over every token, as that task does), updated by ``hyperparameters``; its update intervals set to 1
    (``every_step``) or to their defaults (the registry's ``intervals``)."""
    entry, spec = REGISTRY[name], COMPARE[name]

    def build(every_step: bool):
        intervals = {key: 1 if every_step else default for key, default in entry.intervals.items()}
        hyper = {**spec.task_defaults.get("chars", {}), **hyperparameters, **intervals}
        return lambda m: spec.build(m, spec.lr["chars"], **hyper)
    return build


KRONECKER_FACTORED = [  # (method, build(every_step), steps in one period of the default intervals)
    ("kfac", kronecker_factored("kfac"), REGISTRY["kfac"].period),
    ("mkor", kronecker_factored("mkor"), REGISTRY["mkor"].period),
    # MKOR-H before its switch (its step() observes no loss here); after it, its step is its base LAMB's
    ("mkorh", kronecker_factored("mkorh"), REGISTRY["mkorh"].period),
    ("singd-dense", kronecker_factored("singd"), REGISTRY["singd"].period),
    ("singd-block32", kronecker_factored("singd", structures=("block32diagonal", "block32diagonal")),
     REGISTRY["singd"].period),
    ("singd-toeplitz", kronecker_factored("singd-toeplitz"), REGISTRY["singd-toeplitz"].period),
]


OPTIMIZERS: list[OptimizerCase] = [
    OptimizerCase("adamw", "torch-fused", "baseline",
                  lambda m: torch.optim.AdamW(_groups(m, 0.01), lr=1e-3, fused=True),
                  _per_param_bytes(adamw_fused_bytes), reference="torch-foreach"),
    OptimizerCase("adamw", "torch-foreach", "baseline",
                  lambda m: torch.optim.AdamW(_groups(m, 0.01), lr=1e-3, foreach=True),
                  _per_param_bytes(adamw_fused_bytes)),
    OptimizerCase("lamb", "kfopt", "kernel", _lamb, _per_param_bytes(lamb_bytes), reference="reference"),
    OptimizerCase("lamb", "reference", "baseline", _lamb, _per_param_bytes(lamb_bytes), backend="torch"),
    OptimizerCase("lamb", "foreach", "baseline", lambda m: baselines.ForeachLAMB(_groups(m, 0.01), lr=1e-3),
                  _per_param_bytes(lamb_bytes), reference="reference"),
    OptimizerCase("lars", "kfopt", "kernel", _lars, _per_param_bytes(lars_bytes), reference="reference"),
    OptimizerCase("lars", "reference", "baseline", _lars, _per_param_bytes(lars_bytes), backend="torch"),
    OptimizerCase("lars", "foreach", "baseline", _foreach_lars,
                  _per_param_bytes(lars_bytes), reference="reference"),
] + [
    case
    for band in (1, 4)
    for case in (
        OptimizerCase(f"sonew-band{band}", "kfopt", "kernel", _sonew(band),
                      _per_param_bytes(sonew_bytes(band)), reference="reference"),
        OptimizerCase(f"sonew-band{band}", "reference", "baseline", _sonew(band),
                      _per_param_bytes(sonew_bytes(band)), backend="torch"),
    )
] + [
    case
    for method, build, cycle in KRONECKER_FACTORED
    for case in (
        OptimizerCase(method, "kfopt", "kernel", build(True), None, reference="reference", hooks=True,
                      build_default=build(False), cycle=cycle),
        OptimizerCase(method, "reference", "baseline", build(True), None, backend="torch", hooks=True),
    )
]
SHARED_BASELINES = {"elementwise": ("adamw",), "step": ("adamw",)}
STATE_BASELINE = ("adamw", "torch-fused")  # every step case's optimizer-state bytes are also given relative to it


def optimizer_case(method: str, impl: str) -> OptimizerCase:
    return next(c for c in OPTIMIZERS if c.method == method and c.impl == impl)


# ============================================================================ autotune cost

AUTOTUNE_CASES = {
    # kernel names (their kfopt.autotune ConfigSpace); the probe (perf/autotune_probe.py) builds the inputs
    "full": ["lamb_step", "lars_step", "sonew_step", "symmetric_covariance", "eigen_precondition",
             "rank1_inverse_update", "block_diagonal_matmul", "triangular_matmul", "toeplitz_matmul"],
    "quick": ["lamb_step"],
    "smoke": ["lamb_step"],
}


# ============================================================================ targets (reported, never failed)


@dataclass
class Target:
    name: str
    text: str
    select: Callable[[dict], bool]
    value: Callable[[dict], float | None]
    op: str                 # ">=" or "<="
    threshold: float
    unit: str = ""


def _is(r, family, method, impl="kfopt"):
    return r["family"] == family and r["method"] == method and r["impl"] == impl


TARGETS = [
    Target("lamb-byte-floor", "LAMB step >= 85% of its byte floor",
           lambda r: _is(r, "elementwise", "lamb"), lambda r: r.get("floor_fraction"), ">=", 0.85),
    Target("lamb-vs-adamw-per-byte", "LAMB step faster than AdamW(fused) per byte moved",
           lambda r: _is(r, "elementwise", "lamb") or _is(r, "step", "lamb"),
           lambda r: r["per_byte_ratios"].get("adamw/torch-fused"), ">=", 1.0, "x"),
    Target("sonew-band1-vs-adamw", "SONew band 1 step <= 1.3x AdamW(fused) time",
           lambda r: _is(r, "elementwise", "sonew-band1") or _is(r, "step", "sonew-band1"),
           lambda r: (1.0 / r["ratios"]["adamw/torch-fused"]) if r["ratios"].get("adamw/torch-fused") else None,
           "<=", 1.3, "x"),
    Target("covariance-vs-matmul", "symmetric covariance >= 1.6x torch.matmul(x.T, x) at d >= 1024",
           lambda r: _is(r, "factor", "symmetric_covariance") and r["params"].get("d", 0) >= 1024,
           lambda r: r["ratios"].get("symmetric_covariance/torch.matmul"), ">=", 1.6, "x"),
    Target("rank1-byte-floor", "rank-1 inverse update >= 80% of its byte floor",
           lambda r: _is(r, "factor", "rank1_inverse_update"), lambda r: r.get("floor_fraction"), ">=", 0.80),
]


# ============================================================================ sharded training's collectives

SHARD_MODEL = {
    "full": GPT2_SMALL,
    "quick": GPT2_SMALL,
    "smoke": GPTConfig(n_layer=1, n_head=2, d=32, vocab=64, ctx=16),
}  # parameter shapes of the FSDP2 model (perf/test_sharded_collectives.py)


def lamb_collectives(bands: list[int]) -> list[tuple[str, str | None, int]]:
    """LAMB and LARS under FSDP2 (README "Sharded training"): two SUM all-reduces of fp32 partial sums
    per step, ``8 + 8 T`` bytes in all for ``T`` tensors."""
    t = len(bands)
    return [("all_reduce", "SUM", 8), ("all_reduce", "SUM", 8 * t)]


def sonew_collectives(bands: list[int]) -> list[tuple[str, str | None, int]]:
    """SONew under FSDP2 (README "Sharded training"): one all-gather of ``2 + 2 (3 + b) b`` float64 values
    per tensor with a band ``b > 0``, then its graft norms' SUM all-reduces like LAMB's."""
    halo = sum(8 * (2 + 2 * (3 + b) * b) for b in bands if b)
    return [("all_gather_single", None, halo), *lamb_collectives(bands)]


@dataclass(frozen=True)
class ShardedCase:
    """One optimizer's step under ``fully_shard`` (perf/sharded_collectives.py): ``registry`` its
    ``kfopt.registry`` entry (built with learning rate ``lr``, the step cases' defaults otherwise),
    ``collectives(bands)`` the documented collectives of one step (name, reduce op, bytes per rank), from
    the per-tensor bands (0 for LAMB and LARS)."""

    method: str
    registry: str
    lr: float
    collectives: Callable[[list[int]], list[tuple[str, str | None, int]]]


SHARDED = [
    ShardedCase("lamb", "lamb", 1e-3, lamb_collectives),
    ShardedCase("lars", "lars", 0.1, lamb_collectives),
    ShardedCase("sonew-band1", "sonew", 1e-3, sonew_collectives),
]
SHARD_WORLD = int(os.environ.get("KFOPT_PERF_SHARD_WORLD") or 2)  # ranks of the shard group
SHARD_STEPS = {"full": 20, "quick": 5, "smoke": 0}  # timed steps per rank (smoke: none)
