"""Llama 3 and Qwen3, block by block: the GPT of gpt.py with four changes that every modern small LLM made.

1. RMSNorm instead of LayerNorm: x / rms(x) * weight - no mean subtracted, no bias.
2. Rotary positions (RoPE) instead of a learned position table: each query and key is rotated by an angle that
   grows with its position, so q . k depends on how far apart two tokens are.
3. SwiGLU instead of GELU: down(silu(gate(x)) * up(x)), a gated feed-forward.
4. Grouped-query attention: n_kv_heads < n_heads; each key/value head serves n_heads / n_kv_heads query heads,
   so the KV cache is that many times smaller. Qwen3 also RMS-normalizes each head's queries and keys.

No biases anywhere (unless qkv_bias), and the LM head is usually tied to the embedding. One LlamaConfig covers
both (config.py; `qk_norm` is the Qwen3 switch). Every op goes through `gptfast.ops` as in gpt.py, so `reference`
runs the textbook math and the kernel backends the fused kernels; the machinery (KV cache, quantization,
precision) lives where gpt.py's does.
Shapes: B batch, T tokens, C = emb_dim, nh = n_heads, nkv = n_kv_heads, hs = head_dim, F = hidden_dim.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from .. import ops
from .base import LanguageModel
from .config import LlamaConfig
from .gpt import DropoutAdd, Linear
from .kv_cache import KVCache, LayerKV

__all__ = ["LlamaModel", "LlamaBlock", "GroupedQueryAttention", "SwiGLUFeedForward", "RMSNorm"]


class RMSNorm(nn.Module):
    """A learned scale around a unit root-mean-square row."""

    def __init__(self, dim: int, eps: float = 1e-6, backend: str | None = None):
        super().__init__()
        self.eps, self.backend = eps, backend
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):                                        # (..., dim) -> (..., dim)
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)   # (q, k under autocast)
        # x / sqrt(mean(x^2) + eps) * weight, over the last dim - ops/rms_norm.py: reference
        return ops.rms_norm(x, w, self.eps, backend=self.backend)


class SwiGLUFeedForward(nn.Module):
    """down(silu(gate(x)) * up(x)): the gate decides, per feature, how much of up(x) passes."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate = Linear(cfg.emb_dim, cfg.hidden_dim, bias=False, backend=cfg.backend)
        self.up = Linear(cfg.emb_dim, cfg.hidden_dim, bias=False, backend=cfg.backend)
        self.down = Linear(cfg.hidden_dim, cfg.emb_dim, bias=False, backend=cfg.backend)
        self.backend = cfg.backend

    def forward(self, x):                                        # (B, T, C)
        # silu(g) * u = g * sigmoid(g) * u - ops/swiglu.py: reference
        return self.down(ops.swiglu(self.gate(x), self.up(x), backend=self.backend))   # (B, T, F) inside


class GroupedQueryAttention(nn.Module):
    """Causal self-attention with n_kv_heads key/value heads shared by n_heads query heads, rotary positions, and
    (Qwen3) an RMSNorm of each head's queries and keys."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        C, hs = cfg.emb_dim, cfg.head_dim
        self.W_query = Linear(C, cfg.n_heads * hs, bias=cfg.qkv_bias, backend=cfg.backend)
        self.W_key = Linear(C, cfg.n_kv_heads * hs, bias=cfg.qkv_bias, backend=cfg.backend)
        self.W_value = Linear(C, cfg.n_kv_heads * hs, bias=cfg.qkv_bias, backend=cfg.backend)
        self.out_proj = Linear(cfg.n_heads * hs, C, bias=False, backend=cfg.backend)
        self.q_norm = RMSNorm(hs, cfg.norm_eps, cfg.backend) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hs, cfg.norm_eps, cfg.backend) if cfg.qk_norm else None
        self.drop_rate, self.backend = cfg.drop_rate, cfg.backend

    def queries_keys_values(self, x):                            # (B, T, C) -> (B, T, heads, hs) each
        B, T, _ = x.shape
        return (self.W_query(x).view(B, T, self.n_heads, self.head_dim),
                self.W_key(x).view(B, T, self.n_kv_heads, self.head_dim),
                self.W_value(x).view(B, T, self.n_kv_heads, self.head_dim))

    def forward(self, x, kv: LayerKV | None, start_pos: int, cos: torch.Tensor, sin: torch.Tensor):
        B, T, _ = x.shape
        q, k, v = self.queries_keys_values(x)
        if self.q_norm is not None:                              # Qwen3: each head's vector to unit RMS
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # (B, heads, T, hs)
        # rotate each half-pair by position * frequency - ops/rope.py: reference
        q, k = ops.rope(q, k, cos, sin, backend=self.backend)
        if kv is not None:                                       # decoding: remember, then attend to all so far
            k, v = kv.append(k, v, start_pos)                    # (B, nkv, start_pos + T, hs)
        dropout_p = self.drop_rate if self.training else 0.0
        # softmax(q k^T / sqrt(hs) + causal mask) v, query head h reading K/V head h // (nh / nkv)
        # - ops/attention.py: reference
        y = ops.causal_attention(q, k, v, dropout_p=dropout_p, backend=self.backend)   # (B, nh, T, hs)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class LlamaBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + ff(norm2(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.emb_dim, cfg.norm_eps, cfg.backend)
        self.att = GroupedQueryAttention(cfg)
        self.norm2 = RMSNorm(cfg.emb_dim, cfg.norm_eps, cfg.backend)
        self.ff = SwiGLUFeedForward(cfg)
        self.drop_shortcut = DropoutAdd(cfg)
        self.backend = cfg.backend

    def forward(self, x, kv: LayerKV | None = None, start_pos: int = 0, rope: tuple | None = None):  # (B, T, C)
        x = self.drop_shortcut(self.att(self.norm1(x), kv, start_pos, *rope), x)
        return self.drop_shortcut(self.ff(self.norm2(x)), x)


class LlamaModel(LanguageModel):
    """Token embedding, n_layers blocks, a final RMSNorm and the LM head. No position table: positions enter
    through the rotation of q and k (the angles of positions start_pos.. are computed per call)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        cfg = replace(cfg, backend=ops.resolve_backend_name(cfg.backend))  # fail early; own copy
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.emb_dim)
        self.drop_emb = DropoutAdd(cfg)
        self.trf_blocks = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.emb_dim, cfg.norm_eps, cfg.backend)
        self.out_head = Linear(cfg.emb_dim, cfg.padded_vocab_size, bias=False, backend=cfg.backend)
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=0.02)   # small logits at the start (ln V loss)
        if cfg.tie_embeddings:
            self.out_head.weight = self.tok_emb.weight
        # theta^(-2i/hs), with Llama 3's long-context scaling where configured: a float64 CPU tensor, not a buffer
        # (not saved, and no .to(bfloat16) of the model can round the angles)
        self.inv_freq = ops.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def rope_angles(self, start_pos: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, hs/2) float32 of positions start_pos .. start_pos + T - 1."""
        return ops.rope_angles(self.inv_freq, start_pos, T, torch.float32, self.device)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache: KVCache | None = None,
                start_pos: int = 0, last_position_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V) for token ids idx (B, T) at positions start_pos.., or the mean loss against targets
        (B, T) - the contract of GPTModel.forward."""
        B, T = idx.shape
        self.check_positions(T, start_pos, cache)
        x = self.drop_emb(self.tok_emb(idx))                     # (B, T, C)
        rope = self.rope_angles(start_pos, T)
        if cache is not None and targets is None and (logits := cache.run_model(self, x, start_pos, rope)) is not None:
            return logits                    # one new position: the whole step in one call, where it fuses (kv_cache.py)
        for i, block in enumerate(self.trf_blocks):
            x = block(x, rope=rope) if cache is None else cache.run_block(i, block, x, start_pos, rope=rope)
        if last_position_only:
            if targets is not None:
                raise ValueError("last_position_only is for logits; the loss needs every position")
            x = x[:, -1:, :]
        x = self.final_norm(x)                                   # (B, T, C)
        if targets is None:
            return self.out_head(x)                              # (B, T, V) logits
        return self.lm_head_loss(x, targets)
