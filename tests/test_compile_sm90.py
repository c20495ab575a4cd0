"""Every kernel launch the library makes compiles for the GPU (sm_90), not only under the interpreter.

The interpreter runs a kernel's Python body over numpy: it never sees Triton's type checker, the
MLIR lowering, register allocation or ptxas, so a kernel can pass every interpreted test and fail to
compile. This test records the launches of a workload that covers every public kernel in every
storage dtype and flag combination and one step of every optimizer (kernel, argument types,
constexprs, warps, stages), with the interpreter work-arounds of ``kernels.dispatch`` turned off so
the launches are those a GPU run makes. It then compiles each distinct launch ahead of time for
sm_90 (H100/H200) with Triton's bundled ptxas, in processes without the interpreter, and checks
that each fits an sm_90 block's shared memory.

What it cannot check: run-time behaviour on the device (that needs a GPU: ``KFOPT_TEST_DEVICE=cuda``
runs the whole suite compiled), and the non-default autotuning configs (only the default config
runs under the interpreter; a candidate that fails to compile or launch on a GPU is skipped by
``ConfigSpace.select``).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import kfopt
from kfopt import kernels
from kfopt.kernels import dispatch

from conftest import TEST_DEVICE

pytestmark = pytest.mark.skipif(TEST_DEVICE != "cpu", reason="on a GPU every test already compiles its kernels")

#: launch keywords that are compile options, not kernel arguments
OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
#: sm_90's largest shared memory per block (opt-in), bytes
SM90_MAX_SHARED = 232448
_TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
                    torch.uint8: "u8", torch.bool: "i1"}


def _constexpr_names(fn) -> set[str]:
    return {name for name, p in inspect.signature(fn).parameters.items()
            if p.annotation in ("tl.constexpr", "constexpr") or getattr(p.annotation, "__name__", "") == "constexpr"}


def _encode_constexpr(value):
    import triton.language as tl
    if isinstance(value, tl.dtype):
        return {"tl_dtype": value.name}
    if isinstance(value, tl.constexpr):
        value = value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record constexpr {value!r} of type {type(value).__name__}")


def _scalar_type(name: str, value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TO_TRITON[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"argument {name}: cannot type {value!r} ({type(value).__name__})")


class LaunchRecorder:
    """Wraps ``InterpretedFunction.run``: every launch is recorded as (module, kernel, signature,
    constexprs, options), then run by the interpreter as usual."""

    def __init__(self):
        self.launches: dict[str, dict] = {}
        self.outside_config_space: set[str] = set()  # kernels launched outside ConfigSpace.launch
        self._depth = 0

    def install(self, monkeypatch):
        from triton.runtime.interpreter import InterpretedFunction

        from kfopt.autotune import ConfigSpace
        real_run, real_launch = InterpretedFunction.run, ConfigSpace.launch
        recorder = self

        def run(fn_self, *args, grid, warmup, **kwargs):
            recorder.record(fn_self.fn, args, kwargs)
            if not recorder._depth:
                recorder.outside_config_space.add(fn_self.fn.__name__)
            return real_run(fn_self, *args, grid=grid, warmup=warmup, **kwargs)

        def launch(space, **kwargs):
            recorder._depth += 1
            try:
                return real_launch(space, **kwargs)
            finally:
                recorder._depth -= 1

        monkeypatch.setattr(InterpretedFunction, "run", run)
        monkeypatch.setattr(ConfigSpace, "launch", launch)

    def record(self, fn, args, kwargs):
        options = {k: kwargs.pop(k) for k in OPTIONS if k in kwargs}
        bound = inspect.signature(fn).bind(*args, **kwargs)
        bound.apply_defaults()
        constexpr_names = _constexpr_names(fn)
        signature, constexprs = {}, {}
        for name, value in bound.arguments.items():
            if name in constexpr_names or value is None:
                signature[name] = "constexpr"
                constexprs[name] = _encode_constexpr(value)
            else:
                signature[name] = _scalar_type(name, value)
        launch = {"module": fn.__module__, "kernel": fn.__name__, "signature": signature,
                  "constexprs": constexprs, "options": options}
        self.launches.setdefault(json.dumps(launch, sort_keys=True), launch)


# ----------------------------------------------------------------------------- the workload

def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _spd(d, dtype=torch.float32):
    a = torch.randn(d, d) / d ** 0.5
    return (torch.eye(d) + 0.1 * (a + a.T)).to(dtype)


def _structured_kernels(dt):
    """Every structured product in every op/side, with a kernel-dtype ``out`` and the fp32 default."""
    x, xr = _randn(19, 5, dtype=dt), _randn(5, 19, dtype=dt)
    for transpose in (False, True):
        for right, xx in ((False, x), (True, xr)):
            for out in (None, torch.empty(xx.shape, dtype=dt)):
                kernels.triangular_matmul(_randn(19 * 20 // 2, dtype=dt), xx, transpose, right, out=out)
                kernels.toeplitz_matmul(_randn(19, dtype=dt), xx, transpose, right, out=out)
                kernels.hierarchical_matmul(_randn(3, 3, dtype=dt), _randn(3, 16, dtype=dt), _randn(14, dtype=dt),
                                            _randn(2, 14, dtype=dt), _randn(2, 2, dtype=dt), xx, transpose, right,
                                            out=out)
        blocks = _randn(4, 5, 5, dtype=dt)
        kernels.block_diagonal_matmul(blocks, _randn(20, 7, dtype=dt), transpose)
        kernels.block_diagonal_matmul(blocks, _randn(7, 20, dtype=dt), transpose, right=True)
        kernels.block_diagonal_matmul(blocks, _randn(4, 5, 3, dtype=dt), transpose)
    kernels.diagonal_matmul(_randn(19, dtype=dt), x)
    kernels.diagonal_matmul(_randn(19, dtype=dt), xr, right=True, out=torch.empty(xr.shape, dtype=dt))
    for ones_column in (False, True):
        kernels.block_covariance(_randn(9, 19, dtype=dt), 5, ones_column=ones_column, scale=0.5)
        kernels.diagonal_from_inner(_randn(20, dtype=dt), _randn(9, 20 - ones_column, dtype=dt),
                                    ones_column=ones_column)
    kernels.lag_sums(_randn(9, 19, dtype=dt))
    kernels.lag_sums(_randn(9, 19, dtype=dt), _randn(9, 19, dtype=dt))


def _factor_kernels(dt):
    for ones_column in (False, True):
        kernels.symmetric_covariance(_randn(33, 19, dtype=dt), ones_column=ones_column)
        kernels.symmetric_covariance(_randn(33, 19, dtype=dt), ones_column=ones_column,
                                     out=torch.eye(19 + ones_column), decay=0.95)
    qa, qg = torch.linalg.qr(torch.randn(9, 9))[0], torch.linalg.qr(torch.randn(6, 6))[0]
    kernels.eigen_precondition([_randn(6, 9, dtype=dt)], [qa.to(dt)], [torch.rand(9)], [qg.to(dt)],
                               [torch.rand(6)], 1e-3)
    kernels.eigen_precondition([_randn(6, 9, dtype=dt)], [qa], [torch.rand(9)], [qg], [torch.rand(6)], [1e-3])
    kernels.rank1_inverse_update([_spd(17, dt), _spd(5, dt)], [_randn(17, dtype=dt), _randn(5)],
                                 torch.ones(2), decay=0.9, threshold=10.0,
                                 counts=torch.zeros(2, 3, dtype=torch.int32))
    g, b = _randn(6, 9, dtype=dt), _randn(6, dtype=dt)
    kernels.kronecker_precondition([_spd(6, dt), _spd(6)], [g, _randn(6, 9)], [_spd(10, dt), _spd(9)], [b, None])


def _elementwise_kernels(dt):
    params = [_randn(17, 9, dtype=dt), _randn(33, dtype=dt)]
    grads = [torch.randn_like(p) for p in params]
    zeros32 = lambda: [torch.zeros(p.shape) for p in params]  # noqa: E731
    steps = lambda: [torch.zeros(()) for _ in params]  # noqa: E731
    for adapt, clip, reduce in ((True, 1.0, None), (False, None, None), (True, 1.0, lambda t: None)):
        # reduce: the sharded (FSDP2) path, whose partial sums an all-reduce would combine (here: one rank)
        kernels.lamb_step(params, grads, zeros32(), zeros32(), steps(), lr=1e-3, adapt=adapt, max_grad_norm=clip,
                          skipped=torch.zeros((), dtype=torch.int64), reduce=reduce)
        kernels.lars_step(params, grads, zeros32(), lr=1e-3, adapt=adapt, max_grad_norm=clip, nesterov=adapt,
                          reduce=reduce)
    for band in range(1, 5):
        n = [p.numel() for p in params]
        for graft in ("adam", "none"):
            kernels.sonew_step(params, grads, zeros32(), [torch.rand(k) for k in n],
                               [torch.zeros(band, k) for k in n], steps(), lr=1e-3, graft=graft,
                               relative_eps=graft == "none", precondition=[True, False])
    for graft in ("adam", "rmsprop", "sgd"):  # a buffer, a first-order tensor, a skip counter and found_inf
        kernels.graft_step(params, grads, [torch.randn_like(p) for p in params], zeros32(), zeros32(),
                           [torch.zeros(params[0].shape), None], steps(), lr=1e-3, momentum=[0.9, 0.0],
                           precondition=[True, False], graft=graft, skipped=torch.zeros((), dtype=torch.int32),
                           found_inf=torch.zeros(()))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(13, 17), nn.Linear(17, 5, bias=False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _optimizer_steps(dt):
    """One step of every optimizer (the launches their own code makes: norms, skip counters, clips)."""
    builders = [
        lambda m: kfopt.LAMB(m.parameters()), lambda m: kfopt.LARS(m.parameters(), weight_decay=1e-4),
        lambda m: kfopt.SONew(m.parameters(), band=2),
        lambda m: kfopt.KFAC(m, inv_update_steps=1),
        lambda m: kfopt.KFAC(m, inv_update_steps=1, base="lamb", compute_method="inverse"),
        lambda m: kfopt.MKOR(m, inv_freq=1), lambda m: kfopt.MKOR(m, inv_freq=1, factor_dtype=torch.bfloat16),
        lambda m: kfopt.MKORH(m, inv_freq=1),
        # grafting (kernels/graft.py): with a momentum buffer and the optimizer's skip counter (K-FAC), and
        # with the caller's found_inf flag and no counter (SINGD)
        lambda m: kfopt.KFAC(m, inv_update_steps=1, graft="adam"),
        lambda m: kfopt.SINGD(m, T=1, graft="adam", momentum=0.0),
    ] + [lambda m, s=s: kfopt.SINGD(m, T=1, structures=s) for s in (
        ("dense", "dense"), ("diagonal", "block4diagonal"), ("tril", "triu"), ("triltoeplitz", "triutoeplitz"),
        ("hierarchical3_2", "dense"))]
    for build in builders:
        torch.manual_seed(0)
        model = _Net().to(dt)
        opt = build(model)
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(8, 13, dtype=dt)).float().square().mean().backward()
            opt.step()


@pytest.fixture(scope="module")
def gpu_launches():
    """Distinct launches of the workload, as the GPU would make them."""
    monkeypatch = pytest.MonkeyPatch()
    recorder = LaunchRecorder()
    recorder.install(monkeypatch)
    monkeypatch.setattr(dispatch, "INTERPRETER_WORKAROUNDS", False)
    try:
        torch.manual_seed(0)
        for dt in dispatch.KERNEL_DTYPES:
            _elementwise_kernels(dt)
            _factor_kernels(dt)
            _structured_kernels(dt)
            _optimizer_steps(dt)
    finally:
        monkeypatch.undo()
    return recorder


def test_workload_launches_every_kernel(gpu_launches):
    """The workload reaches every ``@triton.jit`` kernel the package launches, and every launch goes
    through ``ConfigSpace.launch`` (which makes the tensors' CUDA device current)."""
    assert not gpu_launches.outside_config_space, (
        f"kernels launched outside ConfigSpace.launch: {sorted(gpu_launches.outside_config_space)}")
    import pkgutil
    launched = {(launch["module"], launch["kernel"]) for launch in gpu_launches.launches.values()}
    defined = set()
    for info in pkgutil.iter_modules(kernels.__path__):
        module = __import__(f"kfopt.kernels.{info.name}", fromlist=["_"])
        for name, obj in vars(module).items():
            fn = getattr(obj, "fn", None)
            if name.endswith("_kernel") and callable(fn) and fn.__module__ == module.__name__:
                defined.add((module.__name__, name))
    assert defined, "found no kernels"
    assert defined <= launched, f"kernels the workload never launches: {sorted(defined - launched)}"


COMPILE_SCRIPT = r"""
import importlib, json, sys
from concurrent.futures import ProcessPoolExecutor
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def compile_one(launch):
    constexprs = {k: tl.dtype(v["tl_dtype"]) if isinstance(v, dict) else v for k, v in launch["constexprs"].items()}
    try:
        fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
        kernel = triton.compile(ASTSource(fn=fn, signature=launch["signature"], constexprs=constexprs),
                                target=GPUTarget("cuda", 90, 32), options=launch["options"])
    except Exception as err:
        return {"error": f"{type(err).__name__}: {str(err)[-2000:]}"}
    return {"shared": kernel.metadata.shared}

if __name__ == "__main__":
    if "nvidia" not in triton.backends.backends:
        print(json.dumps("NO_NVIDIA_BACKEND"))
        sys.exit(0)
    launches = json.load(sys.stdin)
    with ProcessPoolExecutor(max_workers=int(sys.argv[1])) as pool:
        print(json.dumps(list(pool.map(compile_one, launches))))
"""


def test_every_launch_compiles_for_sm90(gpu_launches, tmp_path):
    """Each recorded launch compiles for sm_90 and fits its shared memory."""
    gpu_launches = list(gpu_launches.launches.values())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = os.environ.get("KFOPT_SM90_CACHE_DIR", str(tmp_path / "triton-cache"))
    script = tmp_path / "compile_sm90.py"
    script.write_text(COMPILE_SCRIPT)
    workers = str(max(1, min(4, os.cpu_count() or 1)))
    result = subprocess.run([sys.executable, str(script), workers], input=json.dumps(gpu_launches), env=env,
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = json.loads(result.stdout.strip().splitlines()[-1])
    if compiled == "NO_NVIDIA_BACKEND":
        pytest.skip("this Triton build has no NVIDIA backend")
    failures = []
    for launch, out in zip(gpu_launches, compiled):
        where = f"{launch['module']}.{launch['kernel']} {launch['constexprs']} {launch['options']}"
        if "error" in out:
            failures.append(f"{where}: {out['error']}")
        elif out["shared"] > SM90_MAX_SHARED:
            failures.append(f"{where}: {out['shared']} B of shared memory > {SM90_MAX_SHARED}")
    assert not failures, f"{len(failures)} of {len(gpu_launches)} launches fail on sm_90:\n" + "\n".join(failures)


def test_no_kernel_module_global_is_nan():
    """A NaN-valued module global used in a kernel (``NAN = tl.constexpr(float("nan"))``) compiles, but
    triton >= 3.6 compares the globals a kernel used with their values at every later launch, and
    ``nan != nan``: the second launch raises "Global variable NAN has changed since we compiled this
    kernel" on a GPU (seen on an H200). The interpreter never makes that check."""
    import importlib
    import math
    import pkgutil

    import triton.language as tl
    nan_globals = []
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for name, value in vars(module).items():
            value = value.value if isinstance(value, tl.constexpr) else value
            if isinstance(value, float) and math.isnan(value):
                nan_globals.append(f"{info.name}.{name}")
    assert not nan_globals, f"NaN-valued globals in kernel modules: {nan_globals}"
