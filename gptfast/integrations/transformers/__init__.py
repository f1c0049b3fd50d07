"""gptfast's kernels inside Hugging Face transformers (needs `pip install -e ".[hf]"`).

Importing this module registers the attention implementation "gptfast" with transformers, so that

    AutoModelForCausalLM.from_pretrained(path, attn_implementation="gptfast")
    model.set_attn_implementation("gptfast")

run our causal attention (attention.py says what falls back to transformers' own, and why). For the rest -
LayerNorm, GELU (GPT-2) or RMSNorm, SwiGLU, RoPE (Llama, Qwen3), and the LM head fused with the loss:

    apply_gptfast(model, backend="auto")          # one model, in place (gpt2.py; Llama/Qwen3: llama.py)
    apply_gptfast_to_gpt2(backend="auto")         # every GPT-2 model built afterwards
"""
from .attention import NAME, GptfastFallbackWarning, gptfast_attention_forward, register
from .gpt2 import (GptfastGELU, GptfastLayerNorm, GptfastPatch, apply_gptfast, apply_gptfast_to_gpt2, causal_lm_loss,
                   revert_gptfast_for_gpt2)
from .llama import GptfastRMSNorm, GptfastSwiGLUMLP, revert_gptfast_rope

register()

__all__ = ["NAME", "GptfastFallbackWarning", "gptfast_attention_forward", "apply_gptfast", "apply_gptfast_to_gpt2",
           "revert_gptfast_for_gpt2", "causal_lm_loss", "GptfastPatch", "GptfastLayerNorm", "GptfastGELU", "GptfastRMSNorm",
           "GptfastSwiGLUMLP", "revert_gptfast_rope"]
