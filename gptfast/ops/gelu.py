"""GELU, the feed-forward network's activation (GPT-2 uses the tanh approximation).

    gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))          elementwise

Kernels: csrc/cpu/gelu.cpp (C++, AVX2 and AVX-512 builds), csrc/cuda/gelu.cu, ops/triton/gelu.py. They compute
0.5 (1 + tanh(u)) as sigmoid(2u) = 1 / (1 + exp(-2u)) - one exp instead of a tanh - and their backward
recomputes from x (nothing but x is saved).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .checks import check_floating
from .registry import get_backend
from .spec import BadInput, Bench, Case, Kernel, Op, element_size, randn, register


def gelu(x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """GELU with the tanh approximation, elementwise; x of any shape."""
    check_floating("x", x)
    return get_backend(backend).gelu(x)


# ----------------------------------------------------------------------------- the textbook and PyTorch's
def reference(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as written in GPT-2."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def torch_twin(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# ----------------------------------------------------------------------------- the compiled kernels' contract
def _fake_fwd(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _fake_bwd(dy, x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _autograd(bwd):
    """Only x is saved; the backward recomputes the activation's slope from it."""
    def setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return bwd(dy, x)

    return setup, backward


def compiled(k, backend: str):
    def gelu(x):
        return k.gelu_fwd(x)
    return gelu


# ----------------------------------------------------------------------------- cases
def _case(shape: tuple, view: str = "", small: bool = True, big: bool = False, found: str = "") -> Case:
    """x of `shape`; view "transposed": a leaf of the reversed shape seen through .t(); "every other": the
    even columns of a leaf twice as wide (a strided last dim)."""
    def build(g):
        leaf = shape[::-1] if view == "transposed" else (*shape[:-1], 2 * shape[-1]) if view == "every other" \
            else shape
        return {"x": randn(g, *leaf, scale=2.0)}

    def call(backend, t):
        x = t["x"].t() if view == "transposed" else t["x"][..., ::2] if view == "every other" else t["x"]
        return gelu(x, backend=backend)
    return Case("x".join(map(str, shape)) + (f" {view}" if view else ""), build, call, small=small, big=big,
                found=found)


def cases(quick: bool) -> list[Case]:
    tail = "a partial last vector: the extension's scalar tail once rounded differently from its vector loop"
    out = [_case((7, 1023), found=tail), _case((2, 132), found=tail), _case((1, 33), found=tail),
           _case((64, 3072)), _case((1, 1600)), _case((1,)), _case((129, 80), "transposed"),
           _case((5, 33), "every other", found="a strided x")]
    if not quick:
        out += [_case((2048, 3072), small=False, big=True)]
    return out


def bad_inputs() -> list[BadInput]:
    return [BadInput(lambda: gelu(torch.arange(3)), TypeError, "x must be a floating-point tensor"),
            BadInput(lambda: gelu([1.0, 2.0]), TypeError, "x must be a torch.Tensor")]


ROWS = [(8 * 256, 768), (8 * 1024, 768)]            # GPT-2 small's hidden states at B8 x T256 / T1024


def bench_shapes(device_type: str, quick: bool, sweep: bool) -> dict:
    if quick:
        return {"gelu": [(8 * 64, 768)]}
    return {"gelu": ROWS + ([(8 * 1024, C) for C in (1024, 1600, 2048, 4096)] if sweep else [])}


def bench(key: str, shape: tuple) -> Bench:
    def work(dtype, mode):            # read x, write y; the backward counted as twice that
        return shape[0] * shape[1] * element_size(dtype) * (4 if mode == "fwd+bwd" else 2)
    return Bench(key, shape, lambda g: ([randn(g, *shape, scale=2.0)], ()), lambda x, backend: gelu(x, backend=backend),
                 work)


register(Op("gelu", gelu, reference, torch_twin, cases, bad_inputs, bench_shapes, bench,
            kernels={"gelu_fwd": Kernel(_fake_fwd, _autograd, "gelu_bwd"), "gelu_bwd": Kernel(_fake_bwd)},
            compiled=compiled, rowwise=lambda backend, x: gelu(x, backend=backend), elementwise=True, native_16bit=True,
            module=__name__))
