"""The op interface the model calls: `layer_norm`, `gelu`, `causal_attention`, `cross_entropy`,
`linear_cross_entropy` (the LM head fused with the loss), `dropout_add` (residual + dropout, the mask
regenerated from a seed), and the linear layers of inference:
`linear` (float32 weights) and `linear_int8` / `linear_bf16` (weight-only quantized weights), and
`decode_block`, a whole block's one-token decoding step in one call where a backend fuses it (decode.py).

Each op is computed by a selectable backend (`reference`, `torch`, `extension`, `triton`, `auto`),
chosen per call by `backend=`, which the model takes from its config, `--backend` or
$GPTFAST_BACKEND. Argument checks live here, once, so every backend gets the same clear errors.
"""
from __future__ import annotations

import os

import torch

from . import auto
import torch.nn.functional as F

from .decode import BlockWeights, LinearWeights, decode_block, fuses_decode_block
from .checks import check_attention_inputs, check_floating, check_like, check_linear_inputs, check_targets
from .registry import (DEFAULT_BACKEND, BackendError, available_backends, get_backend, known_backends,
                       register_backend, resolve_backend_name, shares_dropout_rng, supports_kv_cache)


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


def gelu(x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """GELU with the tanh approximation, elementwise."""
    check_floating("x", x)
    return get_backend(backend).gelu(x)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                     scale: float | None = None, seed: torch.Tensor | int | None = None,
                     backend: str | None = None) -> torch.Tensor:
    """Causal scaled dot-product attention. q (B, nh, Tq, hs), k and v (B, nh, Tk, hs) -> (B, nh, Tq, hs).

    Usually Tq == Tk. With a KV cache, Tk > Tq: the queries are the *last* Tq of the Tk positions
    (query row r sits at position r + Tk - Tq and sees keys 0 .. r + Tk - Tq).
    `scale` defaults to 1/sqrt(hs); `dropout_p` drops attention weights (pass 0.0 in eval mode).
    `seed` keys the shared counter-based dropout RNG (see dropout_rng.py): the same seed drops the
    same weights in `reference`, `extension` and `triton`. When None it is drawn from torch's RNG
    (so torch.manual_seed makes runs repeatable). The `torch` backend uses SDPA's own dropout.
    """
    check_attention_inputs(q, k, v)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0:
        if seed is None:
            seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
        elif not isinstance(seed, torch.Tensor):
            seed = torch.tensor([seed], dtype=torch.int64)
    return get_backend(backend).causal_attention(q, k, v, dropout_p, scale, seed)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  backend: str | None = None) -> torch.Tensor:
    """Mean next-token loss: logits (..., V) against integer targets (...); targets equal to
    `ignore_index` are left out of the mean."""
    check_floating("logits", logits)
    if logits.ndim < 2:
        raise ValueError(f"logits must have shape (..., V) with at least 2 dims, got {tuple(logits.shape)}")
    V = logits.shape[-1]
    check_targets(targets, "logits", logits, V, ignore_index)
    return get_backend(backend).cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index)


def dropout_add(x: torch.Tensor, residual: torch.Tensor | None = None, p: float = 0.0,
                seed: torch.Tensor | int | None = None, backend: str | None = None) -> torch.Tensor:
    """residual + dropout(x): each element of x kept with probability 1 - p and scaled by 1 / (1 - p),
    the residual added in the same pass (None: plain dropout). y has residual's dtype - x may be a
    bfloat16/float16 branch output added into a float32 residual stream, as under autocast.

    `seed` keys the shared counter-based RNG (dropout_rng.py) by each element's (row, col) in x's
    (rows, last dim) view: the backward regenerates the mask instead of storing it, and every backend
    but `torch` (F.dropout's own RNG) drops the same elements. None draws a seed from torch's generator
    (so torch.manual_seed makes runs repeatable)."""
    check_floating("x", x)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p}")
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension, got a 0-dim tensor")
    if residual is not None:
        check_floating("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
        if residual.dtype != x.dtype and not (residual.dtype == torch.float32 and x.dtype in (torch.bfloat16,
                                                                                               torch.float16)):
            raise TypeError(f"residual must have x's dtype {x.dtype} (or float32 for a 16-bit x), got {residual.dtype}")
    if p == 0.0:
        return x if residual is None else residual + x
    if seed is None:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    elif not isinstance(seed, torch.Tensor):
        seed = torch.tensor([seed], dtype=torch.int64)
    return get_backend(backend).dropout_add(x, residual, p, seed)


LCE_BUDGET_ENV = "GPTFAST_LCE_BUDGET_MB"
LCE_DEFAULT_BUDGET_MB = 64


def linear_cross_entropy_chunk_rows(n_rows: int, vocab: int, budget_mb: float | None = None) -> int:
    """Rows per chunk of the fused LM head + loss: as many as keep one chunk's float32 logits within
    `budget_mb` (default $GPTFAST_LCE_BUDGET_MB or 64 MiB), at least 16 (GEMMs stay efficient), at
    most n_rows. GPT-2's vocabulary (50,257) gives 333 rows: 64 MiB instead of N x 201 KB."""
    budget = budget_mb if budget_mb is not None else float(os.environ.get(LCE_BUDGET_ENV, LCE_DEFAULT_BUDGET_MB))
    rows = int(budget * 2**20) // (4 * max(vocab, 1))
    return max(1, min(n_rows, max(16, rows)))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         chunk_rows: int | None = None, backend: str | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits hidden @ weight^T against targets, without holding the logits.

    hidden (..., C), weight (V, C) (the LM head, or the tied embedding), targets (...) int64; targets
    equal to `ignore_index` are left out of the mean. The fused backends go through the rows in chunks of
    `chunk_rows` (default: linear_cross_entropy_chunk_rows), so peak extra memory is one chunk of logits.
    Under autocast the products run in the autocast dtype and the log-sum-exp and loss in float32.
    """
    check_floating("hidden", hidden)
    if torch.is_autocast_enabled(hidden.device.type):         # both go to the autocast dtype below
        check_floating("weight", weight)
        if weight.device != hidden.device:
            raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    else:
        check_like("weight", weight, "hidden", hidden)
    if hidden.ndim < 2 or weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"hidden must have shape (..., C) and weight (V, C) with the same C, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    V = weight.shape[0]
    check_targets(targets, "hidden", hidden, V, ignore_index)
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    chunk_rows = chunk_rows or linear_cross_entropy_chunk_rows(hidden.shape[0], V)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return get_backend(backend).linear_cross_entropy(hidden, weight, targets, ignore_index, chunk_rows)
    return get_backend(backend).linear_cross_entropy(hidden, weight, targets, ignore_index, chunk_rows)


def _needs_autograd(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           backend: str | None = None) -> torch.Tensor:
    """nn.Linear: x (..., K) @ weight (N, K)^T + bias (N,) -> (..., N).

    The backends differ for inference only - decoding, where x has a few rows and the layer is a
    matrix-vector product bound by reading the weights (`extension` on CPU: our kernel, csrc/cpu/linear.cpp).
    Whenever autograd needs the result (training), under autocast, or for a weight that is not a plain
    tensor (a DTensor of FSDP), every backend runs `F.linear`, so training is PyTorch's own GEMM whatever
    the backend."""
    if (_needs_autograd(x, weight, bias) or torch.is_autocast_enabled(x.device.type)
            or type(weight) not in (torch.Tensor, torch.nn.Parameter)):
        return F.linear(x, weight, bias)                         # (autocast: x and weight may differ in dtype)
    check_linear_inputs(x, weight, None, bias, None)
    return get_backend(backend).linear(x, weight, bias)


def _check_inference(op: str, x: torch.Tensor) -> None:
    if _needs_autograd(x):
        raise RuntimeError(f"{op} is for inference: x requires grad, but quantized weights are frozen and the op has "
                           "no backward (train the float32 model, quantize it afterwards; or run under torch.no_grad())")


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


__all__ = ["linear", "linear_int8", "linear_bf16", "decode_block", "fuses_decode_block", "BlockWeights", "LinearWeights", "layer_norm", "cross_entropy", "linear_cross_entropy", "linear_cross_entropy_chunk_rows", "gelu", "causal_attention", "dropout_add", "available_backends", "resolve_backend_name",
           "register_backend", "get_backend", "known_backends", "shares_dropout_rng", "supports_kv_cache", "BackendError", "DEFAULT_BACKEND"]
