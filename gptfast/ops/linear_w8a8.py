"""The int8 x int8 linear layer of inference: `linear_w8a8` - int8 weights (gptfast.quantize) and the activations
quantized to int8 per row, on the fly.

    q, sx = quantize_rows(x)                 sx = absmax(row) / 127, q = round(x / sx)   (symmetric, per row)
    y = (q @ W^T) * sx * scales (N,) [+ bias (N,)]

`linear_int8` widens each int8 weight to float and multiplies it with float activations: one FMA per weight per
row of x, which at a batch of 8 sequences is compute-bound (a quarter of the read bandwidth, NOTES). Here the
products are integers summed exactly in int32 - 64 a `vpdpbusd` instruction on AVX-512 VNNI - so a batch of rows
costs little more than one. The price is the activations' rounding: ~0.4% of a row's largest value per element,
measured on the model's loss and tokens (benchmarks/quantize_quality.py, NOTES). Inference only.
"""
from __future__ import annotations

import torch

from .int8_rows import MAX_K, quantize_rows
from .linear import DECODE_SHAPES, check_linear_inputs, weights_of_kind
from .registry import get_backend
from .spec import BadInput, Bench, Case, Kernel, Op, randn, register



def linear_w8a8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                backend: str | None = None) -> torch.Tensor:
    """x (..., K), each row quantized to int8, @ (weight (N, K) int8 * scales (N,) float32)^T + bias (N,); y in x's
    dtype (our CPU kernel takes float32 x; 16-bit x is quantized from its float32 values by the PyTorch twin)."""
    if scales is None:
        raise ValueError("linear_w8a8 needs scales: one float32 per output row of weight")
    check_linear_inputs(x, weight, scales, bias, torch.int8)
    if x.shape[-1] > MAX_K:
        raise ValueError(f"x's last dim (K) must be at most {MAX_K} (the int32 sums), got {x.shape[-1]}")
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("linear_w8a8 is for inference: x requires grad, but the op has no backward")
    return get_backend(backend).linear_w8a8(x, weight, scales, bias)


# ----------------------------------------------------------------------------- the textbook and PyTorch's
def reference(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
    """The integer products summed exactly (in float64), then the two scales and the bias."""
    q, sx = quantize_rows(x)
    acc = q.double() @ weight.double().t()                         # (..., N): exact integers
    y = acc * sx.double() * scales.double()
    y = y + bias.double() if bias is not None else y
    return y.to(x.dtype)


def torch_twin(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
    """What a user would write with PyTorch's ops: quantize the rows, widen both to float32 and multiply
    (exact while K * 127^2 < 2^24), then scale."""
    q, sx = quantize_rows(x)
    y = (q @ weight.float().t()) * sx * scales
    return (y + bias if bias is not None else y).to(x.dtype)


# ----------------------------------------------------------------------------- the compiled kernel's contract
def _fake(x, weight, scales, bias, path=None):
    return torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device)


def compiled(k, backend: str):
    def linear_w8a8(x, weight, scales, bias):
        # our kernels take float32 (extension: C++ on CPU, CUDA on a GPU; triton: where Triton runs)
        if x.dtype != torch.float32:
            return torch_twin(x, weight, scales, bias)
        return k.linear_w8a8_fwd(x, weight, scales, bias)
    return linear_w8a8


# ----------------------------------------------------------------------------- cases
def _case(M: int, K: int, N: int, strided: bool = False, bias: bool = True, found: str = "") -> Case:
    """x (M, K) @ an int8 weight (N, K) quantized once from float64 values; `strided`: x, the weight, the scales and
    the bias every other element of leaves twice as large."""
    s = 2 if strided else 1
    g = torch.Generator().manual_seed(M * 31 + K * 7 + N)
    w, scales = weights_of_kind("int8", randn(g, N, K * s, scale=K ** -0.5))
    if strided:
        scales = torch.stack([scales, torch.full_like(scales, 1e6)], 1).flatten()   # every other one is garbage

    def build(g):
        return {"x": randn(g, M, K * s), **({"bias": randn(g, N * s, scale=0.1)} if bias else {})}

    def call(backend, t):
        b = t["bias"][::s] if bias else None
        return linear_w8a8(t["x"][:, ::s], t["qweight"][:, ::s], t["scales"][::s], b, backend=backend)
    label = f"{M}x{K} @ {N}x{K} w8a8" + (" strided" if strided else "") + ("" if bias else " no bias")
    return Case(label, build, call, extra={"qweight": w, "scales": scales}, found=found)


def cases(quick: bool) -> list[Case]:
    return [_case(1, 768, 300, found="one row: the 8-row tiles"),
            _case(7, 33, 129, found="K with no whole vector: the masked tail alone"),
            _case(16, 200, 1023, bias=False, found="4-row passes, N off the tile"),
            _case(3, 130, 50, strided=True, found="strided x, weight, scales and bias"),
            _case(20, 64, 48, found="more rows than a batch of sequences (a prompt chunk)")]


def bad_inputs() -> list[BadInput]:
    x, w, s = torch.randn(2, 8), torch.ones(4, 8, dtype=torch.int8), torch.ones(4)
    return [BadInput(lambda: linear_w8a8(x, w, None), ValueError, "linear_w8a8 needs scales"),
            BadInput(lambda: linear_w8a8(x, w[:, :5], s), ValueError, r"weight must have shape \(N, K\)"),
            BadInput(lambda: linear_w8a8(x, w.float(), s), TypeError, "weight must be torch.int8"),
            BadInput(lambda: linear_w8a8(x, w, s.half()), TypeError, "scales must be torch.float32"),
            BadInput(lambda: linear_w8a8(x, w, s, torch.ones(3)), ValueError, r"bias must have shape \(4,\)"),
            BadInput(lambda: linear_w8a8(x.long(), w, s, None), TypeError, "x must be a floating-point tensor"),
            BadInput(lambda: linear_w8a8(x.requires_grad_(), w, s), RuntimeError, "linear_w8a8 is for inference")]


def _rowwise(backend: str, x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(x.shape[-1])
    w, scales = weights_of_kind("int8", randn(g, 48, x.shape[-1], scale=x.shape[-1] ** -0.5))
    with torch.no_grad():
        return linear_w8a8(x, w, scales, randn(g, 48).to(x.dtype), backend=backend)


def bench(key: str, shape: tuple) -> Bench:
    M, K, N = shape

    def inputs(g):
        qw, scales = weights_of_kind("int8", randn(g, N, K, scale=0.05))
        return [randn(g, M, K), randn(g, N)], (qw, scales)

    def call(x, b, w, scales, backend):
        return linear_w8a8(x, w, scales, b, backend=backend)

    def work(dtype, mode):                     # the int8 weights and their scales, x, bias and y once each
        return N * K + 4 * N + (M * K + N + M * N) * 4
    return Bench(key, shape, inputs, call, work, weight_arg=2)


register(Op("linear_w8a8", linear_w8a8, reference, torch_twin, cases, bad_inputs,
            lambda device_type, quick, sweep: {"linear_w8a8": [(1, 256, 512)] if quick else list(DECODE_SHAPES)},
            bench, kernels={"linear_w8a8_fwd": Kernel(_fake)}, compiled=compiled, inference_only=True,
            rowwise=_rowwise, backends=("reference", "torch", "extension", "triton"), dtypes=("float32",),
            module=__name__))
