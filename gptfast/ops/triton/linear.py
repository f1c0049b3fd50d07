"""The linear layer of inference in Triton: y (M, N) = x (M, K) @ W^T [* scales] [+ bias] for a few
rows of x, W (N, K) stored as float32, bfloat16 or int8 (weight-only quantization, one float32 scale
per output row).

Decoding makes M small (one row per sequence), so the product is bound by reading W: each program
takes BLOCK_N rows of W and every row of x at once (BLOCK_M >= M, up to 16), walks K in BLOCK_K
steps, widens the weights to float32 in registers and reduces the (BLOCK_M, BLOCK_N, BLOCK_K)
products over K - so W is read once whatever M is, activations and accumulators in float32.
Small tiles (16 rows of W) give enough programs to fill the GPU on GPT-2's 768-wide layers.
More than 16 rows of x is a matrix product, left to cuBLAS (F.linear on dequantized weights).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._aot import TYPES, Specialization
from ._interpreter import interpreted_bf16

MAX_ROWS = 16                       # rows of x the kernel takes; more go to F.linear
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_N = 128 if INTERPRET else 16  # the interpreter: few, big programs


@triton.jit
def _linear_kernel(x_ptr, w_ptr, scales_ptr, bias_ptr, y_ptr, M, N, K, stride_xm,
                   HAS_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)            # (BLOCK_N,) output columns
    rows_m = tl.arange(0, BLOCK_M)                                          # (BLOCK_M,) rows of x
    offs_k = tl.arange(0, BLOCK_K)
    mask_n, mask_m = rows_n < N, rows_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < K
        x = tl.load(x_ptr + rows_m[:, None] * stride_xm + ks[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0).to(tl.float32)                                   # (BLOCK_M, BLOCK_K)
        w = tl.load(w_ptr + rows_n[:, None] * K + ks[None, :], mask=mask_n[:, None] & mask_k[None, :],
                    other=0).to(tl.float32)                                     # (BLOCK_N, BLOCK_K), widened
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)                  # (BLOCK_M, BLOCK_N)
    if HAS_SCALES:
        acc = acc * tl.load(scales_ptr + rows_n, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rows_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows_m[:, None] * N + rows_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def launch_shape(M: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for M rows of x: every row in one program; the K step the same for every M,
    so a row's dot products are summed in the same order whatever the batch (a sequence decoded alone gets the
    bits it gets in a batch). The 3-D product tile stays at 512-8192 values (4-64 registers a thread, 4 warps)."""
    return max(1, triton.next_power_of_2(M)), BLOCK_N, BLOCK_K


BLOCK_K = 32


@torch.library.custom_op("gptfast_triton::linear_fwd", mutates_args=())
def linear_fwd(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None,
               bias: torch.Tensor | None) -> torch.Tensor:
    if x.dtype == torch.float64:
        raise TypeError("x: the Triton linear kernel takes float32, float16 or bfloat16 activations, got float64")
    if interpreted_bf16(x):                                      # float32 math on widened values, rounded back
        return linear_fwd(x.float(), weight.float() if weight.dtype == x.dtype else weight, scales,
                          bias.float() if bias is not None else None).to(x.dtype)
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M > MAX_ROWS:                                             # a matrix product: cuBLAS's job
        w = weight if weight.dtype == x.dtype else weight.to(x.dtype)
        y = torch.nn.functional.linear(x2, w)
        if scales is not None:
            y = y * scales.to(x.dtype)
        return (y + bias if bias is not None else y).view(*x.shape[:-1], N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    # every operand is read with its rows packed (the kernel takes x's row stride only): a strided view of
    # the weight, the scales or the bias is made contiguous first
    weight = weight.contiguous()
    scales = scales.contiguous() if scales is not None else None
    bias = bias.contiguous() if bias is not None else None
    if INTERPRET and weight.dtype == torch.bfloat16:             # the interpreter cannot load bfloat16
        weight = weight.float()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M and N:
        block_m, block_n, block_k = launch_shape(M)
        _linear_kernel[(triton.cdiv(N, block_n),)](
            x2, weight, scales if scales is not None else weight, bias if bias is not None else weight, y,
            M, N, K, x2.stride(0), HAS_SCALES=scales is not None, HAS_BIAS=bias is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y.view(*x.shape[:-1], N)


def aot_specializations(full: bool) -> list[Specialization]:
    """Each weight type at the tile shapes of 1, 4 and 16 rows of x (float32 activations; bfloat16 in `full`)."""
    out = []
    for xt in (["float32", "bfloat16"] if full else ["float32"]):
        for wt in ("fp32", "bf16", "i8"):
            for rows in (1, 4, 16):
                block_m, block_n, block_k = launch_shape(rows)
                const = {"HAS_SCALES": wt == "i8", "HAS_BIAS": True, "BLOCK_M": block_m, "BLOCK_N": block_n,
                         "BLOCK_K": block_k}
                x = TYPES[xt]
                types = {"x_ptr": f"*{x}", "w_ptr": f"*{wt}", "scales_ptr": "*fp32", "bias_ptr": f"*{x}",
                         "y_ptr": f"*{x}", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32"}
                out.append(Specialization("linear", _linear_kernel, types, const,
                                          label=f"x {xt} w {wt} M{block_m} N{block_n} K{block_k}"))
    return out
