"""A whole transformer block's decoding step as one op: `decode_block`.

Decoding one token calls ~12 ops per block (two LayerNorms, the Q/K/V, output and feed-forward linear
layers, the cache writes, attention, GELU, two residual adds): ~250 calls a token for GPT-2 124M, each
paying Python, the dispatcher and a wake-up of the threads - about as long as reading the token's int8
weights. A backend with a fused block (`extension` on CPU: csrc/cpu/decode_block.cpp) runs the block in
one call whose threads meet at barriers instead; it computes exactly what the ops one by one compute
(bit-for-bit on the `extension` backend, tested). The model takes this path by itself when decoding
one new position with a KV cache (`TransformerBlock.forward`); other backends keep the op-by-op path.

The math (`reference.decode_block` is the twin the kernels are tested against), x (B, 1, C):
    x1 = x + out(attention(q, k_cache[:, :, :p+1], v_cache[:, :, :p+1]))   with q, k, v = qkv(ln1(x)),
    y  = x1 + proj(gelu(fc(ln2(x1))))                                     k and v written at position p
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .registry import BackendError, get_backend, resolve_backend_name


class LinearWeights(NamedTuple):
    """A linear layer as the fused ops read it: weight (N, K) float32, bfloat16 or int8; scales (N,)
    float32 for int8 (per output row); bias (N,) or None."""
    weight: torch.Tensor
    scales: torch.Tensor | None = None
    bias: torch.Tensor | None = None


class BlockWeights(NamedTuple):
    """One pre-LN transformer block. `qkv`: one stacked (3C, C) layer (rows Q, K, V, as quantized models
    keep them) or three (C, C) ones; `fc` (4C, C) and `proj` (C, 4C) the feed-forward; both LayerNorms
    use `eps`."""
    ln1_weight: torch.Tensor
    ln1_bias: torch.Tensor
    qkv: tuple[LinearWeights, ...]
    out: LinearWeights
    ln2_weight: torch.Tensor
    ln2_bias: torch.Tensor
    fc: LinearWeights
    proj: LinearWeights
    eps: float = 1e-5


def fuses_decode_block(x: torch.Tensor, weights: BlockWeights, k_cache: torch.Tensor,
                       backend: str | None = None) -> bool:
    """Whether `backend` runs `decode_block` for these inputs as one fused kernel (plain Python checks
    of dtypes, devices and shapes, so torch.compile traces through it)."""
    check = getattr(get_backend(backend), "fuses_decode_block", None)
    return bool(check is not None and check(x, weights, k_cache))


def decode_block(x: torch.Tensor, weights: BlockWeights, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 start_pos: int, backend: str | None = None) -> torch.Tensor:
    """One block's step for one new position per sequence: x (B, 1, C) -> (B, 1, C), writing the new keys
    and values into k_cache, v_cache (B, n_heads, context, head_dim) at `start_pos` and attending over
    positions 0..start_pos. Inference only. Raises BackendError where `backend` has no fused block for
    these inputs (see fuses_decode_block); the model then runs the block op by op."""
    if x.ndim != 3 or x.shape[1] != 1:
        raise ValueError(f"x must have shape (B, 1, C) - one new position per sequence - got {tuple(x.shape)}")
    if not 0 <= start_pos < k_cache.shape[2]:
        raise ValueError(f"start_pos must be in [0, {k_cache.shape[2]}) (the cache's context), got {start_pos}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights.ln1_weight, weights.out.weight)):
        raise RuntimeError("decode_block is for inference (no backward): run it under torch.no_grad()")
    if not fuses_decode_block(x, weights, k_cache, backend):
        raise BackendError(f"backend {resolve_backend_name(backend)!r} has no fused decoding block for x "
                           f"{x.dtype} on {x.device} with {weights.qkv[0].weight.dtype} weights")
    return get_backend(backend).decode_block(x, weights, k_cache, v_cache, start_pos)
