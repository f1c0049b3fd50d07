"""The GPT model, block by block: embeddings -> N x (pre-LN attention + feed-forward) -> LM head.

This file is the architecture and nothing else. Every LayerNorm, GELU, attention, residual dropout, linear
layer and the LM head's loss go through `gptfast.ops`, so the same model runs on the `reference` backend
(the textbook math: `reference` in gptfast/ops/<op>.py, beside each call below) or on any kernel backend;
`set_backend` switches all of them at once. What makes it fast lives with its own concept, behind the hooks
named where they are used: the bf16 working copies of training (gptfast/training/precision.py), the fused
one-token decoding step (kv_cache.py), quantized weights (quantize.py).
Shapes: B batch, T tokens, C = emb_dim, nh = n_heads, hs = C / nh, V = vocab_size.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from .. import ops
from .base import LanguageModel
from .config import GPTConfig
from .kv_cache import KVCache, LayerKV

__all__ = ["GPTModel", "KVCache", "TransformerBlock", "CausalSelfAttention", "FeedForward", "LayerNorm", "GELU",
           "Linear"]


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) through `ops.linear`: in training that is
    F.linear on every backend; in inference the backend's kernel (the `extension` one on CPU reads
    the weights once for the few rows of a decoding step)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, backend: str | None = None):
        super().__init__(in_features, out_features, bias=bias)
        self.backend = backend

    def weight_for(self, x: torch.Tensor) -> torch.Tensor:
        """The weight that multiplies x: `weight` (bf16 training hands in its working copy here instead)."""
        return self.weight

    def forward(self, x):                                        # (..., in) -> (..., out)
        return ops.linear(x, self.weight_for(x), self.bias, backend=self.backend)   # x W^T + b


class LayerNorm(nn.Module):
    """Learned scale (`weight`) and shift (`bias`) around a zero-mean, unit-variance row."""

    def __init__(self, emb_dim: int, eps: float = 1e-5, backend: str | None = None):
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(emb_dim))
        self.bias = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):                                        # (B, T, C) -> (B, T, C)
        # (x - mean) / sqrt(var + eps) * weight + bias, over the last dim - ops/layer_norm.py: reference
        return ops.layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)


class GELU(nn.Module):
    def __init__(self, backend: str | None = None):
        super().__init__()
        self.backend = backend

    def forward(self, x):
        # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) - ops/gelu.py: reference
        return ops.gelu(x, backend=self.backend)


class FeedForward(nn.Module):
    """Position-wise MLP: expand 4x, GELU, project back."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = Linear(cfg.emb_dim, 4 * cfg.emb_dim, backend=cfg.backend)
        self.act = GELU(cfg.backend)
        self.proj = Linear(4 * cfg.emb_dim, cfg.emb_dim, backend=cfg.backend)

    def forward(self, x):                                        # (B, T, C)
        return self.proj(self.act(self.fc(x)))                   # (B, T, 4C) inside


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each token sees only itself and earlier tokens."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.W_query = Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.qkv_bias, backend=cfg.backend)
        self.W_key = Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.qkv_bias, backend=cfg.backend)
        self.W_value = Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.qkv_bias, backend=cfg.backend)
        self.out_proj = Linear(cfg.emb_dim, cfg.emb_dim, backend=cfg.backend)   # mixes the heads' outputs
        self.drop_rate = cfg.drop_rate                           # on the attention weights
        self.backend = cfg.backend

    def split_heads(self, x):                                    # (B, T, C) -> (B, nh, T, hs)
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def queries_keys_values(self, x):                            # (B, T, C) -> 3 x (B, nh, T, hs)
        return self.split_heads(self.W_query(x)), self.split_heads(self.W_key(x)), self.split_heads(self.W_value(x))

    def forward(self, x, kv: LayerKV | None = None, start_pos: int = 0):  # (B, T, C)
        B, T, C = x.shape
        q, k, v = self.queries_keys_values(x)                    # (B, nh, T, hs) each
        if kv is not None:                                       # decoding: remember, then attend to all so far
            k, v = kv.append(k, v, start_pos)                    # (B, nh, start_pos + T, hs)
        dropout_p = self.drop_rate if self.training else 0.0
        # softmax(q k^T / sqrt(hs) + causal mask) v, dropout on the weights - ops/attention.py: reference
        y = ops.causal_attention(q, k, v, dropout_p=dropout_p, backend=self.backend)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)                   # heads side by side again
        return self.out_proj(y)


class DropoutAdd(nn.Module):
    """residual + dropout(x); without a residual, plain dropout. In eval mode: residual + x."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.p, self.backend = cfg.drop_rate, cfg.backend

    def forward(self, x, residual=None):                         # (B, T, C) each
        if not self.training or self.p == 0.0:                   # eval (decoding: ~25 calls a token): the add
            return x if residual is None else x + residual
        # residual + x * keep / (1 - p), keep drawn from a seeded hash (no stored mask) - ops/dropout_add.py: reference
        return ops.dropout_add(x, residual, self.p, backend=self.backend)


class TransformerBlock(nn.Module):
    """Pre-LN block: x + drop(attn(ln1(x))), then x + drop(ff(ln2(x)))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.emb_dim, backend=cfg.backend)
        self.att = CausalSelfAttention(cfg)
        self.norm2 = LayerNorm(cfg.emb_dim, backend=cfg.backend)
        self.ff = FeedForward(cfg)
        self.drop_shortcut = DropoutAdd(cfg)
        self.backend = cfg.backend

    def forward(self, x, kv: LayerKV | None = None, start_pos: int = 0):  # (B, T, C)
        x = self.drop_shortcut(self.att(self.norm1(x), kv, start_pos), x)   # dropout, then add the input back
        return self.drop_shortcut(self.ff(self.norm2(x)), x)


class GPTModel(LanguageModel):
    """Token and position embeddings, n_layers blocks, a final LayerNorm and the LM head (base.py: what every
    model shares - the backend switch, the KV cache, the loss)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        cfg = replace(cfg, backend=ops.resolve_backend_name(cfg.backend))  # fail early; own copy
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = DropoutAdd(cfg)
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = LayerNorm(cfg.emb_dim, backend=cfg.backend)
        self.out_head = Linear(cfg.emb_dim, cfg.padded_vocab_size, bias=False, backend=cfg.backend)  # untied (book)...
        if cfg.tie_embeddings:                                   # ...or shared with the embedding (GPT-2)
            # GPT-2's N(0, 0.02) for the shared matrix: nn.Embedding's N(0, 1) rows would make the
            # untrained logits huge (initial loss ~40 instead of ln V ~ 10.8)
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=0.02)
            self.out_head.weight = self.tok_emb.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache: KVCache | None = None,
                start_pos: int = 0, last_position_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V) for token ids idx (B, T) at positions start_pos .. start_pos + T - 1; or, given
        `targets` (B, T), the mean next-token loss (ignore_index -100).

        V is cfg.padded_vocab_size: with vocab_multiple > 1 the last columns belong to ids no text
        contains; training pushes them down, and generation never samples them.

        With a `cache`, keys and values of these positions are stored in it and attention also sees
        the cached positions before start_pos. `last_position_only`: logits (B, 1, V) of the last
        position alone - all generation needs after a prompt, and the LM head (the largest matmul)
        then runs on B rows instead of B * T.
        """
        B, T = idx.shape
        self.check_positions(T, start_pos, cache)
        pos = torch.arange(start_pos, start_pos + T, device=idx.device)   # (T,)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C), pos broadcast over B
        if cache is not None and targets is None and (logits := cache.run_model(self, x, start_pos)) is not None:
            return logits                    # one new position: the whole step in one call, where it fuses (kv_cache.py)
        for i, block in enumerate(self.trf_blocks):
            # with a cache, the cache runs the block: a one-token step may go as one fused op (kv_cache.py)
            x = block(x) if cache is None else cache.run_block(i, block, x, start_pos)
        if last_position_only:
            if targets is not None:
                raise ValueError("last_position_only is for logits; the loss needs every position")
            x = x[:, -1:, :]                                     # (B, 1, C)
        x = self.final_norm(x)                                   # (B, T, C)
        if targets is None:
            return self.out_head(x)                              # (B, T, V) logits
        return self.lm_head_loss(x, targets)
