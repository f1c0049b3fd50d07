"""LayerNorm: each row (the last dim, C features of one token) to zero mean and unit variance, then scaled and
shifted by learned weight and bias.

    y = (x - mean) / sqrt(var + eps) * weight + bias        mean, var over the row (biased: divide by C)

Kernels: csrc/cpu/layer_norm.cpp, csrc/cuda/layer_norm.cu, ops/triton/layer_norm.py. One pass over x computes
the row's statistics and y; the forward also returns mean and rstd = 1 / sqrt(var + eps) (float32), which the
backward reads instead of recomputing them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_floating, check_like
from .registry import get_backend
from .spec import BadInput, Bench, Case, Kernel, Op, element_size, randn, register, stat_dtype


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
               backend: str | None = None) -> torch.Tensor:
    """LayerNorm over the last dim of x (..., C) with weight, bias of shape (C,)."""
    check_floating("x", x)
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    C = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        check_like(name, p, "x", x)
        if p.shape != (C,):
            raise ValueError(f"{name} must have shape ({C},) to match x's last dim, got {tuple(p.shape)}")
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    return get_backend(backend).layer_norm(x, weight, bias, eps)


# ----------------------------------------------------------------------------- the textbook and PyTorch's
def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Normalize each row over the last dim to zero mean, unit (biased) variance; then scale, shift."""
    mean = x.mean(dim=-1, keepdim=True)                         # (..., 1)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)          # biased: divide by C, not C - 1
    return (x - mean) / torch.sqrt(var + eps) * weight + bias   # (..., C)


def torch_twin(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


# ----------------------------------------------------------------------------- the compiled kernels' contract
def _fake_fwd(x, weight, bias, eps):
    stats = x.shape[:-1]
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty(stats, dtype=stat_dtype(x.dtype),
            device=x.device), torch.empty(stats, dtype=stat_dtype(x.dtype), device=x.device))


def _fake_bwd(dy, x, weight, mean, rstd):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (x, weight, weight))


def _autograd(bwd):
    """Saves x, weight and the forward's mean and rstd; the statistics get no gradient (and autograd does not
    materialize zero-filled ones for them)."""
    def setup(ctx, inputs, output):
        x, weight, _bias, _eps = inputs
        _y, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)

    def backward(ctx, dy, _dmean, _drstd):
        if dy is None:
            return None, None, None, None
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = bwd(dy, x, weight, mean, rstd)
        return dx, dweight, dbias, None

    return setup, backward


def compiled(k, backend: str):
    def layer_norm(x, weight, bias, eps=1e-5):
        return k.layer_norm_fwd(x, weight, bias, eps)[0]
    return layer_norm


# ----------------------------------------------------------------------------- cases
def _case(rows: int, C: int, view: str = "", small: bool = True, big: bool = False, found: str = "") -> Case:
    """x (rows, C) with a non-zero mean. view "transposed": x is a (C, rows) leaf seen through .t();
    "strided params": weight and bias are every other element of leaves twice as long."""
    def build(g):
        return {"x": randn(g, *((C, rows) if view == "transposed" else (rows, C)), scale=2.0, shift=0.5),
                "weight": randn(g, C * (2 if view == "strided params" else 1), scale=0.5, shift=1.0),
                "bias": randn(g, C * (2 if view == "strided params" else 1), scale=0.5)}

    def call(backend, t):
        x = t["x"].t() if view == "transposed" else t["x"]
        w, b = (t["weight"][::2], t["bias"][::2]) if view == "strided params" else (t["weight"], t["bias"])
        return layer_norm(x, w, b, backend=backend)
    return Case(f"{rows}x{C}" + (f" {view}" if view else ""), build, call, small=small, big=big, found=found)


def cases(quick: bool) -> list[Case]:
    out = [_case(64, 768), _case(33, 1023, found="a row width with a partial last vector"), _case(16, 1600),
           _case(1, 768), _case(9, 40), _case(48, 768, "transposed", found="non-contiguous rows"),
           _case(5, 129, "strided params", found="strided weight and bias")]
    if not quick:
        out += [_case(2048, 768, small=False, big=True), _case(2048, 1600, small=False, big=True)]
    return out


def bad_inputs() -> list[BadInput]:
    x, w = torch.randn(2, 8), torch.randn(8)
    return [BadInput(lambda: layer_norm(x, w[:4], w), ValueError, r"weight must have shape \(8,\)"),
            BadInput(lambda: layer_norm(x, w, w.double()), TypeError, "bias has dtype torch.float64 but x has"),
            BadInput(lambda: layer_norm(x.long(), w, w), TypeError, "x must be a floating-point tensor"),
            BadInput(lambda: layer_norm(x, w, w, eps=0.0), ValueError, "eps must be positive"),
            BadInput(lambda: layer_norm(x[:, :0], w[:0], w[:0]), ValueError, "x must have a non-empty last dimension"),
            BadInput(lambda: layer_norm(x, w.to("meta"), w), ValueError, "weight is on meta but x is on cpu")]


ROWS = [(8 * 256, 768), (8 * 1024, 768)]            # GPT-2 small's hidden states at B8 x T256 / T1024


def bench_shapes(device_type: str, quick: bool, sweep: bool) -> dict:
    if quick:
        return {"layer_norm": [(8 * 64, 768)]}
    return {"layer_norm": ROWS + ([(8 * 1024, C) for C in (1024, 1600, 2048, 4096)] if sweep else [])}


def bench(key: str, shape: tuple) -> Bench:
    N, C = shape

    def work(dtype, mode):            # read x, write y; the backward counted as twice that
        return N * C * element_size(dtype) * (4 if mode == "fwd+bwd" else 2)
    return Bench(key, shape, lambda g: ([randn(g, N, C, scale=2.0, shift=1.0), randn(g, C), randn(g, C)], ()),
                 lambda x, w, b, backend: layer_norm(x, w, b, backend=backend), work)


def _rowwise(backend: str, x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(x.shape[-1])
    w, b = (randn(g, x.shape[-1]).to(x.dtype) for _ in range(2))
    return layer_norm(x, w, b, backend=backend)


def peers(name: str, key: str):
    if name == "liger":
        from liger_kernel.transformers.functional import liger_layer_norm

        return lambda x, w, b: liger_layer_norm(x, w, b, 1e-5)
    return None


register(Op("layer_norm", layer_norm, reference, torch_twin, cases, bad_inputs, bench_shapes, bench,
            kernels={"layer_norm_fwd": Kernel(_fake_fwd, _autograd, "layer_norm_bwd"),
                     "layer_norm_bwd": Kernel(_fake_bwd)},
            compiled=compiled, rowwise=_rowwise, peers=peers, native_16bit=True, module=__name__))
