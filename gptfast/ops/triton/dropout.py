"""Dropout fused with the residual add in Triton: y = residual + dropout(x), and dropout's backward.

x is seen as rows of its last dimension C; element (row, col) is kept when the shared counter-based
hash of (seed, 0, row, col) says so (csrc/dropout_hash.h; the attention kernels' `_keep` with one
"head"), then scaled by 1 / (1 - p): the mask equals the reference's, the C++ and CUDA kernels' bit for
bit, and the backward regenerates it from the seed. One program per tile of rows x columns; fp32 math;
x and y may have different storage types (a bf16 branch added into a float32 residual stream).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .attention import _head_key, _keep
from ._aot import GPT2_ROWS, TYPES, Specialization
from ._interpreter import interpreted_bf16


@triton.jit
def _dropout_kernel(x_ptr, res_ptr, y_ptr, seed_ptr, rows, C, threshold, scale, HAS_RESIDUAL: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (r[:, None] < rows) & (c[None, :] < C)
    offs = r.to(tl.int64)[:, None] * C + c[None, :]
    keep = _keep(_head_key(seed_ptr, 0), r, c, threshold)
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    y = tl.where(keep, x * scale, 0.0)
    if HAS_RESIDUAL:
        y += tl.load(res_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inside)


def launch_shape(C: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): up to 1024 columns, 4096 elements a program (the interpreter: 65536, few and big)."""
    block_c = min(triton.next_power_of_2(C), 1024)
    return max(1, (65536 if INTERPRET else 4096) // block_c), block_c


def _launch(x: torch.Tensor, residual: torch.Tensor | None, y: torch.Tensor, p: float, seed: torch.Tensor) -> None:
    C = x.shape[-1] if x.dim() else 1
    rows = x.numel() // C if C else 0
    if rows == 0:
        return
    block_r, block_c = launch_shape(C)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(C, block_c))
    _dropout_kernel[grid](x, residual if residual is not None else x, y, seed, rows, C, int(p * 16777216.0),
                          1.0 / (1.0 - p), HAS_RESIDUAL=residual is not None, BLOCK_R=block_r, BLOCK_C=block_c)


def _check(x: torch.Tensor, name: str = "x") -> None:
    if x.dtype == torch.float64:
        raise TypeError(f"{name}: the Triton dropout supports float32, float16 and bfloat16, got float64")


def _widened(t):
    return t.float() if interpreted_bf16(t) else t


@torch.library.custom_op("gptfast_triton::dropout_add_fwd", mutates_args=())
def dropout_add_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], p: float, seed: torch.Tensor) -> torch.Tensor:
    _check(x)
    out_dtype = residual.dtype if residual is not None else x.dtype
    if interpreted_bf16(x) or interpreted_bf16(residual):
        return dropout_add_fwd(_widened(x), _widened(residual), p, seed).to(out_dtype)
    if residual is not None:
        _check(residual, "residual")
        residual = residual.contiguous()
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    _launch(x, residual, y, p, seed.to(x.device))
    return y


@torch.library.custom_op("gptfast_triton::dropout_bwd", mutates_args=())
def dropout_bwd(dy: torch.Tensor, p: float, seed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    _check(dy, "dy")
    if interpreted_bf16(dy) or (dy.device.type == "cpu" and dtype == torch.bfloat16):
        return dropout_bwd(_widened(dy), p, seed, torch.float32).to(dtype)
    dy = dy.contiguous()
    dx = torch.empty(dy.shape, dtype=dtype, device=dy.device)
    _launch(dy, None, dx, p, seed.to(dy.device))
    return dx


def aot_specializations(full: bool) -> list[Specialization]:
    """With and without a residual, and a 16-bit branch into a float32 stream."""
    out = []
    for dt in (list(TYPES) if full else ["float32"]):
        t = TYPES[dt]
        for res_t, residual in ((t, True), ("fp32", True), (t, False)):
            block_r, block_c = launch_shape(GPT2_ROWS[0])
            const = {"HAS_RESIDUAL": residual, "BLOCK_R": block_r, "BLOCK_C": block_c}
            types = {"x_ptr": f"*{t}", "res_ptr": f"*{res_t}", "y_ptr": f"*{res_t}", "seed_ptr": "*i64", "rows": "i32",
                     "C": "i32", "threshold": "i32", "scale": "fp32"}
            out.append(Specialization("dropout_add", _dropout_kernel, types, const,
                                      label=f"{dt} -> {res_t}{' + residual' if residual else ''} R{block_r} C{block_c}"))
    return out
