"""The 4-bit linear layer of inference in Triton (the GPU twin of csrc/cpu/linear_int4.cpp): weights packed two
a byte in groups of 32 or 64 along K with a float32 scale each (ops/linear_int4.py pack_int4: each 64 weights are
32 bytes, low nibbles weights 0..31, high nibbles 32..63, stored as w + 8), activations quantized to int8 per row:
    y[m, n] = sx[m] * sum_g scales[n, g] * sum_{k in g} q[m, k] w[n, k]      (+ bias[n])

Each program takes BLOCK_N weight rows and up to 16 rows of x, quantizes its rows of x in registers (_int8_rows.py),
and walks K 64 weights (32 bytes a row) at a time: an AND and a shift unpack the two halves, the integer products
of each half are summed exactly in int32 and scaled by its group's scale into float32 accumulators. A step reads
half a byte a weight (+ 4 bytes a group): 0.56-0.63x the bytes of int8.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._aot import Specialization
from ._int8_rows import launch_operands, quantized, row_scales

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_N = 128 if INTERPRET else 16
MAX_BLOCK_M = 16


@triton.jit
def _int4_kernel(x_ptr, w_ptr, scales_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, n_blocks, n_groups,
                 GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)            # (BLOCK_N,) output columns
    rows_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)            # (BLOCK_M,) rows of x
    half = tl.arange(0, 32)
    mask_n, mask_m = rows_n < N, rows_m < M
    inv, sx = row_scales(x_ptr, rows_m, mask_m, K, stride_xm, BLOCK_M, 64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b in range(0, n_blocks):                                            # 64 weights of each row a step
        packed = tl.load(w_ptr + rows_n[:, None] * (n_blocks * 32) + b * 32 + half[None, :], mask=mask_n[:, None],
                         other=0).to(tl.int32)                                  # (BLOCK_N, 32) bytes
        lo, hi = (packed & 15) - 8, (packed >> 4) - 8                           # weights 0..31 and 32..63
        k_lo = b * 64 + half
        x_lo = tl.load(x_ptr + rows_m[:, None] * stride_xm + k_lo[None, :],
                       mask=mask_m[:, None] & (k_lo < K)[None, :], other=0.0).to(tl.float32)
        x_hi = tl.load(x_ptr + rows_m[:, None] * stride_xm + (k_lo + 32)[None, :],
                       mask=mask_m[:, None] & (k_lo + 32 < K)[None, :], other=0.0).to(tl.float32)
        s_lo = tl.sum(quantized(x_lo, inv[:, None])[:, None, :] * lo[None, :, :], axis=2)   # (BLOCK_M, BLOCK_N)
        s_hi = tl.sum(quantized(x_hi, inv[:, None])[:, None, :] * hi[None, :, :], axis=2)
        if GROUP == 64:
            scale = tl.load(scales_ptr + rows_n * n_groups + b, mask=mask_n, other=0.0)
            acc += (s_lo + s_hi).to(tl.float32) * scale[None, :]
        else:
            scale_lo = tl.load(scales_ptr + rows_n * n_groups + 2 * b, mask=mask_n, other=0.0)
            scale_hi = tl.load(scales_ptr + rows_n * n_groups + 2 * b + 1, mask=mask_n, other=0.0)
            acc += s_lo.to(tl.float32) * scale_lo[None, :] + s_hi.to(tl.float32) * scale_hi[None, :]
    y = acc * sx[:, None]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rows_n, mask=mask_n, other=0.0)[None, :]
    tl.store(y_ptr + rows_m[:, None] * N + rows_n[None, :], y, mask=mask_m[:, None] & mask_n[None, :])


def launch_shape(M: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): up to 16 rows of x a program (more: more programs along M)."""
    return min(MAX_BLOCK_M, max(1, triton.next_power_of_2(M))), BLOCK_N


@torch.library.custom_op("gptfast_triton::linear_int4_fwd", mutates_args=())
def linear_int4_fwd(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                    path: str | None = None) -> torch.Tensor:
    x2, weight, scales, bias, y = launch_operands(x, weight, scales, bias, "4-bit linear")
    (M, K), N = x2.shape, weight.shape[0]
    n_blocks, n_groups = weight.shape[1] // 32, scales.shape[1]
    if M and N:
        block_m, block_n = launch_shape(M)
        _int4_kernel[(triton.cdiv(N, block_n), triton.cdiv(M, block_m))](
            x2, weight, scales, bias if bias is not None else scales, y, M, N, K, x2.stride(0), n_blocks, n_groups,
            GROUP=64 * n_blocks // n_groups, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
            enable_fp_fusion=False)                                  # x * inv rounded before the rounding add
    return y.view(*x.shape[:-1], N)


def aot_specializations(full: bool) -> list[Specialization]:
    """Groups of 32 and 64 at 1, 4 and 16 rows of x a program."""
    out = []
    for group in (32, 64):
        for rows in ((1, 4, 16) if full else (1, 16)):
            block_m, block_n = launch_shape(rows)
            types = {"x_ptr": "*fp32", "w_ptr": "*u8", "scales_ptr": "*fp32", "bias_ptr": "*fp32", "y_ptr": "*fp32",
                     "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "n_blocks": "i32", "n_groups": "i32"}
            const = {"GROUP": group, "HAS_BIAS": True, "BLOCK_M": block_m, "BLOCK_N": block_n}
            out.append(Specialization("linear_int4", _int4_kernel, types, const, fp_fusion=False,
                                      label=f"g{group} M{block_m} N{block_n}"))
    return out
