"""The `torch` backend: PyTorch's own built-ins for every op.

These are the baselines our kernels must beat: `F.layer_norm`, `F.gelu(approximate="tanh")`,
`F.scaled_dot_product_attention` (which picks flash / memory-efficient / math kernels itself),
`F.cross_entropy` (after `F.linear` for the LM head + loss), and for the quantized linear layers
`aten._weight_int8pack_mm` where its rules allow, else what a user would write (gpt-fast's recipe).
Attention dropout uses SDPA's own RNG, so its dropped weights differ from the other backends'.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Dropout comes from SDPA's and F.dropout's own RNG, not the shared counter-based one (dropout_rng.py):
# with dropout this backend computes a different random function than the others (compare skips it).
SHARES_DROPOUT_RNG = False


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         chunk_rows: int | None = None) -> torch.Tensor:
    # what a user would write: the full (N, V) logits, then PyTorch's loss
    logits = F.linear(hidden, weight)
    if logits.dtype in (torch.float16, torch.bfloat16):          # the loss and its lse in float32
        logits = logits.float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                     scale: float | None = None, seed=None) -> torch.Tensor:
    # `seed` is not used: SDPA draws its dropout mask from torch's own RNG
    Tq, Tk = q.shape[2], k.shape[2]
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
    # fewer queries than keys (KV cache): SDPA's is_causal aligns the top-left corner, we need the
    # bottom-right one - query r sees keys 0 .. r + Tk - Tq - so pass the mask explicitly
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=scale)


def dropout_add(x: torch.Tensor, residual: torch.Tensor | None, p: float, seed) -> torch.Tensor:
    """What the model did before the fused op: nn.Dropout's F.dropout (its own RNG: `seed` unused, a
    stored mask), then the add."""
    y = F.dropout(x, p, training=True)
    return y if residual is None else residual + y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def _int8pack_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """aten._weight_int8pack_mm's rules: a CPU op whose vectorized path takes bfloat16 activations
    (float32 ones take a scalar loop, ~13x slower than F.linear), K a multiple of 16."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and weight.shape[1] % 16 == 0


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
    if _int8pack_applies(x, weight):
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(),
                                              scales.to(x.dtype)).view(*x.shape[:-1], weight.shape[0])
        return y + bias if bias is not None else y
    # gpt-fast's weight-only int8: widen the weights to x's dtype, then scale the outputs
    y = F.linear(x, weight.to(x.dtype)) * scales.to(x.dtype)
    return y + bias if bias is not None else y


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    if x.dtype == torch.bfloat16:
        return F.linear(x, weight, bias)
    return F.linear(x, weight.to(x.dtype), bias)
