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

from .. import autograd_formulas as formulas
from . import INTERPRET
from .attention import _head_key, _keep


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


def _check(x: torch.Tensor, p: float, seed: torch.Tensor, name: str = "x") -> None:
    if not x.is_floating_point() or x.dtype == torch.float64:
        raise TypeError(f"{name}: the Triton dropout supports float32, float16 and bfloat16, got {x.dtype}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p}")
    if seed.numel() != 1 or seed.dtype != torch.int64:
        raise ValueError(f"seed must be a one-element int64 tensor, got {seed.dtype} with {seed.numel()} elements")


@torch.library.custom_op("gptfast_triton::dropout_add_fwd", mutates_args=())
def dropout_add_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], p: float, seed: torch.Tensor) -> torch.Tensor:
    _check(x, p, seed)
    if residual is not None:
        _check(residual, p, seed, "residual")
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        residual = residual.contiguous()
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=residual.dtype if residual is not None else x.dtype, device=x.device)
    _launch(x, residual, y, p, seed.to(x.device))
    return y


@torch.library.custom_op("gptfast_triton::dropout_bwd", mutates_args=())
def dropout_bwd(dy: torch.Tensor, p: float, seed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    _check(dy, p, seed, "dy")
    dy = dy.contiguous()
    dx = torch.empty(dy.shape, dtype=dtype, device=dy.device)
    _launch(dy, None, dx, p, seed.to(dy.device))
    return dx


@dropout_add_fwd.register_fake
def _(x, residual, p, seed):
    return torch.empty(x.shape, dtype=residual.dtype if residual is not None else x.dtype, device=x.device)


@dropout_bwd.register_fake
def _(dy, p, seed, dtype):
    return torch.empty(dy.shape, dtype=dtype, device=dy.device)


formulas.register(dropout_add_fwd, formulas.dropout_add, dropout_bwd)
