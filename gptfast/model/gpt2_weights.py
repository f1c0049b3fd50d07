"""Load OpenAI's GPT-2 weights (Hugging Face format) into GPTModel.

A folder holds `config.json` and `model.safetensors` (or `pytorch_model.bin`, read with
`weights_only=True`: loading never runs pickled code). GPT-2's layers are Conv1D, whose weight is
stored (in, out) - the transpose of nn.Linear's - and the attention's Q, K, V projections are one
fused `c_attn` of width 3C, split here into W_query, W_key, W_value. The LM head is tied to the
token embedding, and the Q/K/V projections have biases.
"""
from __future__ import annotations

import json
import os

import torch

from .config import GPTConfig
from .gpt import GPTModel

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")   # 124M, 355M, 774M, 1558M


def gpt2_config(hf: dict, backend: str | None = None) -> GPTConfig:
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"unsupported activation {hf['activation_function']!r}: gptfast's GELU is the tanh form")
    if abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        raise ValueError(f"unsupported layer_norm_epsilon {hf['layer_norm_epsilon']}: gptfast uses 1e-5")
    return GPTConfig(vocab_size=hf["vocab_size"], context_length=hf["n_positions"], emb_dim=hf["n_embd"],
                     n_heads=hf["n_head"], n_layers=hf["n_layer"], drop_rate=hf.get("resid_pdrop", 0.1),
                     qkv_bias=True, tie_embeddings=True, backend=backend)


def read_state_dict(folder: str) -> dict:
    safetensors_path = os.path.join(folder, "model.safetensors")
    bin_path = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(safetensors_path):
        from safetensors.torch import load_file

        sd = load_file(safetensors_path)
    elif os.path.isfile(bin_path):
        sd = torch.load(bin_path, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")
    # GPT2LMHeadModel saves "transformer.h.0...", GPT2Model and OpenAI's upload "h.0..."
    return {k.removeprefix("transformer."): v for k, v in sd.items()}


def gpt2_to_gptfast(sd: dict, cfg: GPTConfig) -> dict:
    """Rename and reshape a GPT-2 state dict into GPTModel's."""
    C = cfg.emb_dim
    out = {"tok_emb.weight": sd["wte.weight"], "pos_emb.weight": sd["wpe.weight"],
           "final_norm.weight": sd["ln_f.weight"], "final_norm.bias": sd["ln_f.bias"],
           "out_head.weight": sd["wte.weight"]}                   # tied
    for i in range(cfg.n_layers):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        w_qkv, b_qkv = sd[h + "attn.c_attn.weight"], sd[h + "attn.c_attn.bias"]   # (C, 3C), (3C,)
        for j, name in enumerate(("W_query", "W_key", "W_value")):
            out[f"{b}att.{name}.weight"] = w_qkv[:, j * C:(j + 1) * C].t()       # Conv1D (in, out) -> (out, in)
            out[f"{b}att.{name}.bias"] = b_qkv[j * C:(j + 1) * C]
        out[b + "att.out_proj.weight"] = sd[h + "attn.c_proj.weight"].t()
        out[b + "att.out_proj.bias"] = sd[h + "attn.c_proj.bias"]
        out[b + "ff.fc.weight"] = sd[h + "mlp.c_fc.weight"].t()
        out[b + "ff.fc.bias"] = sd[h + "mlp.c_fc.bias"]
        out[b + "ff.proj.weight"] = sd[h + "mlp.c_proj.weight"].t()
        out[b + "ff.proj.bias"] = sd[h + "mlp.c_proj.bias"]
        for src, dst in (("ln_1", "norm1"), ("ln_2", "norm2")):
            out[f"{b}{dst}.weight"] = sd[f"{h}{src}.weight"]
            out[f"{b}{dst}.bias"] = sd[f"{h}{src}.bias"]
    return {k: v.contiguous() for k, v in out.items()}


def resolve_gpt2_folder(name_or_path: str) -> str:
    """A local folder as is; a model name through huggingface_hub's download cache."""
    if os.path.isdir(name_or_path):
        return name_or_path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{name_or_path!r} is not a folder, and downloading it by name needs the "
                                "huggingface_hub package; pass a local folder (--gpt2-dir PATH)") from None
    try:
        return snapshot_download(name_or_path, allow_patterns=["config.json", "model.safetensors"])
    except Exception as err:
        raise FileNotFoundError(f"could not download {name_or_path!r} ({type(err).__name__}: {err}); offline, "
                                "pass a local folder with config.json and model.safetensors (--gpt2-dir PATH)") from err


def load_gpt2(name_or_path: str, backend: str | None = None) -> GPTModel:
    """GPTModel with GPT-2's weights, from a Hugging Face-format folder or a model name."""
    folder = resolve_gpt2_folder(name_or_path)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = gpt2_config(json.load(f), backend)
    model = GPTModel(cfg)
    missing, unexpected = model.load_state_dict(gpt2_to_gptfast(read_state_dict(folder), cfg), strict=False)
    if missing or unexpected:
        raise ValueError(f"GPT-2 weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model
