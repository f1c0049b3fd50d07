"""Quantizing rows of activations to int8 inside a Triton kernel, as the CPU kernels and the PyTorch twin do
(gptfast/ops/int8_rows.py `quantize_rows`): per row sx = absmax / 127, q = round(x * 127 / absmax), half to even.
Each program quantizes the rows it multiplies (a few rows of x, re-read from cache): no second launch, no buffer.
Shared by this folder's int8 x int8 and 4-bit kernel files; the division is IEEE's (div_rn), and the kernels launch with
enable_fp_fusion=False (else x * inv and the rounding add below become one FMA, rounding the exact product, not
the float32 one), so that q is the same bits on a GPU as on the CPU (.ci/triton_aot_check.py checks the PTX).
Triton's interpreter has no libdevice.rint: the rounding is the add-and-subtract of 1.5 * 2^23."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ROUNDER = 12582912.0          # 1.5 * 2^23: (v + it) - it rounds |v| < 2^22 to an integer, half to even, in float32


@triton.jit
def row_scales(x_ptr, rows_m, mask_m, K, stride_xm, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(inv, sx) (BLOCK_M,) each: 127 / absmax of each row (0 for a row of zeros) and absmax / 127."""
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows_m[:, None] * stride_xm + ks[None, :], mask=mask_m[:, None] & (ks < K)[None, :],
                    other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    full = tl.full((BLOCK_M,), 127.0, dtype=tl.float32)
    inv = tl.where(amax > 0, tl.math.div_rn(full, tl.where(amax > 0, amax, 1.0)), 0.0)
    return inv, tl.math.div_rn(amax, full)


@triton.jit
def quantized(x, inv):
    """x (BLOCK_M, BLOCK_K) float32 times its row's inv (BLOCK_M, 1), rounded half to even, in [-127, 127], as
    int32 (the products' type)."""
    v = x * inv
    r = (v + 12582912.0) - 12582912.0
    return tl.minimum(tl.maximum(r, -127.0), 127.0).to(tl.int32)


def launch_operands(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, what: str):
    """(x as (M, K) rows of unit stride, weight, scales, bias contiguous, y (M, N) to fill): what the kernels read
    (x's row stride is an argument; the rest packed). `what` names the layer in the error for non-float32 x."""
    if x.dtype != torch.float32:
        raise TypeError(f"x: the Triton {what} takes float32 activations, got {x.dtype}")
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((x2.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    return x2, weight.contiguous(), scales.contiguous(), bias.contiguous() if bias is not None else None, y
