"""The int8 x int8 linear layer of inference in Triton (the GPU twin of csrc/cpu/linear_w8a8.cpp):
y (M, N) = (q (M, K) @ W^T) * sx (M,) * scales (N,) [+ bias], W (N, K) int8, q x's rows quantized to int8 per row.

Each program takes BLOCK_N rows of W and up to 16 rows of x: it first finds its rows' absmax (one read of the few
rows of x), then walks K in BLOCK_K steps, quantizing x in registers and summing the integer products exactly in
int32 - the same q and the same sums as the CPU kernel, so the only rounding is the final float products (in the
CPU kernel's order: acc * sx * scales + bias). Decoding reads W once whatever M is (int8: a quarter of float32's
bytes); more than 16 rows (a prompt) take more programs along M, each row still on its own.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._aot import Specialization
from ._int8_rows import launch_operands, quantized, row_scales

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_N = 128 if INTERPRET else 16  # the interpreter: few, big programs
BLOCK_K = 32
MAX_BLOCK_M = 16


@triton.jit
def _w8a8_kernel(x_ptr, w_ptr, scales_ptr, bias_ptr, y_ptr, M, N, K, stride_xm,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)            # (BLOCK_N,) output columns
    rows_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)            # (BLOCK_M,) rows of x
    offs_k = tl.arange(0, BLOCK_K)
    mask_n, mask_m = rows_n < N, rows_m < M
    inv, sx = row_scales(x_ptr, rows_m, mask_m, K, stride_xm, BLOCK_M, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < K
        x = tl.load(x_ptr + rows_m[:, None] * stride_xm + ks[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0).to(tl.float32)                                   # (BLOCK_M, BLOCK_K)
        q = quantized(x, inv[:, None])
        w = tl.load(w_ptr + rows_n[:, None] * K + ks[None, :], mask=mask_n[:, None] & mask_k[None, :],
                    other=0).to(tl.int32)                                       # (BLOCK_N, BLOCK_K)
        acc += tl.sum(q[:, None, :] * w[None, :, :], axis=2)                  # exact: |sum| < 2^31 for K <= 65536
    scales = tl.load(scales_ptr + rows_n, mask=mask_n, other=0.0)
    y = acc.to(tl.float32) * sx[:, None] * scales[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rows_n, mask=mask_n, other=0.0)[None, :]
    tl.store(y_ptr + rows_m[:, None] * N + rows_n[None, :], y, mask=mask_m[:, None] & mask_n[None, :])


def launch_shape(M: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): up to 16 rows of x a program (more: more programs along M), the K step fixed."""
    return min(MAX_BLOCK_M, max(1, triton.next_power_of_2(M))), BLOCK_N, BLOCK_K


@torch.library.custom_op("gptfast_triton::linear_w8a8_fwd", mutates_args=())
def linear_w8a8_fwd(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                    path: str | None = None) -> torch.Tensor:
    x2, weight, scales, bias, y = launch_operands(x, weight, scales, bias, "int8 x int8 linear")
    (M, K), N = x2.shape, weight.shape[0]
    if M and N:
        block_m, block_n, block_k = launch_shape(M)
        _w8a8_kernel[(triton.cdiv(N, block_n), triton.cdiv(M, block_m))](
            x2, weight, scales, bias if bias is not None else scales, y, M, N, K, x2.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            enable_fp_fusion=False)                                  # x * inv rounded before the rounding add
    return y.view(*x.shape[:-1], N)


def aot_specializations(full: bool) -> list[Specialization]:
    """1, 4 and 16 rows of x a program, with and without a bias."""
    out = []
    for rows in (1, 4, 16):
        block_m, block_n, block_k = launch_shape(rows)
        for bias in ((True, False) if full else (True,)):
            types = {"x_ptr": "*fp32", "w_ptr": "*i8", "scales_ptr": "*fp32", "bias_ptr": "*fp32", "y_ptr": "*fp32",
                     "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32"}
            const = {"HAS_BIAS": bias, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}
            out.append(Specialization("linear_w8a8", _w8a8_kernel, types, const, fp_fusion=False,
                                      label=f"M{block_m} N{block_n} K{block_k}" + ("" if bias else " no bias")))
    return out
