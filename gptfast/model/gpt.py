"""The GPT model, block by block: embeddings -> N x (pre-LN attention + feed-forward) -> LM head.

Every LayerNorm, GELU, attention, residual dropout, linear layer of inference and the LM head's loss go through
`gptfast.ops`, so the same model runs on the `reference`, `torch` or any kernel backend; `set_backend` switches
all of them at once.
Shapes: B batch, T tokens, C = emb_dim, nh = n_heads, hs = C / nh, V = vocab_size.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from .. import ops
from .config import GPTConfig

__all__ = ["GPTModel", "KVCache", "TransformerBlock", "CausalSelfAttention", "FeedForward", "LayerNorm", "GELU",
           "Linear"]


class _WorkingCopy(torch.autograd.Function):
    """The float32 master weight as its 16-bit working copy: forward returns the copy (no cast), backward
    hands the 16-bit gradient to the master in float32 - what autocast's per-forward cast does, minus the
    cast. The copy is refreshed once per optimizer step (GPTModel.refresh_working_copies)."""

    @staticmethod
    def forward(ctx, master, working):
        return working.view_as(working)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(torch.float32), None


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) through `ops.linear`: in training that is
    F.linear on every backend; in inference the backend's kernel (the `extension` one on CPU reads
    the weights once for the few rows of a decoding step). Under autocast, a 16-bit working copy of
    the weight (GPTModel.keep_working_copies) stands in for autocast's cast of it on every forward."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, backend: str | None = None):
        super().__init__(in_features, out_features, bias=bias)
        self.backend = backend
        self.working: torch.Tensor | None = None                 # the weight in the autocast dtype (not saved)

    def working_weight(self, like: torch.Tensor) -> torch.Tensor:
        """The weight as autocast would use it for inputs like `like`: the working copy where one is kept."""
        kind = like.device.type
        if self.working is None or not torch.is_autocast_enabled(kind) or \
                torch.get_autocast_dtype(kind) != self.working.dtype:
            return self.weight
        return _WorkingCopy.apply(self.weight, self.working)

    def forward(self, x):                                        # (..., in) -> (..., out)
        return ops.linear(x, self.working_weight(x), self.bias, backend=self.backend)


class LayerNorm(nn.Module):
    """Learned scale (`weight`) and shift (`bias`) around a zero-mean, unit-variance row."""

    def __init__(self, emb_dim: int, eps: float = 1e-5, backend: str | None = None):
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(emb_dim))
        self.bias = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):                                        # (B, T, C) -> (B, T, C)
        return ops.layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)


class GELU(nn.Module):
    def __init__(self, backend: str | None = None):
        super().__init__()
        self.backend = backend

    def forward(self, x):
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


class LayerKV:
    """One layer's preallocated key/value cache: (B, nh, context_length, hs) each."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v


class KVCache:
    """Keys and values of every layer for positions already seen, so decoding one more token costs
    one position's work instead of the whole window's. Static shapes: allocated once for the full
    context length; `GPTModel.forward(idx, cache=cache, start_pos=start_pos)` writes positions start_pos onwards."""

    def __init__(self, cfg: GPTConfig, batch_size: int, device=None, dtype=torch.float32):
        shape = (batch_size, cfg.n_heads, cfg.context_length, cfg.head_dim)
        self.layers = [LayerKV(torch.zeros(shape, device=device, dtype=dtype),
                               torch.zeros(shape, device=device, dtype=dtype)) for _ in range(cfg.n_layers)]
        self.batch_size = batch_size


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
        self.W_qkv = None        # quantized models: Q, K, V stacked in one layer (one weight read, one call)

    def split_heads(self, x):                                    # (B, T, C) -> (B, nh, T, hs)
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x, kv: LayerKV | None = None, start_pos: int = 0):  # (B, T, C)
        B, T, C = x.shape
        if self.W_qkv is not None:
            q, k, v = (self.split_heads(t) for t in self.W_qkv(x).split(C, dim=-1))
        else:
            q = self.split_heads(self.W_query(x))                # (B, nh, T, hs)
            k = self.split_heads(self.W_key(x))
            v = self.split_heads(self.W_value(x))
        if kv is not None:                                       # decoding: remember, then attend to all so far
            kv.k.narrow(2, start_pos, T).copy_(k)                # (narrow: cheaper than slicing, per token)
            kv.v.narrow(2, start_pos, T).copy_(v)
            k, v = kv.k.narrow(2, 0, start_pos + T), kv.v.narrow(2, 0, start_pos + T)   # (B, nh, start_pos + T, hs)
        dropout_p = self.drop_rate if self.training else 0.0
        y = ops.causal_attention(q, k, v, dropout_p=dropout_p, backend=self.backend)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)                   # heads side by side again
        return self.out_proj(y)


class DropoutAdd(nn.Module):
    """residual + dropout(x) in one op (ops.dropout_add): the mask is regenerated from a seed in the
    backward, never stored; without a residual, plain dropout. In eval mode: residual + x."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.p, self.backend = cfg.drop_rate, cfg.backend

    def forward(self, x, residual=None):                         # (B, T, C) each
        if not self.training or self.p == 0.0:                   # eval (decoding: ~25 calls a token): the add
            return x if residual is None else x + residual
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
        self.backend = cfg.backend                               # of the fused decoding step (decode_weights)
        self.fused_decoding = True                               # off: decode op by op (GPTModel.set_fused_decoding)

    def forward(self, x, kv: LayerKV | None = None, start_pos: int = 0):  # (B, T, C)
        if kv is not None and x.shape[1] == 1 and not self.training and self.fused_decoding:   # one position: one call
            weights = self.decode_weights()                              # where the backend fuses the block
            if weights is not None and ops.fuses_decode_block(x, weights, kv.k, backend=self.backend):
                return ops.decode_block(x, weights, kv.k, kv.v, start_pos, backend=self.backend)
        x = self.drop_shortcut(self.att(self.norm1(x), kv, start_pos), x)   # dropout, then add the input back
        return self.drop_shortcut(self.ff(self.norm2(x)), x)

    def decode_weights(self) -> ops.BlockWeights | None:
        """The block's tensors as ops.decode_block reads them (None where autograd would need the result:
        the fused block has no backward)."""
        att, ff = self.att, self.ff
        if torch.is_grad_enabled() and self.norm1.weight.requires_grad or self.norm1.eps != self.norm2.eps:
            return None
        qkv = (att.W_qkv,) if att.W_qkv is not None else (att.W_query, att.W_key, att.W_value)

        def layer(m):                                            # nn.Linear, or a quantized WeightOnlyLinear
            return ops.LinearWeights(m.weight, getattr(m, "scales", None), m.bias)
        return ops.BlockWeights(self.norm1.weight, self.norm1.bias, tuple(layer(m) for m in qkv), layer(att.out_proj),
                                self.norm2.weight, self.norm2.bias, layer(ff.fc), layer(ff.proj), self.norm1.eps)


class GPTModel(nn.Module):
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
        self.quantization: str | None = None                     # "int8" / "bf16" after gptfast.quantize

    @property
    def backend(self) -> str:
        return self.cfg.backend

    def set_backend(self, name: str | None) -> "GPTModel":
        """Route every op of this model (gptfast.ops) through backend `name`."""
        name = ops.resolve_backend_name(name)
        self.cfg.backend = name
        for module in self.modules():
            if hasattr(module, "backend") and module is not self:
                module.backend = name
        return self

    def set_fused_decoding(self, on: bool) -> "GPTModel":
        """Whether a decoding step runs each block as one fused op where the backend has one (the default;
        ops.decode_block) or op by op (to compare: the results are the same)."""
        for block in self.trf_blocks:
            block.fused_decoding = bool(on)
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return self.pos_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (that of the position embedding, which quantization leaves as it is)."""
        return self.pos_emb.weight.dtype

    def keep_working_copies(self, dtype: torch.dtype) -> None:
        """Keep a `dtype` copy of every linear layer's weight (the LM head's too) for autocast at `dtype` to
        use instead of casting the float32 weights on every forward; refresh_working_copies() after each
        change of the weights (the optimizer step). Training under bfloat16 autocast calls this, once the
        model is on its device (the copies are plain attributes: `.to()` does not move them)."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.working = m.weight.detach().to(dtype)

    @torch.no_grad()
    def refresh_working_copies(self) -> None:
        """The working copies = the float32 weights, rounded: one multi-tensor pass."""
        pairs = [(m.working, m.weight) for m in self.modules() if isinstance(m, Linear) and m.working is not None]
        if pairs:
            torch._foreach_copy_([w for w, _ in pairs], [m for _, m in pairs])

    def new_kv_cache(self, batch_size: int) -> KVCache:
        return KVCache(self.cfg, batch_size, device=self.device, dtype=self.dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache: KVCache | None = None,
                start_pos: int = 0, last_position_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V) for token ids idx (B, T) at positions start_pos .. start_pos + T - 1; or, given
        `targets` (B, T), the mean next-token loss (ignore_index -100).

        V is cfg.padded_vocab_size: with vocab_multiple > 1 the last columns belong to ids no text
        contains; training pushes them down, and generation never samples them.

        With targets, every backend but `reference` fuses the LM head with the loss
        (ops.linear_cross_entropy): the (B, T, V) logits - the largest tensor of training - never exist.
        `reference` keeps the book's two visible steps, logits then cross-entropy.

        With a `cache`, keys and values of these positions are stored in it and attention also sees
        the cached positions before start_pos. `last_position_only`: logits (B, 1, V) of the last
        position alone - all generation needs after a prompt, and the LM head (the largest matmul)
        then runs on B rows instead of B * T.
        """
        if self.quantization and self.training:
            raise RuntimeError(f"this model's weights are quantized ({self.quantization}): it is for inference only "
                               "(call model.eval()); train the float32 model and quantize it afterwards")
        B, T = idx.shape
        if start_pos + T > self.cfg.context_length:
            raise ValueError(f"sequence length {start_pos + T} exceeds the model's context_length "
                             f"{self.cfg.context_length}")
        if start_pos and cache is None:
            raise ValueError("start_pos > 0 needs the cache holding the earlier positions")
        pos = torch.arange(start_pos, start_pos + T, device=idx.device)   # (T,)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C), pos broadcast over B
        for i, block in enumerate(self.trf_blocks):
            x = block(x, cache.layers[i] if cache is not None else None, start_pos)
        if last_position_only:
            if targets is not None:
                raise ValueError("last_position_only is for logits; the loss needs every position")
            x = x[:, -1:, :]                                     # (B, 1, C)
        x = self.final_norm(x)                                   # (B, T, C)
        if targets is None:
            return self.out_head(x)                              # (B, T, V) logits
        if self.cfg.backend == "reference" or self.quantization:   # the textbook (or a quantized LM head):
            logits = self.out_head(x).flatten(0, 1)              # logits, then the loss
            return ops.cross_entropy(logits, targets.flatten(), backend=self.cfg.backend)
        return ops.linear_cross_entropy(x, self.out_head.working_weight(x), targets, backend=self.cfg.backend)
