"""The GPT model: config + presets, the modules it is built from, and GPT-2 weight loading."""
from .config import PRESETS, GPTConfig
from .gpt2_weights import GPT2_NAMES, load_gpt2
from .gpt import GELU, CausalSelfAttention, FeedForward, GPTModel, KVCache, LayerNorm, TransformerBlock

__all__ = ["GPTConfig", "PRESETS", "GPTModel", "TransformerBlock", "CausalSelfAttention",
           "FeedForward", "LayerNorm", "GELU", "KVCache", "load_gpt2", "GPT2_NAMES"]
