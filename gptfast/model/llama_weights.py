"""Llama 3 and Qwen3 in the Hugging Face format, both ways: a folder's config.json + safetensors (one file, or
shards named by model.safetensors.index.json) into LlamaModel, and LlamaModel back into such a folder that
`transformers` loads as LlamaForCausalLM / Qwen3ForCausalLM with the same logits.

Hugging Face names its tensors model.layers.{i}.self_attn.q_proj, ...; ours follow the book (trf_blocks.{i}.att.
W_query, ...): HF_NAMES maps a block's names. The layouts are the same (nn.Linear (out, in), the rotate_half RoPE),
so nothing is transposed or permuted.
"""
from __future__ import annotations

import json
import os

import torch

from .. import ops
from .config import LlamaConfig
from .llama import LlamaModel
from .quantize import quantization_of

# Hugging Face name -> ours, per block (the norms of q and k: Qwen3 only)
HF_NAMES = {"input_layernorm.weight": "norm1.weight", "post_attention_layernorm.weight": "norm2.weight",
            "self_attn.q_proj.weight": "att.W_query.weight", "self_attn.k_proj.weight": "att.W_key.weight",
            "self_attn.v_proj.weight": "att.W_value.weight", "self_attn.o_proj.weight": "att.out_proj.weight",
            "self_attn.q_proj.bias": "att.W_query.bias", "self_attn.k_proj.bias": "att.W_key.bias",
            "self_attn.v_proj.bias": "att.W_value.bias",
            "self_attn.q_norm.weight": "att.q_norm.weight", "self_attn.k_norm.weight": "att.k_norm.weight",
            "mlp.gate_proj.weight": "ff.gate.weight", "mlp.up_proj.weight": "ff.up.weight",
            "mlp.down_proj.weight": "ff.down.weight"}
TOP_NAMES = {"model.embed_tokens.weight": "tok_emb.weight", "model.norm.weight": "final_norm.weight",
             "lm_head.weight": "out_head.weight"}
MODEL_TYPES = ("llama", "qwen3")


def is_llama_folder(folder: str) -> bool:
    """Whether `folder` holds a Hugging Face Llama or Qwen3 model (config.json's model_type)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f).get("model_type") in MODEL_TYPES


def llama_config(hf: dict, backend: str | None = None) -> LlamaConfig:
    """LlamaConfig of a Hugging Face config.json (transformers 4's rope_theta/rope_scaling or 5's rope_parameters)."""
    if hf.get("model_type") not in MODEL_TYPES:
        raise ValueError(f"model_type {hf.get('model_type')!r} is not a Llama or Qwen3 model ({', '.join(MODEL_TYPES)})")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported activation {hf['hidden_act']!r}: the Llama/Qwen3 feed-forward is SwiGLU (silu)")
    if hf.get("mlp_bias"):
        raise ValueError("feed-forward biases (mlp_bias) are not supported")
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = rope if rope.get("rope_type", "default") != "default" else hf.get("rope_scaling")
    return LlamaConfig(vocab_size=hf["vocab_size"], context_length=hf["max_position_embeddings"],
                       emb_dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"],
                       n_heads=hf["num_attention_heads"],
                       n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                       head_dim=hf.get("head_dim") or 0, n_layers=hf["num_hidden_layers"], rope_theta=float(theta),
                       rope_scaling=scaling or None, norm_eps=hf.get("rms_norm_eps", 1e-6),
                       qk_norm=hf["model_type"] == "qwen3", qkv_bias=bool(hf.get("attention_bias", False)),
                       tie_embeddings=bool(hf.get("tie_word_embeddings", False)), backend=backend)


def hf_llama_config(cfg: LlamaConfig, eot_id: int | None = None) -> dict:
    """config.json of the Qwen3ForCausalLM (qk_norm) or LlamaForCausalLM computing what LlamaModel(cfg) computes;
    rope_theta/rope_scaling as the released checkpoints write them (transformers 4 and 5 read them)."""
    qwen = cfg.qk_norm
    out = {"architectures": ["Qwen3ForCausalLM" if qwen else "LlamaForCausalLM"],
           "model_type": "qwen3" if qwen else "llama", "vocab_size": cfg.vocab_size,
           "max_position_embeddings": cfg.context_length, "hidden_size": cfg.emb_dim,
           "intermediate_size": cfg.hidden_dim, "num_attention_heads": cfg.n_heads,
           "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "num_hidden_layers": cfg.n_layers,
           "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
           "rope_scaling": cfg.rope_scaling, "attention_bias": cfg.qkv_bias, "attention_dropout": cfg.drop_rate,
           "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32", "use_cache": True}
    if eot_id is not None:
        out["eos_token_id"] = eot_id
    return out


def hf_to_gptfast(sd: dict, cfg: LlamaConfig) -> dict:
    """A Hugging Face Llama/Qwen3 state dict under our names (the tied LM head read from the embedding)."""
    out = {}
    for name, t in sd.items():
        if name in TOP_NAMES:
            out[TOP_NAMES[name]] = t
            continue
        parts = name.split(".", 3)                                 # model, layers, i, rest
        if parts[:2] != ["model", "layers"] or parts[3] not in HF_NAMES:
            if name.endswith("rotary_emb.inv_freq"):               # some checkpoints keep the (recomputed) table
                continue
            raise ValueError(f"unexpected tensor {name!r} in a Llama/Qwen3 state dict")
        out[f"trf_blocks.{parts[2]}.{HF_NAMES[parts[3]]}"] = t
    if cfg.tie_embeddings:
        out.pop("out_head.weight", None)
    return out


def gptfast_to_hf(sd: dict, cfg: LlamaConfig) -> dict:
    """The inverse of hf_to_gptfast; padded vocabulary rows cut back to vocab_size."""
    ours = {v: k for k, v in TOP_NAMES.items()}
    block = {v: k for k, v in HF_NAMES.items()}
    out = {}
    for name, t in sd.items():
        if name == "out_head.weight" and cfg.tie_embeddings:
            continue
        if name in ours:
            hf = ours[name]
            t = t[:cfg.vocab_size] if name in ("tok_emb.weight", "out_head.weight") else t
        else:
            _, i, rest = name.split(".", 2)                        # trf_blocks, i, rest
            hf = f"model.layers.{i}.{block[rest]}"
        out[hf] = t.detach().contiguous()
    return out


def read_safetensors(folder: str) -> dict:
    """Every tensor of a folder's model.safetensors, or of the shards its model.safetensors.index.json names."""
    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        sd = {}
        for shard in shards:
            sd.update(load_file(os.path.join(folder, shard)))
        return sd
    single = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(single):
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder}")
    return load_file(single)


def load_llama(folder: str, backend: str | None = None, dtype: torch.dtype = torch.float32) -> LlamaModel:
    """LlamaModel with a Hugging Face Llama/Qwen3 folder's weights (in `dtype`: float32 by default, whatever the
    checkpoint's bfloat16)."""
    with open(os.path.join(folder, "config.json")) as f:
        cfg = llama_config(json.load(f), backend)
    with torch.device("meta"):                                     # no random init of weights about to be replaced
        model = LlamaModel(cfg)
    weights = {k: v.to(dtype) for k, v in hf_to_gptfast(read_safetensors(folder), cfg).items()}
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "out_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{folder}: the weights do not fit the config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if cfg.tie_embeddings:
        model.out_head.weight = model.tok_emb.weight
    model.inv_freq = ops.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)   # (made on meta above)
    return model


def export_llama(model: LlamaModel, folder: str, tokenizer=None, force: bool = False) -> str:
    """Write `model` as a Hugging Face folder (config.json, model.safetensors and, given a tokenizer, its files:
    tokenizer.json, or GPT-2's vocab.json + merges.txt) that transformers loads as Qwen3ForCausalLM /
    LlamaForCausalLM; load_llama reads it back."""
    from safetensors.torch import save_file

    if quantization_of(model):
        raise ValueError(f"the model's weights are quantized ({model.quantization}); export the float32 checkpoint")
    if os.path.isfile(folder) or (os.path.isdir(folder) and os.listdir(folder) and not force):
        raise FileExistsError(f"{folder} already exists and is not an empty folder (force / --force overwrites)")
    os.makedirs(folder, exist_ok=True)
    cfg = model.cfg
    save_file(gptfast_to_hf(model.state_dict(), cfg), os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_llama_config(cfg, getattr(tokenizer, "eot_id", None)), f, indent=2)
    if hasattr(tokenizer, "save"):                                 # a tokenizer.json (HFTokenizer)
        tokenizer.save(folder)
    elif tokenizer is not None:                                    # GPT-2's BPE or ours: vocab.json + merges.txt
        from .gpt2_weights import save_gpt2_tokenizer
        save_gpt2_tokenizer(tokenizer, folder, cfg.context_length)
    return folder
