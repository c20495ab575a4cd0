"""Correctness checks the suite runs before timing anything (and in the smoke run instead of timing)."""

from __future__ import annotations

from typing import Sequence

import torch


def rel_error(out: Sequence[torch.Tensor] | torch.Tensor, ref: Sequence[torch.Tensor] | torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over all tensors together, in float64; inf if ``out`` is not finite."""
    if isinstance(out, torch.Tensor):
        out, ref = [out], [ref]
    assert len(out) == len(ref), f"{len(out)} outputs vs {len(ref)} references"
    num = torch.zeros((), dtype=torch.float64, device=out[0].device)
    den = torch.zeros((), dtype=torch.float64, device=out[0].device)
    finite = True
    for o, r in zip(out, ref):
        assert o.shape == r.shape, f"shape {tuple(o.shape)} vs {tuple(r.shape)}"
        o, r = o.detach().double(), r.detach().to(o.device).double()
        finite = finite and bool(torch.isfinite(o).all())
        num += ((o - r) ** 2).sum()
        den += (r ** 2).sum()
    if not finite:
        return float("inf")
    return float(num.sqrt() / den.sqrt().clamp_min(1e-300))


def assert_close(name: str, out, ref, tol: float) -> float:
    err = rel_error(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e} (NaN/inf count as inf)"
    return err


def _ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of each |t| (fp32 values) in ``dtype`` (fp32, bf16 or fp16)."""
    mantissa = {torch.bfloat16: 7, torch.float16: 10}.get(dtype, 23)
    big = t.abs().clamp_min(torch.finfo(dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(big))) * 2.0 ** -mantissa


def rel_error_beyond_ulp(out: torch.Tensor, ref: torch.Tensor, base: torch.Tensor) -> float:
    """Relative error of the update ``out - base`` against ``ref - base`` (parameters stepped from
    ``base``), not counting one unit in the last place of the parameters' dtype per element:
    ``||max(|out - ref| - ulp, 0)|| / ||ref - base||``, in float64 (inf if ``out`` is not finite; 0 or inf
    when the reference did not move). Two paths that round the same update into the parameter may
    land one ulp apart: that is storage, not the arithmetic being checked."""
    o, r, b = out.detach().double(), ref.detach().to(out.device).double(), base.detach().to(out.device).double()
    if not bool(torch.isfinite(o).all()):
        return float("inf")
    ulp = _ulp(torch.maximum(o.abs(), r.abs()).float(), ref.dtype).double()
    num = float(((o - r).abs() - ulp).clamp_min(0).norm())
    den = float((r - b).norm())
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return num / den


def max_ulp_difference(out: Sequence[torch.Tensor], ref: Sequence[torch.Tensor],
                       peak: Sequence[torch.Tensor] | None = None) -> float:
    """Largest |out - ref| in units of the last place (of the larger magnitude) of the tensors' dtype.
    With ``peak`` (each element's largest magnitude along the steps that led here), the ulp is that of
    the largest of the three: a one-ulp rounding made while a value was large stays the same size when
    later steps bring the value closer to 0."""
    worst = 0.0
    for k, (o, r) in enumerate(zip(out, ref)):
        r32, o32 = r.detach().float(), o.detach().float()
        big = torch.maximum(r32.abs(), o32.abs())
        if peak is not None:
            big = torch.maximum(big, peak[k].detach().float().abs())
        diff = (o32 - r32).abs() / _ulp(big, r.dtype)
        if diff.numel():
            worst = max(worst, float(diff.max()))
    return worst


# How a fresh (all-zero) state tensor is seeded before a check: (kind, what sets its scale). A zero
# state hides the decay of old state (b1 * 0 == 0 for any b1), so the checks step from random state.
STATE_SCALES = {
    "exp_avg": ("normal", "grad"),              # first moments: the gradients' size
    "exp_avg_sq": ("positive", "grad^2"),       # second moments: their square
    "momentum_buffer": ("normal", "1e-3 param"),  # LARS: one step's lr * r * d ~ lr * eta * |w|
}


def seed_fresh_state(runners: Sequence, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                     seed: int = 0) -> list[str]:
    """Give every runner the same random, non-zero values in each state tensor that is still all zeros
    (fresh), for the state names all runners hold (``runner.state``: ``{name: [tensor per param]}``).
    Scales follow ``STATE_SCALES`` (per tensor: rms of its gradient or parameter). Runners whose state is
    created by their first step (``torch.optim``: ``.state`` raises KeyError) keep theirs, and then no
    state is seeded. Returns the names seeded."""
    states = []
    for runner in runners:
        try:
            states.append(runner.state)
        except KeyError:
            return []
    names = sorted(set.intersection(*(set(s) for s in states)))
    gen = torch.Generator().manual_seed(seed)
    seeded = []
    for name in names:
        kind, scale_of = STATE_SCALES.get(name, ("normal", "grad"))
        columns = [s[name] for s in states]
        if not all(bool((t == 0).all()) for col in columns for t in col):
            continue
        for i, tensors in enumerate(zip(*columns)):
            ref = grads[i] if scale_of.startswith("grad") else params[i]
            rms = float(ref.detach().float().pow(2).mean().sqrt()) if ref.numel() else 1.0
            scale = {"grad": rms, "grad^2": rms * rms, "1e-3 param": 1e-3 * rms}[scale_of]
            values = torch.randn(tensors[0].shape, generator=gen, dtype=torch.float64)
            values = (0.5 + values.abs()) if kind == "positive" else values
            for t in tensors:
                t.copy_((values * scale).to(device=t.device, dtype=t.dtype))
        seeded.append(name)
    return seeded
