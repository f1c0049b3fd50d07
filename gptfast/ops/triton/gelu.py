"""GELU (tanh approximation) in Triton: elementwise, fp32 math inside whatever the storage dtype.

    y = 0.5 x (1 + tanh(u)) = x * sigmoid(2u),  u = k0 (x + k1 x^3)
    dy/dx = s + 2 x s (1 - s) u',  s = sigmoid(2u),  u' = k0 (1 + 3 k1 x^2)
(the same identity as the C++ kernel: one exp, no tanh; k0 = sqrt(2/pi) = 0.7978845608028654,
k1 = 0.044715 appear as literals in the kernels).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._aot import TYPES, Specialization
from ._interpreter import interpreted_bf16

BLOCK = 65536 if os.environ.get("TRITON_INTERPRET") == "1" else 1024   # interpreter: few, big programs


@triton.jit
def _gelu_fwd_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # exp argument capped: for x << 0, exp(-2u) would overflow to inf (harmless: s -> 0, but noisy)
    s = 1.0 / (1.0 + tl.exp(tl.minimum(-2.0 * 0.7978845608028654 * (x + 0.044715 * x * x * x), 80.0)))
    tl.store(y_ptr + offs, (x * s).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(dy_ptr, x_ptr, dx_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = x * x
    s = 1.0 / (1.0 + tl.exp(tl.minimum(-2.0 * 0.7978845608028654 * (x + 0.044715 * x2 * x), 80.0)))
    du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x2)
    tl.store(dx_ptr + offs, (dy * (s + 2.0 * x * s * (1.0 - s) * du)).to(dx_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor) -> None:
    if x.dtype == torch.float64:
        raise TypeError("x: the Triton GELU supports float32, float16 and bfloat16, got float64")


@torch.library.custom_op("gptfast_triton::gelu_fwd", mutates_args=())
def gelu_fwd(x: torch.Tensor) -> torch.Tensor:
    _check(x)
    if interpreted_bf16(x):
        return gelu_fwd(x.float()).to(x.dtype)
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        _gelu_fwd_kernel[(triton.cdiv(n, BLOCK),)](x, y, n, BLOCK=BLOCK)
    return y


@torch.library.custom_op("gptfast_triton::gelu_bwd", mutates_args=())
def gelu_bwd(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    _check(x)
    if interpreted_bf16(x):
        return gelu_bwd(dy.float(), x.float()).to(x.dtype)
    x, dy = x.contiguous(), dy.contiguous()
    dx = torch.empty_like(x)
    n = x.numel()
    if n:
        _gelu_bwd_kernel[(triton.cdiv(n, BLOCK),)](dy, x, dx, n, BLOCK=BLOCK)
    return dx


def aot_specializations(full: bool) -> list[Specialization]:
    out = []
    for dt in (list(TYPES) if full else ["float32"]):
        t = TYPES[dt]
        types = {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "dy_ptr": f"*{t}", "dx_ptr": f"*{t}", "n": "i32"}
        for kernel, name in ((_gelu_fwd_kernel, "gelu_fwd"), (_gelu_bwd_kernel, "gelu_bwd")):
            out.append(Specialization(name, kernel, types, {"BLOCK": BLOCK}, label=f"{dt} BLOCK{BLOCK}"))
    return out
