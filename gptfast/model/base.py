"""What every model of gptfast shares, whatever its blocks (gpt.py's GPT-2, llama.py's Llama 3 / Qwen3): switching
the ops' backend, its size, device and dtype, an empty KV cache, the checks on positions, and the LM head's loss."""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import ops
from .kv_cache import KVCache


class LanguageModel(nn.Module):
    """A token-ids-in, logits-out model with a `cfg`, a `final_norm` and an `out_head` Linear."""

    cfg: object

    @property
    def backend(self) -> str:
        return self.cfg.backend

    def set_backend(self, name: str | None) -> "LanguageModel":
        """Route every op of this model (gptfast.ops) through backend `name`."""
        name = ops.resolve_backend_name(name)
        self.cfg.backend = name
        for module in self.modules():
            if hasattr(module, "backend") and module is not self:
                module.backend = name
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return self.final_norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (that of the final norm, which quantization leaves as it is)."""
        return self.final_norm.weight.dtype

    def new_kv_cache(self, batch_size: int, fused: bool | str = True, length: int | None = None) -> KVCache:
        """An empty cache for `batch_size` sequences of up to `length` positions (default: the context length);
        `fused`: a one-token step runs as one op for the whole model, else one op a block, where the backend has
        them (kv_cache.py; "blocks": one op a block; False: op by op - the same results)."""
        return KVCache(self.cfg, batch_size, device=self.device, dtype=self.dtype, fused=fused, length=length)

    def check_positions(self, T: int, start_pos: int, cache) -> None:
        if start_pos + T > self.cfg.context_length:
            raise ValueError(f"sequence length {start_pos + T} exceeds the model's context_length "
                             f"{self.cfg.context_length}")
        if start_pos and cache is None:
            raise ValueError("start_pos > 0 needs the cache holding the earlier positions")

    def lm_head_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the LM head's logits for x (B, T, C) against targets (B, T).

        `reference` keeps the book's two visible steps: logits (B, T, V), then the loss. Every other backend
        fuses them (ops.linear_cross_entropy, the same math): the (B, T, V) logits - the largest tensor of
        training - never exist."""
        if self.cfg.backend == "reference":
            logits = self.out_head(x).flatten(0, 1)              # (B*T, V)
            # -log softmax(logits)[target], averaged - ops/cross_entropy.py: reference
            return ops.cross_entropy(logits, targets.flatten(), backend=self.cfg.backend)
        return ops.linear_cross_entropy(x, self.out_head.weight_for(x), targets, backend=self.cfg.backend)
