"""Activations quantized to int8 a row at a time: what the integer-dot-product layers (int8 weights x int8
activations, 4-bit weights x int8 activations) do to x before their integer products, defined once for both.

    sx = absmax(row) / 127,  q = round(x * (127 / absmax)), half to even, in [-127, 127]   (0 for a row of zeros)

The kernels (C++, CUDA, Triton) compute exactly these q and sx; the ops' twins call this.
"""
from __future__ import annotations

import torch

MAX_K = 65536            # the int32 sums: |q| <= 127 (128 offset on VNNI) times |w| <= 127, summed over K


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, sx): each row of x as int8 values (float tensor) in [-127, 127] and its scale absmax / 127, computed in
    float32 exactly as the kernels do (127 / absmax, one rounding of x * that, half to even), so that the twin and
    the kernels round every element the same way."""
    x32 = x.float()
    amax = x32.abs().amax(dim=-1, keepdim=True)                    # (..., 1)
    # (a tensor over a tensor: IEEE division, as the kernels' 127.f / amax; `127.0 / amax` would be PyTorch's
    # reciprocal times 127, off by an ulp now and then - and q with it)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    return (x32 * inv).round().clamp(-127, 127), amax / 127
