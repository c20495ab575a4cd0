"""Assertions shared by the tests: relative error against a float64 reference, by storage dtype; the
autotuning checks of a kernel's ConfigSpace; a short convergence run."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfopt.autotune.space as space

#: ||out - ref|| / ||ref|| allowed for results stored in each dtype (fp32 math inside).
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-12}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None, tol: float | None = None,
                     name: str = "output") -> None:
    """``out`` matches ``ref`` within the dtype's tolerance; a NaN/inf in ``out`` never passes."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (an element was not written?)"
    tol = tol if tol is not None else REL_TOL[dtype or out.dtype]
    err = rel_error(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` (bf16/fp16/fp32) just above each |value| (float64; the subnormal spacing below
    the smallest normal)."""
    mantissa = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    big = values.double().abs().clamp_min(torch.finfo(dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(big)) - mantissa)


def assert_within_one_ulp(out: torch.Tensor, ref: torch.Tensor, name: str = "output") -> None:
    """Element-wise: ``out`` (16-bit) is within 1 ulp of the float64 ``ref`` rounded to ``out.dtype`` (a
    correctly rounded or a truncating store of an fp32 result both are; the interpreter truncates bf16)."""
    assert torch.isfinite(out).all(), f"{name}: non-finite values (an element was not written?)"
    rounded = ref.detach().cpu().to(out.dtype).double()
    err = (out.detach().cpu().double() - rounded).abs() / ulp(rounded, out.dtype)
    worst = err.max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"{name}: {(err > 1).sum().item()} elements more than 1 ulp off (worst {worst:.1f} ulp)"


def moved_beyond_one_ulp(before: torch.Tensor, ref: torch.Tensor) -> int:
    """How many elements the float64 update ``before -> ref`` moves by more than 1 ulp of ``before.dtype``
    (once rounded): where this is 0, a step that is never written would pass the 1-ulp check."""
    rounded = ref.detach().cpu().to(before.dtype).double()
    return int(((before.detach().cpu().double() - rounded).abs() > ulp(rounded, before.dtype)).sum())


def assert_all_changed(out: torch.Tensor, before: torch.Tensor, name: str = "output") -> None:
    """Every element of an in-place output was written (random inputs make a no-op update unlikely)."""
    unchanged = (out == before).sum().item()
    assert unchanged == 0, f"{name}: {unchanged} of {out.numel()} elements were not updated"


# -- autotuning: what a kernel's launcher does with its ConfigSpace ----------------------------------


def check_default_config_untimed(monkeypatch, config_space, run) -> None:
    """Under the interpreter ``run()`` launches with ``config_space.default`` and times nothing."""
    if not space.INTERPRETER:
        pytest.skip("the default is chosen without timing only under the interpreter")
    chosen = []
    select = config_space.select
    monkeypatch.setattr(config_space, "select", lambda **kw: chosen.append(select(**kw)) or chosen[-1])
    monkeypatch.setattr(space, "benchmark", lambda fn: pytest.fail("benchmarked under the interpreter"))
    run()
    assert chosen == [config_space.default]


def tune_with_fake_timings(monkeypatch, tmp_path, config_space, run) -> None:
    """``run()`` as if timing were possible, with timings that make the last candidate the fastest: every
    candidate runs once in the tuning (the caller then checks that ``restore`` left exactly one update)
    and the last one is cached."""
    cache = tmp_path / "autotune.json"
    monkeypatch.setenv("KFOPT_AUTOTUNE_CACHE", str(cache))
    monkeypatch.setattr(space, "can_benchmark", lambda device: True)
    times = iter(range(len(config_space.configs), 0, -1))
    timed = []

    def fake_benchmark(fn):
        fn()
        timed.append(1)
        return float(next(times))

    monkeypatch.setattr(space, "benchmark", fake_benchmark)
    run()
    assert len(timed) == len(config_space.configs)
    (entry,) = json.loads(cache.read_text()).values()
    assert entry["config"] == config_space.configs[-1].to_json()


# -- convergence ---------------------------------------------------------------------------------------


def digits_final_loss(build, schedule=None, steps: int = 300) -> float:
    """Mean training loss of the last 50 of ``steps`` steps of a 64-32-10 tanh MLP on scikit-learn's digits
    (batches of 64, seeded), trained by ``build(model)``; ``schedule``: a ``LambdaLR`` factor of the step."""
    from kfopt.compare.data import load_digits

    images, labels = load_digits()
    x = images.flatten(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = build(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule) if schedule is not None else None
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return sum(losses[-50:]) / 50
