"""Assertions shared by the tests: relative error against a float64 reference, by storage dtype."""

import torch

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


def assert_all_changed(out: torch.Tensor, before: torch.Tensor, name: str = "output") -> None:
    """Every element of an in-place output was written (random inputs make a no-op update unlikely)."""
    unchanged = (out == before).sum().item()
    assert unchanged == 0, f"{name}: {unchanged} of {out.numel()} elements were not updated"
