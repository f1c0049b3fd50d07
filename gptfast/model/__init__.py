"""The GPT model: config + presets, the modules it is built from, the Hugging Face GPT-2 format (load, export),
and weight-only quantization for inference."""
from .config import PRESETS, GPTConfig
from .gpt2_weights import GPT2_NAMES, export_hf, load_gpt2
from .gpt import GELU, CausalSelfAttention, FeedForward, GPTModel, KVCache, LayerNorm, Linear, TransformerBlock
from .quantize import QUANTIZATION_MODES, prepare_quantized, quantization_of, quantize

__all__ = ["GPTConfig", "PRESETS", "GPTModel", "TransformerBlock", "CausalSelfAttention",
           "FeedForward", "LayerNorm", "GELU", "Linear", "KVCache", "load_gpt2", "export_hf", "GPT2_NAMES",
           "quantize", "prepare_quantized", "quantization_of", "QUANTIZATION_MODES"]
