"""The linear layers of inference: `linear` (float32 weights), `linear_int8` and `linear_bf16` (weight-only
quantized weights, gptfast.quantize).

    y = x (..., K) @ W (N, K)^T [* scales (N,)] [+ bias (N,)]

Decoding makes x a few rows (one per sequence), so the product is bound by reading W: a token reads every
weight once. The kernels (csrc/cpu/linear.cpp, csrc/cuda/linear.cu, ops/triton/linear.py) read W once for all
rows of x, widen int8/bfloat16 weights to float32 in registers (no float32 copy of W anywhere) and apply the
per-row int8 scale (absmax / 127 of the row) to each output. In training (autograd, autocast, FSDP's DTensors)
every backend runs F.linear: these ops have no backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import autocast_on, check_floating
from .registry import get_backend
from .spec import BadInput, Bench, Case, Kernel, Op, element_size, randn, register

MAX_KERNEL_ROWS = 16     # rows of x the decoding kernels take (a batch of sequences); more: a GEMM (F.linear)


def check_linear_inputs(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None,
                        bias: torch.Tensor | None, weight_dtype: torch.dtype | None) -> None:
    """x (..., K) floating; weight (N, K) of `weight_dtype` (None: x's dtype) on x's device; scales
    (N,) float32 (int8 weights need them); bias (N,) of x's dtype."""
    check_floating("x", x)
    if x.ndim < 1:
        raise ValueError("x must have shape (..., K), got a 0-dim tensor")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    want = weight_dtype or x.dtype
    if weight.dtype != want:
        raise TypeError(f"weight must be {want}" + ("" if weight_dtype else " (x's dtype)") + f", got {weight.dtype}")
    if weight.ndim != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape (N, K) with K = x's last dim ({x.shape[-1]}), got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    N = weight.shape[0]
    for name, t, dtype in (("scales", scales, torch.float32), ("bias", bias, x.dtype)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
        if t.shape != (N,):
            raise ValueError(f"{name} must have shape ({N},) - one per output row of weight - got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _needs_autograd(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_inference(op: str, x: torch.Tensor) -> None:
    if _needs_autograd(x):
        raise RuntimeError(f"{op} is for inference: x requires grad, but quantized weights are frozen and the op has "
                           "no backward (train the float32 model, quantize it afterwards; or run under torch.no_grad())")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           backend: str | None = None) -> torch.Tensor:
    """nn.Linear: x (..., K) @ weight (N, K)^T + bias (N,) -> (..., N).

    The backends differ for inference only - decoding, where x has a few rows and the layer is a
    matrix-vector product bound by reading the weights (`extension` on CPU: our kernel, csrc/cpu/linear.cpp).
    Whenever autograd needs the result (training), under autocast, or for a weight that is not a plain
    tensor (a DTensor of FSDP), every backend runs `F.linear`, so training is PyTorch's own GEMM whatever
    the backend."""
    if (_needs_autograd(x, weight, bias) or autocast_on(x.device.type)
            or type(weight) not in (torch.Tensor, torch.nn.Parameter)):
        return F.linear(x, weight, bias)                         # (autocast: x and weight may differ in dtype)
    check_linear_inputs(x, weight, None, bias, None)
    return get_backend(backend).linear(x, weight, bias)


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                backend: str | None = None) -> torch.Tensor:
    """A linear layer with int8 weights: x (..., K) @ (weight (N, K) int8 * scales (N,) float32)^T + bias.

    Weight-only quantization (gptfast.quantize): one scale per output row, activations and the math in
    x's precision. Inference only (no backward)."""
    if scales is None:
        raise ValueError("linear_int8 needs scales: one float32 per output row of weight")
    check_linear_inputs(x, weight, scales, bias, torch.int8)
    _check_inference("linear_int8", x)
    return get_backend(backend).linear_int8(x, weight, scales, bias)


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                backend: str | None = None) -> torch.Tensor:
    """A linear layer with bfloat16 weights and the math in x's precision (float32): half the bytes of
    float32 weights to read. Inference only (no backward)."""
    check_linear_inputs(x, weight, None, bias, torch.bfloat16)
    _check_inference("linear_bf16", x)
    return get_backend(backend).linear_bf16(x, weight, bias)


# ----------------------------------------------------------------------------- the textbook and PyTorch's
def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T + bias: each output is the dot product of a row of x with a row of weight."""
    y = x @ weight.t()                                            # (..., N)
    return y + bias if bias is not None else y


def dequantize_int8(weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 weight (N, K) * scales (N,) -> (N, K) in `dtype`: row n is weight[n] * scales[n]."""
    return weight.to(dtype) * scales.to(dtype).unsqueeze(1)


def reference_int8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
    """Weight-only int8: dequantize the weights to x's dtype, then the plain linear layer."""
    return reference(x, dequantize_int8(weight, scales, x.dtype), bias)


def reference_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """bfloat16 weights widened to x's dtype (exact), then the plain linear layer."""
    return reference(x, weight.to(x.dtype), bias)


def torch_twin(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def _int8pack_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """aten._weight_int8pack_mm's rules: a CPU op whose vectorized path takes bfloat16 activations
    (float32 ones take a scalar loop, ~13x slower than F.linear), K a multiple of 16."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and weight.shape[1] % 16 == 0


def torch_twin_int8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
    """aten._weight_int8pack_mm where its rules allow, else what a user would write (gpt-fast's recipe:
    widen the weights to x's dtype, then scale the outputs)."""
    if _int8pack_applies(x, weight):
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(),
                                              scales.to(x.dtype)).view(*x.shape[:-1], weight.shape[0])
        return y + bias if bias is not None else y
    y = F.linear(x, weight.to(x.dtype)) * scales.to(x.dtype)
    return y + bias if bias is not None else y


def torch_twin_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    return F.linear(x, weight if x.dtype == torch.bfloat16 else weight.to(x.dtype), bias)


# ----------------------------------------------------------------------------- the compiled kernels' contract
def _fake(x, weight, scales, bias):
    return torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device)


def _kernel_takes(backend: str, x: torch.Tensor) -> bool:
    """Our C++ kernels take float32 activations on CPU, float32/bfloat16/float16 on CUDA; the Triton kernel any
    of those (on a GPU, or CPU tensors in its interpreter)."""
    if backend == "triton":
        return True
    return x.dtype == torch.float32 or (x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16))


def _compiled(fallback, with_scales: bool):
    def make(k, backend: str):
        def run(x, weight, *rest):
            scales, bias = (rest[0], rest[1] if len(rest) > 1 else None) if with_scales else \
                (None, rest[0] if rest else None)
            if not _kernel_takes(backend, x):          # e.g. bfloat16 activations on CPU: PyTorch's own op
                return fallback(x, weight, *rest)
            return k.linear_fwd(x, weight, scales, bias)
        return run
    return make


# ----------------------------------------------------------------------------- cases
def weights_of_kind(kind: str, w64: torch.Tensor):
    """(weight, scales) of storage `kind` from float64 values; int8: symmetric per row, scale = absmax / 127 (as
    gptfast.quantize makes them)."""
    if kind == "int8":
        scales = (w64.abs().amax(1) / 127).clamp_min(1e-12)
        return torch.round(w64 / scales[:, None]).clamp(-127, 127).to(torch.int8), scales.float()
    return (w64.to(torch.bfloat16), None) if kind == "bf16" else (w64, None)


def _rowwise(kind: str):
    def run(backend: str, x: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(x.shape[-1])
        w, scales = weights_of_kind(kind, randn(g, 48, x.shape[-1], scale=x.shape[-1] ** -0.5))
        b = randn(g, 48).to(x.dtype)
        with torch.no_grad():
            if kind == "int8":
                return linear_int8(x, w, scales, b, backend=backend)
            return linear_bf16(x, w, b, backend=backend) if kind == "bf16" else linear(x, w.to(x.dtype), b, backend=backend)
    return run


def _case(kind: str, M: int, K: int, N: int, view: str = "", bias: bool = True, found: str = "") -> Case:
    """x (M, K) @ weight (N, K)^T [+ bias]; the weight quantized from float64 values once (int8, bf16) and kept
    as built (not rounded to the run's dtype); view "strided": x, the weight (float32) and the scales and bias
    are views (every other column / element) of leaves twice as large."""
    s = 2 if view == "strided" else 1
    g = torch.Generator().manual_seed(M * 31 + K * 7 + N)
    w64 = randn(g, N, K * s, scale=K ** -0.5)
    stored, scales = weights_of_kind(kind, w64) if kind != "float32" else (None, None)
    if scales is not None and s == 2:
        scales = torch.stack([scales, torch.full_like(scales, 1e6)], 1).flatten()   # every other one is garbage

    def build(g):
        leaves = {"x": randn(g, M, K * s)}
        if kind == "float32":
            leaves["weight"] = w64
        if bias:
            leaves["bias"] = randn(g, N * s, scale=0.1)
        return leaves

    def call(backend, t):
        x = t["x"][:, ::s]
        b = t["bias"][::s] if bias else None
        if kind == "float32":
            return linear(x, t["weight"][:, ::s], b, backend=backend)
        w = t["qweight"][:, ::s]
        if kind == "int8":
            return linear_int8(x, w, t["scales"][::s], b, backend=backend)
        return linear_bf16(x, w, b, backend=backend)
    extra = {} if kind == "float32" else {"qweight": stored, **({"scales": scales} if scales is not None else {})}
    label = f"{M}x{K} @ {N}x{K} {kind}" + (f" {view}" if view else "") + ("" if bias else " no bias")
    return Case(label, build, call, extra=extra, found=found)


def _cases(kind: str):
    def cases(quick: bool) -> list[Case]:
        found = "strided x, weight, scales and bias: the Triton kernel once read scales and bias as if packed"
        return [_case(kind, 1, 768, 300), _case(kind, 7, 33, 129, found="K with no whole vector"),
                _case(kind, 16, 96, 1023, bias=False), _case(kind, 3, 40, 50, view="strided", found=found),
                _case(kind, 20, 64, 48, found="more rows than the decoding kernels take: a GEMM")]
    return cases


def _bad_inputs(kind: str):
    def bad_inputs() -> list[BadInput]:
        x = torch.randn(2, 8)
        w = {"float32": torch.randn(4, 8), "int8": torch.ones(4, 8, dtype=torch.int8),
             "bf16": torch.randn(4, 8).bfloat16()}[kind]
        call = {"float32": lambda *a, **k: linear(*a, **k), "bf16": lambda *a, **k: linear_bf16(*a, **k),
                "int8": lambda x, w, b=None: linear_int8(x, w, torch.ones(4), b)}[kind]
        out = [BadInput(lambda: call(x, w[:, :5]), ValueError, r"weight must have shape \(N, K\) with K = x's last dim"),
               BadInput(lambda: call(x.long(), w), TypeError, "x must be a floating-point tensor"),
               BadInput(lambda: call(x, w, torch.ones(3)), ValueError, r"bias must have shape \(4,\)"),
               BadInput(lambda: call(x, w, torch.ones(4).double()), TypeError, "bias must be torch.float32")]
        if kind == "int8":
            out += [BadInput(lambda: linear_int8(x, w, None), ValueError, "linear_int8 needs scales"),
                    BadInput(lambda: linear_int8(x, w, torch.ones(4).half()), TypeError, "scales must be torch.float32"),
                    BadInput(lambda: linear_int8(x, w.float(), torch.ones(4)), TypeError, "weight must be torch.int8"),
                    BadInput(lambda: linear_int8(x.requires_grad_(), w, torch.ones(4)), RuntimeError,
                             "linear_int8 is for inference")]
        return out
    return bad_inputs


# a GPT-2 decoding step: batch 1 and 8 through the MLP's two layers and the LM head; (M, K, N)
DECODE_SHAPES = [(1, 768, 3072), (1, 3072, 768), (1, 768, 50257), (8, 768, 3072), (8, 768, 50257)]


def _bench(kind: str):
    def bench(key: str, shape: tuple) -> Bench:
        M, K, N = shape

        def inputs(g):
            x, w, b = randn(g, M, K), randn(g, N, K, scale=0.05), randn(g, N)
            if kind == "float32":
                return [x, w, b], ()
            qw, scales = weights_of_kind(kind, w)
            return [x, b], (qw,) + ((scales,) if scales is not None else ())

        def call(*args, backend):
            if kind == "float32":
                return linear(*args, backend=backend)
            x, b, w, *scales = args
            return linear_int8(x, w, scales[0], b, backend=backend) if kind == "int8" else \
                linear_bf16(x, w, b, backend=backend)

        def work(dtype, mode):                 # the weights, x, bias and y once each
            size = element_size(dtype)
            weight_size = {"float32": size, "int8": 1, "bf16": 2}[kind]
            return N * K * weight_size + (N * 4 if kind == "int8" else 0) + (M * K + N + M * N) * size
        # the op is bound by reading the weights: bench_ops reads them from memory, each call the next of enough
        # copies to overflow the caches (the argument at `weight_arg`)
        return Bench(key, shape, inputs, call, work, weight_arg=1 if kind == "float32" else 2)
    return bench


def _register(name: str, function, ref, twin, kind: str):
    register(Op(name, function, ref, twin, _cases(kind), _bad_inputs(kind),
                lambda device_type, quick, sweep: {name: [(1, 256, 512)] if quick else list(DECODE_SHAPES)},
                _bench(kind), kernels={"linear_fwd": Kernel(_fake)} if kind == "float32" else {},
                compiled=_compiled(twin, with_scales=kind == "int8"), inference_only=True,
                rowwise=_rowwise(kind), module=__name__))


_register("linear", linear, reference, torch_twin, "float32")
_register("linear_int8", linear_int8, reference_int8, torch_twin_int8, "int8")
_register("linear_bf16", linear_bf16, reference_bf16, torch_twin_bf16, "bf16")
