"""gptfast's kernels in transformers' Llama and Qwen3 models - the patch Liger-Kernel makes on GPUs, here on every
gptfast backend (the CPU kernels included). `apply_gptfast(model)` (gpt2.py dispatches here by model_type).

What changes - the parameters, their names and the saved files do not:
- attention: the layers run on attn_implementation "gptfast" (attention.py: grouped-query attention on our op);
- rms_norm: every LlamaRMSNorm / Qwen3RMSNorm (the blocks', the final one, Qwen3's per-head q/k norms) computes
  through ops.rms_norm (the module's class becomes a subclass: same weight, same keys);
- swiglu: the MLP's silu(gate) * up is ops.swiglu (hidden_act "silu");
- rope: transformers' apply_rotary_pos_emb of the model's modeling module computes through ops.rope when the
  positions are shared by the batch (every call but padded batches, which keep transformers' own). This one is
  module-wide, as Liger's is: every Llama (or Qwen3) model of the process rotates through gptfast from then on
  - the same math; `revert_gptfast_rope()` puts transformers' function back;
- loss: the CausalLM forward, given labels, computes HF's loss through ops.linear_cross_entropy (gpt2.py's
  causal_lm_loss): no (B, T, V) logits in training mode (logits None unless skip_logits=False).
"""
from __future__ import annotations

import types

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from gptfast import ops

MODEL_TYPES = ("llama", "qwen3")


def modeling_module(model_type: str):
    if model_type == "qwen3":
        from transformers.models.qwen3 import modeling_qwen3
        return modeling_qwen3
    from transformers.models.llama import modeling_llama
    return modeling_llama


class GptfastRMSNorm(nn.Module):
    """A transformers RMSNorm (LlamaRMSNorm, Qwen3RMSNorm) through ops.rms_norm: a patched module's class."""
    gptfast_backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return ops.rms_norm(x, w, self.variance_epsilon, backend=self.gptfast_backend)


def _patched_class(cls: type, base: type) -> type:
    """cls with base's forward first (one class per patched class, named for it)."""
    name = f"Gptfast{cls.__name__}"
    cached = _PATCHED.get((cls, base))
    if cached is None:
        cached = _PATCHED[(cls, base)] = type(name, (base, cls), {"__module__": __name__})
    return cached


_PATCHED: dict = {}


class GptfastSwiGLUMLP(nn.Module):
    """A transformers Llama/Qwen3 MLP whose silu(gate(x)) * up(x) is one op (ops.swiglu)."""
    gptfast_backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x), backend=self.gptfast_backend))


_ORIGINAL_ROPE: dict = {}
_ROPE_BACKEND: dict = {}


def _gptfast_rope(original, model_type: str):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        """transformers' contract: q (B, H, T, D), k (B, Hk, T, D), cos/sin (B, T, D) full width (unsqueeze_dim
        1, the last argument: after a position_ids in transformers 4, alone in 5)."""
        unsqueeze_dim = kwargs.get("unsqueeze_dim", args[-1] if args else 1)
        if unsqueeze_dim != 1 or cos.ndim != 3 or cos.shape[0] != 1 or q.ndim != 4 or q.shape[-1] % 2:
            return original(q, k, cos, sin, *args, **kwargs)                  # per-row positions: theirs
        half = q.shape[-1] // 2
        return ops.rope(q, k, cos[0, :, :half], sin[0, :, :half], backend=_ROPE_BACKEND[model_type])
    return apply_rotary_pos_emb


def _patch_rope(model_type: str, backend: str) -> None:
    module = modeling_module(model_type)
    _ROPE_BACKEND[model_type] = backend
    if model_type not in _ORIGINAL_ROPE:
        _ORIGINAL_ROPE[model_type] = module.apply_rotary_pos_emb
        module.apply_rotary_pos_emb = _gptfast_rope(_ORIGINAL_ROPE[model_type], model_type)


def revert_gptfast_rope() -> None:
    """transformers' own apply_rotary_pos_emb back in every modeling module apply_gptfast patched."""
    for model_type, original in list(_ORIGINAL_ROPE.items()):
        modeling_module(model_type).apply_rotary_pos_emb = original
        del _ORIGINAL_ROPE[model_type]


def apply_gptfast_llama(model, patch, backend: str, attention: bool, rms_norm: bool, swiglu: bool, rope: bool,
                        loss: bool):
    """The Llama/Qwen3 half of apply_gptfast (gpt2.py: the checks, the GptfastPatch, the loss forward)."""
    from .gpt2 import _fused_loss_forward, _patch_attention

    model_type = model.config.model_type
    module = modeling_module(model_type)
    if attention:
        _patch_attention(model, backend, patch, (module.LlamaAttention if model_type == "llama"
                                                 else module.Qwen3Attention))
    for name, m in model.named_modules():
        if rms_norm and type(m).__name__ in ("LlamaRMSNorm", "Qwen3RMSNorm"):
            m.__class__ = _patched_class(type(m), GptfastRMSNorm)
            m.gptfast_backend = backend
            patch.rms_norms += 1
        elif swiglu and type(m).__name__ in ("LlamaMLP", "Qwen3MLP"):
            if model.config.hidden_act != "silu" or getattr(m, "gate_proj", None) is None:
                patch.left_alone.append(f"{name}: hidden_act {model.config.hidden_act!r} is not SwiGLU's silu")
                continue
            m.__class__ = _patched_class(type(m), GptfastSwiGLUMLP)
            m.gptfast_backend = backend
            patch.swiglus += 1
    if rope:
        _patch_rope(model_type, backend)
        patch.rope = True
    if loss:
        if type(model).__name__.endswith("ForCausalLM"):
            model.forward = types.MethodType(_fused_loss_forward(type(model).forward, backend, CausalLMOutputWithPast),
                                             model)
            patch.fused_loss = True
        else:
            patch.left_alone.append(f"loss: {type(model).__name__} has no LM head (only *ForCausalLM's is fused)")
    return patch
