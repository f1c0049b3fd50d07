"""GPT-2 in the Hugging Face format, both ways: load OpenAI's weights into GPTModel, export ours.

A folder holds `config.json` and `model.safetensors` (or `pytorch_model.bin`, read with
`weights_only=True`: loading never runs pickled code). GPT-2's layers are Conv1D, whose weight is
stored (in, out) - the transpose of nn.Linear's - and the attention's Q, K, V projections are one
fused `c_attn` of width 3C, split here into W_query, W_key, W_value. OpenAI's LM head is tied to
the token embedding and its Q/K/V projections have biases; the book's model has neither, which an
exported folder states (`tie_word_embeddings`, zero biases) so `transformers` computes the same.
"""
from __future__ import annotations

import json
import os

import torch

from .config import GPTConfig
from .gpt import GPTModel
from .quantize import quantization_of

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")   # 124M, 355M, 774M, 1558M


def gpt2_config(hf: dict, backend: str | None = None) -> GPTConfig:
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"unsupported activation {hf['activation_function']!r}: gptfast's GELU is the tanh form")
    if abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        raise ValueError(f"unsupported layer_norm_epsilon {hf['layer_norm_epsilon']}: gptfast uses 1e-5")
    ours = hf.get("gptfast", {})              # what an exported gptfast model adds: its own layout
    return GPTConfig(vocab_size=hf["vocab_size"], context_length=hf["n_positions"], emb_dim=hf["n_embd"],
                     n_heads=hf["n_head"], n_layers=hf["n_layer"], drop_rate=hf.get("resid_pdrop", 0.1),
                     qkv_bias=ours.get("qkv_bias", True), tie_embeddings=hf.get("tie_word_embeddings", True),
                     vocab_multiple=ours.get("vocab_multiple", 1), backend=backend)


def hf_gpt2_config(cfg: GPTConfig, eot_id: int | None = None) -> dict:
    """config.json of a GPT2LMHeadModel computing what GPTModel(cfg) computes."""
    out = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
           "n_positions": cfg.context_length, "n_ctx": cfg.context_length, "n_embd": cfg.emb_dim,
           "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": None, "activation_function": "gelu_new",
           "resid_pdrop": cfg.drop_rate, "embd_pdrop": cfg.drop_rate, "attn_pdrop": cfg.drop_rate,
           "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "scale_attn_weights": True,
           "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32", "use_cache": True,
           "gptfast": {"qkv_bias": cfg.qkv_bias, "vocab_multiple": cfg.vocab_multiple}}
    if eot_id is not None:
        out["bos_token_id"] = out["eos_token_id"] = eot_id
    return out


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


# GPT-2 (Hugging Face) name -> GPTModel name, per block; Conv1D weights are the transposed nn.Linear's
_LINEARS = (("attn.c_proj", "att.out_proj"), ("mlp.c_fc", "ff.fc"), ("mlp.c_proj", "ff.proj"))
_NORMS = (("ln_1", "norm1"), ("ln_2", "norm2"))
_QKV = ("W_query", "W_key", "W_value")          # the three (C, C) slices of c_attn's (C, 3C) weight


def _block_tensors(i: int):
    """(GPT-2 name, GPTModel name, transposed) of block i's tensors, the fused Q/K/V aside."""
    h, b = f"h.{i}.", f"trf_blocks.{i}."
    for src, dst in _LINEARS:
        yield f"{h}{src}.weight", f"{b}{dst}.weight", True
        yield f"{h}{src}.bias", f"{b}{dst}.bias", False
    for src, dst in _NORMS:
        for part in ("weight", "bias"):
            yield f"{h}{src}.{part}", f"{b}{dst}.{part}", False


def _padded_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    """w with zero rows appended up to `rows` (a --pad-vocab model's embedding / LM head)."""
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])]) if rows > w.shape[0] else w


def gpt2_to_gptfast(sd: dict, cfg: GPTConfig) -> dict:
    """Rename and reshape a GPT-2 state dict into GPTModel's."""
    C, rows = cfg.emb_dim, cfg.padded_vocab_size
    head = sd["wte.weight"] if cfg.tie_embeddings else sd["lm_head.weight"]
    out = {"tok_emb.weight": _padded_rows(sd["wte.weight"], rows), "pos_emb.weight": sd["wpe.weight"],
           "final_norm.weight": sd["ln_f.weight"], "final_norm.bias": sd["ln_f.bias"],
           "out_head.weight": _padded_rows(head, rows)}
    for i in range(cfg.n_layers):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        w_qkv, b_qkv = sd[h + "attn.c_attn.weight"], sd[h + "attn.c_attn.bias"]   # (C, 3C), (3C,)
        for j, name in enumerate(_QKV):
            out[f"{b}att.{name}.weight"] = w_qkv[:, j * C:(j + 1) * C].t()       # Conv1D (in, out) -> (out, in)
            if cfg.qkv_bias:
                out[f"{b}att.{name}.bias"] = b_qkv[j * C:(j + 1) * C]
        for theirs, ours, transposed in _block_tensors(i):
            out[ours] = sd[theirs].t() if transposed else sd[theirs]
    return {k: v.contiguous() for k, v in out.items()}


def gptfast_to_gpt2(sd: dict, cfg: GPTConfig) -> dict:
    """The inverse: GPTModel's state dict as GPT2LMHeadModel's. Padded vocabulary rows are cut
    back, missing Q/K/V biases become zeros, an untied head is written as `lm_head.weight`."""
    V = cfg.vocab_size
    out = {"wte.weight": sd["tok_emb.weight"][:V], "wpe.weight": sd["pos_emb.weight"],
           "ln_f.weight": sd["final_norm.weight"], "ln_f.bias": sd["final_norm.bias"]}
    for i in range(cfg.n_layers):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        weights = [sd[f"{b}att.{name}.weight"] for name in _QKV]                  # 3 x (C, C), (out, in)
        out[h + "attn.c_attn.weight"] = torch.cat([w.t() for w in weights], dim=1)  # (C, 3C), (in, out)
        out[h + "attn.c_attn.bias"] = (torch.cat([sd[f"{b}att.{name}.bias"] for name in _QKV]) if cfg.qkv_bias
                                       else weights[0].new_zeros(3 * cfg.emb_dim))
        for theirs, ours, transposed in _block_tensors(i):
            out[theirs] = sd[ours].t() if transposed else sd[ours]
    out = {"transformer." + k: v for k, v in out.items()}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["out_head.weight"][:V]
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


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
    try:
        weights = gpt2_to_gptfast(read_state_dict(folder), cfg)
    except KeyError as err:
        raise ValueError(f"{folder}: the GPT-2 weights lack {err.args[0]!r}") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"GPT-2 weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def export_hf(model: GPTModel, folder: str, tokenizer=None, force: bool = False) -> str:
    """Write `model` as a Hugging Face GPT-2 folder: config.json, model.safetensors and, given a
    tokenizer, its files (vocab.json + merges.txt, tokenizer_config.json), so that
    `transformers.AutoModelForCausalLM.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)`
    load it with no gptfast code. `load_gpt2(folder)` (`--init-from folder`) reads it back.
    An existing non-empty folder is an error unless `force`."""
    from safetensors.torch import save_file

    if quantization_of(model):
        raise ValueError(f"the model's weights are quantized ({model.quantization}); the GPT-2 format holds float "
                         "weights: export the float32 checkpoint")
    if os.path.isfile(folder) or (os.path.isdir(folder) and os.listdir(folder) and not force):
        raise FileExistsError(f"{folder} already exists and is not an empty folder (force / --force overwrites)")
    os.makedirs(folder, exist_ok=True)
    cfg = model.cfg
    if tokenizer is not None and tokenizer.n_vocab > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.n_vocab} tokens but the model only {cfg.vocab_size}")
    eot = getattr(tokenizer, "eot_id", None)
    weights = gptfast_to_gpt2(model.state_dict(), cfg)
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    _write_json(os.path.join(folder, "config.json"), hf_gpt2_config(cfg, eot))
    if tokenizer is not None:
        save_gpt2_tokenizer(tokenizer, folder, cfg.context_length)
    return folder


def save_gpt2_tokenizer(tokenizer, folder: str, context_length: int) -> None:
    """GPT-2's BPE (or ours) as AutoTokenizer reads it: vocab.json + merges.txt, tokenizer_config.json."""
    tokenizer.save_gpt2_files(folder)
    special = "<|endoftext|>" if getattr(tokenizer, "eot_id", None) is not None else None
    _write_json(os.path.join(folder, "tokenizer_config.json"),
                {"tokenizer_class": "GPT2Tokenizer", "model_max_length": context_length,
                 "add_prefix_space": False, "add_bos_token": False,
                 **({"bos_token": special, "eos_token": special, "unk_token": special} if special else {})})


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
