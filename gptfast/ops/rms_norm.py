"""RMSNorm, the norm of Llama and Qwen3: each row (the last dim) divided by its root mean square, then scaled by a
learned weight. No mean is subtracted and there is no bias.

    y = x / sqrt(mean(x^2) + eps) * weight                  mean over the row

Qwen3 also applies it to each head's queries and keys (rows of head_dim). Kernels: csrc/cpu/rms_norm.cpp,
csrc/cuda/rms_norm.cu, ops/triton/rms_norm.py. One pass over x gives the row's sum of squares, a second writes y;
the forward returns rstd = 1 / sqrt(mean(x^2) + eps) (float32, one per row), which the backward reads:
dx = rstd * (g - xhat * mean(g * xhat)) with xhat = x * rstd, g = dy * weight; dweight = sum of dy * xhat.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_floating, check_like
from .registry import get_backend
from .spec import BadInput, Bench, Case, Kernel, Op, element_size, randn, register, stat_dtype


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str | None = None) -> torch.Tensor:
    """RMSNorm over the last dim of x (..., C) with weight of shape (C,)."""
    check_floating("x", x)
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    check_like("weight", weight, "x", x)
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must have shape ({x.shape[-1]},) to match x's last dim, got {tuple(weight.shape)}")
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    return get_backend(backend).rms_norm(x, weight, eps)


# ----------------------------------------------------------------------------- the textbook and PyTorch's
def reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each row over its root mean square (no mean subtracted), then scaled."""
    rms = torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps)  # (..., 1)
    return x / rms * weight                                     # (..., C)


def torch_twin(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


# ----------------------------------------------------------------------------- the compiled kernels' contract
def _fake_fwd(x, weight, eps):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(x.shape[:-1], dtype=stat_dtype(x.dtype), device=x.device))


def _fake_bwd(dy, x, weight, rstd):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty(weight.shape, dtype=weight.dtype,
                                                                             device=weight.device)


def _autograd(bwd):
    """Saves x, weight and the forward's rstd (no gradient for it)."""
    def setup(ctx, inputs, output):
        x, weight, _eps = inputs
        ctx.save_for_backward(x, weight, output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    def backward(ctx, dy, _drstd):
        if dy is None:
            return None, None, None
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = bwd(dy, x, weight, rstd)
        return dx, dweight, None

    return setup, backward


def compiled(k, backend: str):
    def rms_norm(x, weight, eps=1e-6):
        return k.rms_norm_fwd(x, weight, eps)[0]
    return rms_norm


# ----------------------------------------------------------------------------- cases
def _case(shape: tuple, view: str = "", small: bool = True, big: bool = False, found: str = "") -> Case:
    """x of `shape`, rows on its last dim. view "transposed": x is a leaf of the reversed 2-D shape seen through
    .t(); "strided weight": weight is every other element of a leaf twice as long; "heads": x (B, T, H, hs) seen
    as a (B, H, T, hs) transpose, as Qwen3 normalizes each head's queries."""
    C = shape[-1]

    def build(g):
        leaf = shape[::-1] if view == "transposed" else shape
        return {"x": randn(g, *leaf, scale=2.0, shift=0.3),
                "weight": randn(g, C * (2 if view == "strided weight" else 1), scale=0.5, shift=1.0)}

    def call(backend, t):
        x = t["x"].t() if view == "transposed" else t["x"].transpose(1, 2) if view == "heads" else t["x"]
        w = t["weight"][::2] if view == "strided weight" else t["weight"]
        return rms_norm(x, w, backend=backend)
    label = "x".join(str(s) for s in shape) + (f" {view}" if view else "")
    return Case(label, build, call, small=small, big=big, found=found)


def cases(quick: bool) -> list[Case]:
    out = [_case((64, 1024)), _case((33, 1023), found="a row width with a partial last vector"), _case((16, 2048)),
           _case((1, 1024)), _case((9, 40)), _case((48, 768), "transposed", found="non-contiguous rows"),
           _case((5, 129), "strided weight", found="a strided weight"),
           _case((2, 7, 4, 128), "heads", found="per-head rows of a transposed (B, H, T, hs) view (Qwen3's q/k norm)"),
           _case((3, 80), found="head_dim 80")]
    if not quick:
        out += [_case((4096, 1024), small=False, big=True), _case((2048, 2048), small=False, big=True)]
    return out


def bad_inputs() -> list[BadInput]:
    x, w = torch.randn(2, 8), torch.randn(8)
    return [BadInput(lambda: rms_norm(x, w[:4]), ValueError, r"weight must have shape \(8,\)"),
            BadInput(lambda: rms_norm(x, w.double()), TypeError, "weight has dtype torch.float64 but x has"),
            BadInput(lambda: rms_norm(x.long(), w), TypeError, "x must be a floating-point tensor"),
            BadInput(lambda: rms_norm(x, w, eps=0.0), ValueError, "eps must be positive"),
            BadInput(lambda: rms_norm(x[:, :0], w[:0]), ValueError, "x must have a non-empty last dimension"),
            BadInput(lambda: rms_norm(x, w.to("meta")), ValueError, "weight is on meta but x is on cpu")]


ROWS = [(4 * 512, 1024), (8 * 512, 1024)]           # Qwen3-0.6B's hidden states at B4/B8 x T512


def bench_shapes(device_type: str, quick: bool, sweep: bool) -> dict:
    if quick:
        return {"rms_norm": [(8 * 64, 1024)]}
    return {"rms_norm": ROWS + [(8 * 512 * 16, 128)] + ([(8 * 512, C) for C in (768, 2048, 4096)] if sweep else [])}


def bench(key: str, shape: tuple) -> Bench:
    N, C = shape

    def work(dtype, mode):            # read x, write y; the backward reads x and dy, writes dx
        return N * C * element_size(dtype) * (5 if mode == "fwd+bwd" else 2)
    return Bench(key, shape, lambda g: ([randn(g, N, C, scale=2.0, shift=0.3), randn(g, C)], ()),
                 lambda x, w, backend: rms_norm(x, w, backend=backend), work)


def _rowwise(backend: str, x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(x.shape[-1])
    return rms_norm(x, randn(g, x.shape[-1]).to(x.dtype), backend=backend)


def peers(name: str, key: str):
    if name == "liger":
        from liger_kernel.transformers.functional import liger_rms_norm

        return lambda x, w: liger_rms_norm(x, w, 1e-6)
    return None


register(Op("rms_norm", rms_norm, reference, torch_twin, cases, bad_inputs, bench_shapes, bench,
            kernels={"rms_norm_fwd": Kernel(_fake_fwd, _autograd, "rms_norm_bwd"), "rms_norm_bwd": Kernel(_fake_bwd)},
            compiled=compiled, rowwise=_rowwise, peers=peers, native_16bit=True, module=__name__))
