"""SwiGLU, the feed-forward activation of Llama and Qwen3: the gate's SiLU times the up projection.

    swiglu(gate, up) = silu(gate) * up = gate * sigmoid(gate) * up          elementwise

The feed-forward is then down(swiglu(gate(x), up(x))). Kernels: csrc/cpu/swiglu.cpp, csrc/cuda/swiglu.cu,
ops/triton/swiglu.py: one pass reads gate and up and writes y (the textbook's silu(gate) temporary is never
written, read back or kept); the backward recomputes sigmoid(gate) from the inputs, which are all it saves:
dgate = dy * up * s * (1 + gate * (1 - s)), dup = dy * gate * s, s = sigmoid(gate). gate and up may be the two
halves of one stacked projection (views with a row stride).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_floating, check_like
from .registry import get_backend
from .spec import BadInput, Bench, Case, Kernel, Op, element_size, randn, register


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up, elementwise; gate and up of the same shape, dtype and device."""
    check_floating("gate", gate)
    check_like("up", up, "gate", gate)
    if up.shape != gate.shape:
        raise ValueError(f"up must have gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
    return get_backend(backend).swiglu(gate, up)


# ----------------------------------------------------------------------------- the textbook and PyTorch's
def reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate * sigmoid(gate) * up, as the Llama paper writes it (Swish_1(xW) * xV)."""
    return gate * torch.sigmoid(gate) * up


def torch_twin(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


# ----------------------------------------------------------------------------- the compiled kernels' contract
def _fake_fwd(gate, up):
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


def _fake_bwd(dy, gate, up):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (gate, up))


def _autograd(bwd):
    """Saves the inputs alone; the backward recomputes sigmoid(gate)."""
    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return bwd(dy, gate, up)

    return setup, backward


def compiled(k, backend: str):
    def swiglu(gate, up):
        return k.swiglu_fwd(gate, up)
    return swiglu


# ----------------------------------------------------------------------------- cases
def _case(shape: tuple, view: str = "", small: bool = True, big: bool = False, found: str = "") -> Case:
    """gate, up of `shape`. view "stacked": both halves of one (..., 2F) leaf, the output of a stacked gate/up
    projection (rows with a stride); "transposed": leaves of the reversed shape seen through .t()."""
    F_ = shape[-1]

    def build(g):
        if view == "stacked":
            return {"gate_up": randn(g, *shape[:-1], 2 * F_, scale=2.0)}
        leaf = shape[::-1] if view == "transposed" else shape
        return {"gate": randn(g, *leaf, scale=2.0), "up": randn(g, *leaf)}

    def call(backend, t):
        if view == "stacked":
            gate, up = t["gate_up"][..., :F_], t["gate_up"][..., F_:]
        else:
            gate, up = (t["gate"].t(), t["up"].t()) if view == "transposed" else (t["gate"], t["up"])
        return swiglu(gate, up, backend=backend)
    return Case("x".join(map(str, shape)) + (f" {view}" if view else ""), build, call, small=small, big=big,
                found=found)


def cases(quick: bool) -> list[Case]:
    tail = "a partial last vector (the tail must round as the vector loop does)"
    out = [_case((7, 1023), found=tail), _case((1, 33), found=tail), _case((64, 3072)), _case((1, 7), found=tail),
           _case((2, 5, 80)), _case((129, 80), "transposed", found="non-contiguous inputs"),
           _case((6, 96), "stacked", found="gate and up as the halves of one stacked projection")]
    if not quick:
        out += [_case((2048, 3072), small=False, big=True)]
    return out


def bad_inputs() -> list[BadInput]:
    g = torch.randn(2, 8)
    return [BadInput(lambda: swiglu(g, g[:, :4]), ValueError, r"up must have gate's shape \(2, 8\)"),
            BadInput(lambda: swiglu(g, g.double()), TypeError, "up has dtype torch.float64 but gate has"),
            BadInput(lambda: swiglu(g.long(), g.long()), TypeError, "gate must be a floating-point tensor"),
            BadInput(lambda: swiglu(g, g.to("meta")), ValueError, "up is on meta but gate is on cpu")]


def bench_shapes(device_type: str, quick: bool, sweep: bool) -> dict:
    if quick:
        return {"swiglu": [(8 * 64, 3072)]}
    return {"swiglu": [(4 * 512, 3072), (8 * 512, 3072)] + ([(8 * 512, F_) for F_ in (8192,)] if sweep else [])}


def bench(key: str, shape: tuple) -> Bench:
    def work(dtype, mode):            # read gate, up, write y; the backward reads dy, gate, up, writes dgate, dup
        return shape[0] * shape[1] * element_size(dtype) * (8 if mode == "fwd+bwd" else 3)
    return Bench(key, shape, lambda g: ([randn(g, *shape, scale=2.0), randn(g, *shape)], ()),
                 lambda gate, up, backend: swiglu(gate, up, backend=backend), work)


def _rowwise(backend: str, x: torch.Tensor) -> torch.Tensor:
    return swiglu(x, x * 0.5 + 0.25, backend=backend)          # up: a function of each element alone


def peers(name: str, key: str):
    if name == "liger":
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return LigerSiLUMulFunction.apply
    return None


register(Op("swiglu", swiglu, reference, torch_twin, cases, bad_inputs, bench_shapes, bench,
            kernels={"swiglu_fwd": Kernel(_fake_fwd, _autograd, "swiglu_bwd"), "swiglu_bwd": Kernel(_fake_bwd)},
            compiled=compiled, rowwise=_rowwise, elementwise=True, peers=peers, native_16bit=True, module=__name__))
