"""RoPE in Triton: a block of rows (one head's vector at one position each) per program, fp32 math.

    out = (x1 c - x2 s, x2 c + x1 s);   the backward: (d1 c + d2 s, d2 c - d1 s)
Rows are read through their strides (q and k may be transposed projections) and written contiguous; the
tables are read as float32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._aot import TYPES, Specialization
from ._interpreter import interpreted_bf16

ROWS = 64 if os.environ.get("TRITON_INTERPRET") == "1" else 4


@triton.jit
def _rope_kernel(x_ptr, y_ptr, cos_ptr, sin_ptr, n_rows, H, T, sb, sh, st, half, SIGN: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_H)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < half)
    t = rows % T
    bh = rows // T
    src = (bh // H) * sb + (bh % H) * sh + t * st                # each row where it lies
    x1 = tl.load(x_ptr + src[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + src[:, None] + half + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + t[:, None] * half + cols[None, :], mask=mask, other=0.0)
    s = tl.load(sin_ptr + t[:, None] * half + cols[None, :], mask=mask, other=0.0) * SIGN
    dst = rows[:, None] * (2 * half) + cols[None, :]
    tl.store(y_ptr + dst, (x1 * c - x2 * s).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + dst + half, (x2 * c + x1 * s).to(y_ptr.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int) -> torch.Tensor:
    x = x if x.stride(-1) == 1 else x.contiguous()
    B, H, T, D = x.shape
    y = torch.empty((B, H, T, D), dtype=x.dtype, device=x.device)
    n_rows = B * H * T
    if n_rows:
        _rope_kernel[(triton.cdiv(n_rows, ROWS),)](x, y, cos.float().contiguous(), sin.float().contiguous(), n_rows,
                                                   H, T, x.stride(0), x.stride(1), x.stride(2), D // 2, SIGN=sign,
                                                   ROWS=ROWS, BLOCK_H=triton.next_power_of_2(max(D // 2, 1)))
    return y


def _check(q: torch.Tensor) -> None:
    if q.dtype == torch.float64:
        raise TypeError("q: the Triton RoPE supports float32, float16 and bfloat16, got float64")


@torch.library.custom_op("gptfast_triton::rope_fwd", mutates_args=())
def rope_fwd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q)
    if interpreted_bf16(q):
        a, b = rope_fwd(q.float(), k.float(), cos, sin)
        return a.to(q.dtype), b.to(k.dtype)
    return _rotate(q, cos, sin, 1), _rotate(k, cos, sin, 1)


@torch.library.custom_op("gptfast_triton::rope_bwd", mutates_args=())
def rope_bwd(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check(dq)
    if interpreted_bf16(dq):
        a, b = rope_bwd(dq.float(), dk.float(), cos, sin)
        return a.to(dq.dtype), b.to(dk.dtype)
    return _rotate(dq, cos, sin, -1), _rotate(dk, cos, sin, -1)


def aot_specializations(full: bool) -> list[Specialization]:
    """Forward and backward at head_dim 128 (Qwen3, Llama 3) and 64."""
    out = []
    for dt in (list(TYPES) if full else ["float32"]):
        t = TYPES[dt]
        types = {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "n_rows": "i32",
                 "H": "i32", "T": "i32", "sb": "i32", "sh": "i32", "st": "i32", "half": "i32"}
        for D in (64, 128):
            for sign in (1, -1):
                out.append(Specialization("rope", _rope_kernel, types, {"SIGN": sign, "ROWS": ROWS, "BLOCK_H": D // 2},
                                          label=f"{dt} D{D} sign{sign}"))
    return out
