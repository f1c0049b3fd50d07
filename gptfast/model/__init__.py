"""The GPT model: config + presets, the modules it is built from, and the Hugging Face GPT-2 format (load, export)."""
from .config import PRESETS, GPTConfig
from .gpt2_weights import GPT2_NAMES, export_hf, load_gpt2
from .gpt import GELU, CausalSelfAttention, FeedForward, GPTModel, KVCache, LayerNorm, TransformerBlock

__all__ = ["GPTConfig", "PRESETS", "GPTModel", "TransformerBlock", "CausalSelfAttention",
           "FeedForward", "LayerNorm", "GELU", "KVCache", "load_gpt2", "export_hf", "GPT2_NAMES"]
