"""The GPT model: config + presets, and the modules it is built from."""
from .config import PRESETS, GPTConfig
from .gpt import GELU, CausalSelfAttention, FeedForward, GPTModel, LayerNorm, TransformerBlock

__all__ = ["GPTConfig", "PRESETS", "GPTModel", "TransformerBlock", "CausalSelfAttention",
           "FeedForward", "LayerNorm", "GELU"]
