"""SwiGLU in Triton: elementwise, fp32 math inside whatever the storage dtype.

    y = g * s * u,  s = sigmoid(g);   dg = dy * u * s * (1 + g (1 - s)),  du = dy * g * s
(the C++ kernel's formulas; nothing but gate and up is saved for the backward).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._aot import TYPES, Specialization
from ._interpreter import interpreted_bf16
from .gelu import BLOCK


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(tl.minimum(-g, 80.0)))            # capped: exp(-g) for g << 0 would overflow
    tl.store(y_ptr + offs, (g * s * u).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(tl.minimum(-g, 80.0)))
    tl.store(dg_ptr + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, (dy * g * s).to(du_ptr.dtype.element_ty), mask=mask)


def _check(gate: torch.Tensor) -> None:
    if gate.dtype == torch.float64:
        raise TypeError("gate: the Triton SwiGLU supports float32, float16 and bfloat16, got float64")


@torch.library.custom_op("gptfast_triton::swiglu_fwd", mutates_args=())
def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    _check(gate)
    if interpreted_bf16(gate):
        return swiglu_fwd(gate.float(), up.float()).to(gate.dtype)
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, y, n, BLOCK=BLOCK)
    return y


@torch.library.custom_op("gptfast_triton::swiglu_bwd", mutates_args=())
def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check(gate)
    if interpreted_bf16(gate):
        dg, du = swiglu_bwd(dy.float(), gate.float(), up.float())
        return dg.to(gate.dtype), du.to(up.dtype)
    dy, gate, up = dy.contiguous(), gate.contiguous(), up.contiguous()
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](dy, gate, up, dg, du, n, BLOCK=BLOCK)
    return dg, du


def aot_specializations(full: bool) -> list[Specialization]:
    out = []
    for dt in (list(TYPES) if full else ["float32"]):
        t = TYPES[dt]
        types = {"g_ptr": f"*{t}", "u_ptr": f"*{t}", "y_ptr": f"*{t}", "dy_ptr": f"*{t}", "dg_ptr": f"*{t}",
                 "du_ptr": f"*{t}", "n": "i32"}
        for kernel, name in ((_swiglu_fwd_kernel, "swiglu_fwd"), (_swiglu_bwd_kernel, "swiglu_bwd")):
            out.append(Specialization(name, kernel, types, {"BLOCK": BLOCK}, label=f"{dt} BLOCK{BLOCK}"))
    return out
