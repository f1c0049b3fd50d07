"""The op interface the model calls. Each op is one module of this package - its argument checks, its
textbook `reference` math, its `torch` twin, its compiled kernels' contract and its cases:

    layer_norm.py            LayerNorm
    rms_norm.py              RMSNorm (Llama, Qwen3)
    gelu.py                  GELU (tanh approximation)
    swiglu.py                SwiGLU: silu(gate) * up (Llama, Qwen3)
    rope.py                  rotary position embedding of q and k (Llama, Qwen3)
    attention.py             causal_attention (with dropout; fewer queries than keys for a KV cache)
    cross_entropy.py         cross_entropy
    linear_cross_entropy.py  the LM head fused with the loss (no (N, V) logits held)
    dropout_add.py           residual + dropout (the mask regenerated from a seed)
    linear.py                the linear layers of inference: linear, linear_int8, linear_bf16
    linear_w8a8.py           int8 weights x int8 activations (quantized per row on the fly): integer dot products
    linear_int4.py           4-bit weights in groups of 32 or 64 x int8 activations
    decode_block.py          a whole block's one-token decoding step in one call, where a backend fuses it
    decode_block_llama.py    the same for a Llama/Qwen3 block (RMSNorm, RoPE, grouped-query attention, SwiGLU)
    decode_model.py          the whole model's one-token step (every block, the final norm, the LM head) in one call

Each op is computed by a selectable backend (`reference`, `torch`, `extension`, `triton`, `auto`),
chosen per call by `backend=`, which the model takes from its config, `--backend` or
$GPTFAST_BACKEND (registry.py). `OPS` lists the ops (spec.py); backends and harnesses read it.
"""
from __future__ import annotations

from .registry import (DEFAULT_BACKEND, BackendError, available_backends, get_backend, known_backends,
                       register_backend, resolve_backend_name, shares_dropout_rng, supports_kv_cache)
from .layer_norm import layer_norm
from .rms_norm import rms_norm
from .gelu import gelu
from .swiglu import swiglu
from .rope import rope, rope_angles, rope_inv_freq
from .attention import causal_attention
from .cross_entropy import cross_entropy
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_chunk_rows
from .dropout_add import dropout_add
from .linear import linear, linear_bf16, linear_int8
from .linear_w8a8 import linear_w8a8
from .linear_int4 import linear_int4
from .decode_block import BlockWeights, LinearWeights, decode_block, fuses_decode_block
from .decode_block_llama import LlamaBlockWeights, decode_block_llama, fuses_decode_block_llama
from .decode_model import DecodeStep, ModelWeights, decode_model, fuses_decode_model
from .spec import OPS

__all__ = ["layer_norm", "rms_norm", "gelu", "swiglu", "rope", "rope_angles", "rope_inv_freq", "causal_attention", "cross_entropy", "linear_cross_entropy",
           "linear_cross_entropy_chunk_rows", "dropout_add", "linear", "linear_int8", "linear_bf16", "linear_w8a8", "linear_int4", "decode_block",
           "fuses_decode_block", "decode_block_llama", "fuses_decode_block_llama", "LlamaBlockWeights",
           "decode_model", "DecodeStep", "fuses_decode_model", "ModelWeights", "BlockWeights", "LinearWeights", "OPS", "available_backends", "resolve_backend_name",
           "register_backend", "get_backend", "known_backends", "shares_dropout_rng", "supports_kv_cache",
           "BackendError", "DEFAULT_BACKEND"]
