"""The 4-bit linear layer of inference: `linear_int4` - weights in 4 bits with a float32 scale per group of 32 or 64
along K (gptfast.quantize(model, "int4" | "int4-g64")), activations quantized to int8 per row (int8_rows.py).

    q, sx = quantize_rows(x)                                    (int8_rows.py)
    y[m, n] = sx[m] * sum_g scales[n, g] * sum_{k in g} q[m, k] w[n, k]   [+ bias[n]]

A token reads every weight once: 4 bits and a scale per 32 weights is 5 bits a weight (4.5 for groups of 64),
0.63x (0.56x) int8's bytes - the memory-bound step gets that much shorter. Storage (`pack_int4`): each group
symmetric, scale = absmax / 7, w = round(weight / scale) in [-7, 7] kept as the nibble w + 8; rows padded with zeros
to a multiple of 64; each 64 weights are 32 bytes, low nibbles weights 0..31, high nibbles 32..63 (the layout the
kernel unpacks with an AND and a shift: csrc/cpu/linear_int4.cpp). Inference only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_floating
from .linear import DECODE_SHAPES
from .int8_rows import MAX_K, quantize_rows
from .registry import get_backend
from .spec import BadInput, Bench, Case, Kernel, Op, randn, register


def padded_k(K: int) -> int:
    """K rounded up to a multiple of 64: the 4-bit rows and the int8 activation rows are padded with zeros to it."""
    return (K + 63) // 64 * 64


def pack_int4(weight: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) -> (packed uint8 (N, Kp / 2), scales float32 (N, Kp / group)), Kp = padded_k(K): each group of
    `group` weights along K symmetric, scale = absmax / 7 (an all-zero group: 1), q = round(w / scale) in [-7, 7],
    stored as the nibble q + 8 (the padding: zeros, nibble 8)."""
    if group not in (32, 64):
        raise ValueError(f"group must be 32 or 64, got {group}")
    w = weight.detach().double()
    N, K = w.shape
    Kp = padded_k(K)
    w = F.pad(w, (0, Kp - K)).view(N, Kp // group, group)
    absmax = w.abs().amax(dim=2)
    scales = torch.where(absmax > 0, absmax / 7.0, torch.ones_like(absmax)).float()   # (N, Kp / group)
    q = (torch.round(w / scales.double().unsqueeze(2)).clamp_(-7, 7) + 8).to(torch.uint8).view(N, Kp // 64, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(N, Kp // 2).contiguous(), scales.contiguous()


def unpack_int4(packed: torch.Tensor, scales: torch.Tensor, K: int, dtype: torch.dtype = torch.float32):
    """The weights (N, K) in `dtype` that pack_int4's (packed, scales) stand for: q * scale of each group."""
    N, Kp = packed.shape[0], packed.shape[1] * 2
    b = packed.view(N, Kp // 64, 1, 32)
    q = torch.cat([b & 0x0F, b >> 4], dim=2).reshape(N, Kp).to(dtype) - 8     # (N, Kp)
    group = Kp // scales.shape[1]
    return (q.view(N, Kp // group, group) * scales.to(dtype).unsqueeze(2)).view(N, Kp)[:, :K]


def linear_int4(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                backend: str | None = None) -> torch.Tensor:
    """x (..., K), each row quantized to int8, @ the 4-bit weight (packed (N, Kp / 2) uint8, scales (N, Kp / 32) or
    (N, Kp / 64) float32)^T + bias (N,); y in x's dtype."""
    check_floating("x", x)
    K = x.shape[-1] if x.ndim else 0
    Kp = padded_k(K)
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.uint8 or weight.ndim != 2 \
            or weight.shape[1] != Kp // 2:
        raise ValueError(f"weight must be packed 4-bit weights: uint8 (N, {Kp // 2}) for K = {K} (pack_int4), got "
                         f"{getattr(weight, 'dtype', type(weight))} {tuple(getattr(weight, 'shape', ()))}")
    N = weight.shape[0]
    if scales is None or scales.dtype != torch.float32 or scales.shape not in ((N, Kp // 32), (N, Kp // 64)):
        raise ValueError(f"scales must be float32 ({N}, {Kp // 32}) or ({N}, {Kp // 64}) - one per group of 32 or 64 "
                         f"- got {getattr(scales, 'dtype', None)} {tuple(getattr(scales, 'shape', ()))}")
    if weight.device != x.device or scales.device != x.device:
        raise ValueError(f"weight and scales must be on x's device {x.device}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dtype != x.dtype or bias.shape != (N,)
                             or bias.device != x.device):
        raise ValueError(f"bias must have shape ({N},) - one per output row - in x's dtype on its device, got "
                         f"{getattr(bias, 'dtype', type(bias))} {tuple(getattr(bias, 'shape', ()))}")
    if K > MAX_K:
        raise ValueError(f"x's last dim (K) must be at most {MAX_K} (the int32 sums), got {K}")
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("linear_int4 is for inference: x requires grad, but the op has no backward")
    return get_backend(backend).linear_int4(x, weight, scales, bias)


# ----------------------------------------------------------------------------- the textbook and PyTorch's
def reference(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
    """The rows quantized as the kernels do, times the unpacked 4-bit weights, in float64."""
    q, sx = quantize_rows(x)
    w = unpack_int4(weight, scales, x.shape[-1], torch.float64)
    y = (q.double() @ w.t()) * sx.double()
    return (y + bias.double() if bias is not None else y).to(x.dtype)


def torch_twin(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
    """What a user would write: unpack the weights to float32 every call, then a float matmul."""
    q, sx = quantize_rows(x)
    y = (q @ unpack_int4(weight, scales, x.shape[-1]).t()) * sx
    return (y + bias if bias is not None else y).to(x.dtype)


# ----------------------------------------------------------------------------- the compiled kernel's contract
def _fake(x, weight, scales, bias, path=None):
    return torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device)


def compiled(k, backend: str):
    def linear_int4(x, weight, scales, bias):
        # our kernels take float32 (extension: C++ on CPU, CUDA on a GPU; triton: where Triton runs)
        if x.dtype != torch.float32:
            return torch_twin(x, weight, scales, bias)
        return k.linear_int4_fwd(x, weight, scales, bias)
    return linear_int4


# ----------------------------------------------------------------------------- cases
def _case(M: int, K: int, N: int, group: int = 32, strided: bool = False, bias: bool = True, found: str = "") -> Case:
    """x (M, K) @ a 4-bit weight (N, K) packed once from float64 values; `strided`: x and the bias every other
    element of leaves twice as large."""
    s = 2 if strided else 1
    g = torch.Generator().manual_seed(M * 31 + K * 7 + N + group)
    w, scales = pack_int4(randn(g, N, K, scale=K ** -0.5), group)

    def build(g):
        return {"x": randn(g, M, K * s), **({"bias": randn(g, N * s, scale=0.1)} if bias else {})}

    def call(backend, t):
        return linear_int4(t["x"][:, ::s], t["qweight"], t["scales"], t["bias"][::s] if bias else None,
                           backend=backend)
    label = f"{M}x{K} @ {N}x{K} int4 g{group}" + (" strided" if strided else "") + ("" if bias else " no bias")
    return Case(label, build, call, extra={"qweight": w, "scales": scales}, found=found)


def cases(quick: bool) -> list[Case]:
    return [_case(1, 768, 300, found="one row: the 8-row tiles"),
            _case(7, 33, 129, found="K padded from 33 to 64: one block, mostly padding"),
            _case(16, 200, 1023, group=64, bias=False, found="groups of 64; 4-row passes, N off the tile"),
            _case(3, 130, 50, strided=True, found="strided x and bias"),
            _case(20, 64, 48, found="more rows than a batch of sequences (a prompt chunk)")]


def bad_inputs() -> list[BadInput]:
    x = torch.randn(2, 64)
    w, s = pack_int4(torch.randn(4, 64))
    return [BadInput(lambda: linear_int4(x, w[:, :16], s), ValueError, r"weight must be packed 4-bit weights: uint8 \(N, 32\)"),
            BadInput(lambda: linear_int4(x, w.to(torch.int8), s), ValueError, "weight must be packed 4-bit"),
            BadInput(lambda: linear_int4(x, w, s[:, :1].repeat(1, 3)), ValueError, r"scales must be float32 \(4, 2\) or \(4, 1\)"),
            BadInput(lambda: linear_int4(x, w, None), ValueError, "scales must be float32"),
            BadInput(lambda: linear_int4(x, w, s, torch.ones(3)), ValueError, r"bias must have shape \(4,\)"),
            BadInput(lambda: linear_int4(x.long(), w, s), TypeError, "x must be a floating-point tensor"),
            BadInput(lambda: linear_int4(x.requires_grad_(), w, s), RuntimeError, "linear_int4 is for inference")]


def _rowwise(backend: str, x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(x.shape[-1])
    w, scales = pack_int4(randn(g, 48, x.shape[-1], scale=x.shape[-1] ** -0.5))
    with torch.no_grad():
        return linear_int4(x, w, scales, randn(g, 48).to(x.dtype), backend=backend)


def bench(key: str, shape: tuple) -> Bench:
    M, K, N = shape

    def inputs(g):
        w, scales = pack_int4(randn(g, N, K, scale=0.05))
        return [randn(g, M, K), randn(g, N)], (w, scales)

    def call(x, b, w, scales, backend):
        return linear_int4(x, w, scales, b, backend=backend)

    def work(dtype, mode):                     # the packed weights and their scales, x, bias and y once each
        return N * padded_k(K) // 2 + 4 * N * padded_k(K) // 32 + (M * K + N + M * N) * 4
    return Bench(key, shape, inputs, call, work, weight_arg=2)


register(Op("linear_int4", linear_int4, reference, torch_twin, cases, bad_inputs,
            lambda device_type, quick, sweep: {"linear_int4": [(1, 256, 512)] if quick else list(DECODE_SHAPES)},
            bench, kernels={"linear_int4_fwd": Kernel(_fake)}, compiled=compiled, inference_only=True,
            rowwise=_rowwise, backends=("reference", "torch", "extension", "triton"), dtypes=("float32",),
            module=__name__))
