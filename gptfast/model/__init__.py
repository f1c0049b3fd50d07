"""The models: configs + presets (config.py), GPT-2 (gpt.py) and Llama 3 / Qwen3 (llama.py) with what they share
(base.py) and their KV cache (kv_cache.py), the Hugging Face formats (load, export), and weight-only quantization
for inference."""
from .config import FAMILIES, PRESETS, GPTConfig, LlamaConfig, config_from_dict, config_from_preset
from .gpt2_weights import GPT2_NAMES, export_hf, load_gpt2
from .gpt import GELU, CausalSelfAttention, FeedForward, GPTModel, KVCache, LayerNorm, Linear, TransformerBlock
from .llama import GroupedQueryAttention, LlamaBlock, LlamaModel, RMSNorm, SwiGLUFeedForward
from .llama_weights import export_llama, is_llama_folder, load_llama
from .quantize import QUANTIZATION_MODES, prepare_quantized, quantization_of, quantize


def build_model(cfg):
    """The model a config describes: GPTModel for a GPTConfig, LlamaModel for a LlamaConfig."""
    return LlamaModel(cfg) if isinstance(cfg, LlamaConfig) else GPTModel(cfg)


__all__ = ["GPTConfig", "LlamaConfig", "PRESETS", "FAMILIES", "config_from_dict", "config_from_preset", "build_model",
           "GPTModel", "TransformerBlock", "CausalSelfAttention", "FeedForward", "LayerNorm", "GELU", "Linear",
           "KVCache", "LlamaModel", "LlamaBlock", "GroupedQueryAttention", "SwiGLUFeedForward", "RMSNorm",
           "load_gpt2", "export_hf", "GPT2_NAMES", "load_llama", "export_llama", "is_llama_folder", "quantize", "prepare_quantized", "quantization_of",
           "QUANTIZATION_MODES"]
