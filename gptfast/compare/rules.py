"""How close a backend must be to the float64 reference: the project's tolerance rule, in one place.

- float64: 1e-10 (both sides compute the same math in the same precision; what is left is ordering)
- float32: 1e-5, or 3e-4 where the kernel's dot products run in tf32 (Triton's `tl.dot` on a GPU)
- float16 / bfloat16: 1e-2, and no worse than 2x the error of the same computation done by PyTorch at
  that precision (the `baseline`), so a kernel cannot hide behind the loose absolute bar.

Errors are relative, ||out - ref|| / ||ref|| (the absolute norm where ref is exactly zero), computed in
float64; a non-finite output fails whatever the tolerance.
"""
from __future__ import annotations

import math

import torch

HALF = (torch.float16, torch.bfloat16)
BASE_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
TF32_TOL = 3e-4
BASELINE_SLACK = 1e-6      # an exact baseline (0) must not demand an exact kernel
MODEL_TOL_FLOAT64 = 1e-9   # a whole model in float64: rounding through the layers stays ~1e-15 (measured)


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |out - ref|, ||out - ref|| / ||ref||) in float64; inf when out holds NaN or inf."""
    out, ref = out.detach().double(), ref.detach().double().to(out.device)
    if out.shape != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} differs from the reference's {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return math.inf, math.inf
    diff = out - ref
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    scale = torch.linalg.vector_norm(ref).item()
    norm = torch.linalg.vector_norm(diff).item()
    return max_abs, (norm / scale if scale > 0 else norm)


def op_tolerance(dtype: torch.dtype, baseline: float | None = None, tf32: bool = False) -> float:
    """The bar for one op's output or gradient at `dtype` (see the module docstring)."""
    if dtype in HALF:
        bar = BASE_TOL[dtype]
        return bar if baseline is None else min(bar, 2 * baseline + BASELINE_SLACK)
    if dtype == torch.float32 and tf32:
        return TF32_TOL
    return BASE_TOL[dtype]


def model_tolerance(dtype: torch.dtype, baseline: float | None) -> float:
    """The bar for a whole model's logits, loss or parameter gradient. Rounding compounds through the
    layers, so below float64 the bar is 2x what the same model gets with PyTorch's own math at that
    precision (the `reference` backend run at `dtype`), and never tighter than the per-op bar."""
    if dtype == torch.float64:
        return MODEL_TOL_FLOAT64
    if baseline is None:
        return BASE_TOL[dtype]
    return max(BASE_TOL[dtype], 2 * baseline + BASELINE_SLACK)


def passes(rel: float, tol: float) -> bool:
    return math.isfinite(rel) and rel <= tol
