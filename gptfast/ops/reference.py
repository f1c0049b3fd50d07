"""The `reference` backend: every op written out as the textbook math, in plain PyTorch.

This is the truth that every fused kernel is tested against (in float64). It is written for
reading, not speed: attention materializes the full (T, T) score matrix. Attention dropout uses
the counter-based RNG of `dropout_rng` (the same mask as our kernels, for the same seed).
"""
from __future__ import annotations

import math

import torch

from .dropout_rng import dropout_keep_mask


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Normalize each row over the last dim to zero mean, unit (biased) variance; then scale, shift."""
    mean = x.mean(dim=-1, keepdim=True)                         # (..., 1)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)          # biased: divide by C, not C - 1
    return (x - mean) / torch.sqrt(var + eps) * weight + bias   # (..., C)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (as in GPT-2): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              scale: float | None = None, dropout_p: float = 0.0, seed=None) -> torch.Tensor:
    """softmax(q k^T * scale [+ causal mask]) v, with dropout on the attention weights.

    q: (B, nh, Tq, hs); k, v: (B, nh, Tk, hs) with Tk >= Tq - the queries are the last Tq
    positions (with a KV cache, the earlier keys come from the cache). With `causal`, the query at
    position t attends to positions <= t only. Dropout keeps weight (b*nh + h, t, s) iff the shared
    counter-based hash of (seed, b*nh + h, t, s) says so (t the query's position), and scales kept
    weights by 1 / (1 - dropout_p).
    """
    B, nh, Tq, hs = q.shape
    Tk = k.shape[2]
    offset = Tk - Tq                                             # cached positions before the queries
    scale = 1.0 / math.sqrt(hs) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale                   # (B, nh, Tq, Tk)
    if causal:
        future = torch.triu(torch.ones(Tq, Tk, dtype=torch.bool, device=q.device), diagonal=1 + offset)
        scores = scores.masked_fill(future, float("-inf"))       # no peeking at later tokens
    weights = torch.softmax(scores, dim=-1)                      # (B, nh, Tq, Tk), rows sum to 1
    if dropout_p > 0.0:
        if seed is None:
            seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
        keep = dropout_keep_mask(seed, B * nh, Tk, Tk, dropout_p, device=q.device)[:, offset:]
        weights = weights * keep.view(B, nh, Tq, Tk) / (1.0 - dropout_p)
    return weights @ v                                           # (B, nh, Tq, hs)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean over rows of -log softmax(logits)[target]; rows whose target is ignore_index don't count.

    logits (N, V), targets (N,). -log softmax(x)[t] = logsumexp(x) - x[t], with
    logsumexp(x) = m + log(sum(exp(x - m))), m = max(x) (shifting by m keeps exp from overflowing).
    """
    m = logits.max(dim=-1, keepdim=True).values                                   # (N, 1)
    lse = m.squeeze(-1) + torch.log(torch.exp(logits - m).sum(dim=-1))             # (N,)
    valid = targets != ignore_index
    picked = logits.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    losses = torch.where(valid, lse - picked, torch.zeros_like(lse))
    return losses.sum() / valid.sum()


def causal_attention(q, k, v, dropout_p: float = 0.0, scale: float | None = None, seed=None):
    return attention(q, k, v, causal=True, scale=scale, dropout_p=dropout_p, seed=seed)


def dropout_add(x: torch.Tensor, residual: torch.Tensor | None, p: float, seed) -> torch.Tensor:
    """residual + dropout(x), spelled out: the keep-mask from the shared counter-based RNG over x's
    (rows, last dim) view - the attention dropout's hash with a single "head" - then x * keep / (1 - p),
    in the output's dtype (residual's, else x's)."""
    C = x.shape[-1]
    keep = dropout_keep_mask(seed, 1, x.numel() // max(C, 1), C, p, device=x.device)[0].view(x.shape)
    out_dtype = residual.dtype if residual is not None else x.dtype
    y = x.to(out_dtype) * keep.to(out_dtype) / (1.0 - p)
    return y if residual is None else y + residual


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """The LM head, then the loss: logits = hidden (N, C) @ weight (V, C)^T, all (N, V) of them, then the
    cross-entropy above. `chunk_rows` is for the fused kernels; the textbook has no chunks."""
    logits = hidden @ weight.t()                                  # (N, V)
    if logits.dtype in (torch.float16, torch.bfloat16):          # the loss and its lse in float32
        logits = logits.float()
    return cross_entropy(logits, targets, ignore_index)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T + bias: each output is the dot product of a row of x with a row of weight."""
    y = x @ weight.t()                                            # (..., N)
    return y + bias if bias is not None else y


def dequantize_int8(weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 weight (N, K) * scales (N,) -> (N, K) in `dtype`: row n is weight[n] * scales[n]."""
    return weight.to(dtype) * scales.to(dtype).unsqueeze(1)


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
    """Weight-only int8: dequantize the weights to x's dtype, then the plain linear layer."""
    return linear(x, dequantize_int8(weight, scales, x.dtype), bias)


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """bfloat16 weights widened to x's dtype (exact), then the plain linear layer."""
    return linear(x, weight.to(x.dtype), bias)


def _linear_weights(x: torch.Tensor, layer) -> torch.Tensor:
    """x @ W^T [+ b] for a LinearWeights of any storage type, in x's precision."""
    if layer.weight.dtype == torch.int8:
        return linear_int8(x, layer.weight, layer.scales, layer.bias)
    return linear(x, layer.weight.to(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype))


def decode_block(x: torch.Tensor, weights, k_cache: torch.Tensor, v_cache: torch.Tensor, start_pos: int) -> torch.Tensor:
    """One pre-LN block for one new position per sequence (x (B, 1, C)) with a KV cache (ops/decode.py)."""
    w = weights
    B, _, C = x.shape
    H, D = k_cache.shape[1], k_cache.shape[3]
    h = layer_norm(x, w.ln1_weight, w.ln1_bias, w.eps)
    qkv = torch.cat([_linear_weights(h, layer) for layer in w.qkv], dim=-1)           # (B, 1, 3C)
    q, k, v = (t.reshape(B, 1, H, D).transpose(1, 2) for t in qkv.split(C, dim=-1))   # (B, H, 1, D) each
    k_cache[:, :, start_pos] = k[:, :, 0]
    v_cache[:, :, start_pos] = v[:, :, 0]
    a = causal_attention(q, k_cache[:, :, :start_pos + 1], v_cache[:, :, :start_pos + 1])   # (B, H, 1, D)
    x1 = x + _linear_weights(a.transpose(1, 2).reshape(B, 1, C), w.out)
    return x1 + _linear_weights(gelu(_linear_weights(layer_norm(x1, w.ln2_weight, w.ln2_bias, w.eps), w.fc)), w.proj)
