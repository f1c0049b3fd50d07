"""Checkpoints: model + optimizer + config + tokenizer + progress, written atomically.

Everything in the file is tensors and plain Python types, so it loads with
`torch.load(weights_only=True)`: opening a checkpoint never runs pickled code.

A finished run also leaves `model.safetensors`: the weights alone (no optimizer, no progress), with
the model config and tokenizer in the file's metadata - no pickle at all, memory-mappable, and
accepted wherever a checkpoint is read to build a model (`--init-from`, `generate.py --checkpoint`).
"""
from __future__ import annotations

import json
import os

import torch

from ..files import atomic_write
from ..model import build_model, config_from_dict, prepare_quantized, quantization_of

CHECKPOINT_NAME = "checkpoint.pt"
PERIODIC_PREFIX = "ckpt-step"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_FORMAT = "gptfast-weights"


def save_checkpoint(path: str, model, optimizer=None, tokenizer=None, model_state: dict | None = None,
                    optimizer_state: dict | None = None, **progress) -> str:
    """Written to a temporary file next to `path`, then renamed: never a half-written checkpoint.
    `model_state` / `optimizer_state`: already gathered state dicts (a sharded run's) to store
    instead of the model's and optimizer's own."""
    if optimizer_state is None and optimizer is not None:
        optimizer_state = optimizer.state_dict()
    state = {
        "format": "gptfast-checkpoint",
        "version": 1,
        "config": model.cfg.to_dict(),
        "model": model_state if model_state is not None else model.state_dict(),
        "optimizer": optimizer_state,
        "tokenizer": tokenizer.spec() if tokenizer is not None else None,
        **progress,  # e.g. step, epoch, tokens_seen
    }
    with atomic_write(path) as f:
        torch.save(state, f)
    return path


def save_weights(path: str, model, tokenizer=None, model_state: dict | None = None) -> str:
    """The weights alone as safetensors, config and tokenizer in its metadata; written atomically.
    A tied LM head is stored once (safetensors refuses shared tensors) and re-tied on reading. A
    quantized model (gptfast.quantize) stores its int8 / bfloat16 weights as they are, int8 scales
    beside them (`<layer>.scales`), and its quantization in the metadata."""
    from safetensors.torch import save

    state = model_state if model_state is not None else model.state_dict()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()
               if not (model.cfg.tie_embeddings and not quantization_of(model) and k == "out_head.weight")}
    meta = {"format": WEIGHTS_FORMAT, "version": 1, "config": model.cfg.to_dict(),
            "tokenizer": tokenizer.spec() if tokenizer is not None else None}
    if quantization_of(model):
        meta["quantization"] = quantization_of(model)
    with atomic_write(path) as f:
        f.write(save(tensors, metadata={"format": "pt", "gptfast": json.dumps(meta)}))
    return path


def read_weights(path: str) -> dict:
    """A `save_weights` file as a checkpoint-like dict: config, model, tokenizer (no training state)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("gptfast", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise ValueError(f"{path} is not a readable safetensors file: {type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200] if str(err) else ''}") from None
    if meta.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path} holds no gptfast model config (not written by gptfast; for a Hugging Face "
                         "GPT-2 folder pass the folder)")
    if meta["config"].get("tie_embeddings") and "out_head.weight" not in tensors:
        tensors["out_head.weight"] = tensors["tok_emb.weight"]
    return {"format": WEIGHTS_FORMAT, "version": meta.get("version"), "config": meta["config"], "model": tensors,
            "tokenizer": meta.get("tokenizer"), "quantization": meta.get("quantization")}


def periodic_checkpoint_path(out: str, step: int) -> str:
    """Where `--checkpoint-every` (and a stop on a signal) writes the checkpoint after `step` steps."""
    return os.path.join(out, f"{PERIODIC_PREFIX}{step:07d}.pt")


def periodic_checkpoints(out: str) -> list[str]:
    """The run folder's ckpt-step*.pt files, oldest first."""
    if not os.path.isdir(out):
        return []
    return sorted(os.path.join(out, f) for f in os.listdir(out) if f.startswith(PERIODIC_PREFIX) and f.endswith(".pt"))


def prune_checkpoints(out: str, keep: int) -> None:
    """Delete all but the newest `keep` (at least one) periodic checkpoints."""
    for old in periodic_checkpoints(out)[:-max(1, keep)]:
        os.remove(old)


def find_resume_checkpoint(resume: str, out: str) -> str:
    """`--resume`: a path as given, or `auto`: the newest periodic checkpoint in the run folder."""
    if resume != "auto":
        return resume
    found = periodic_checkpoints(out)
    if not found:
        raise FileNotFoundError(f"--resume auto: no {PERIODIC_PREFIX}*.pt in {out}")
    return found[-1]


def rng_states() -> dict:
    """Every random stream a training step draws from: Python's, torch's CPU and CUDA generators."""
    import random

    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    import random

    py = states["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))   # the saved tuple comes back with a list inside
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def read_checkpoint(path: str, map_location="cpu") -> dict:
    """The checkpoint's contents; a clear error for a missing, truncated, corrupt or foreign file.
    Only tensors and plain types are accepted (weights_only=True): no pickled code ever runs."""
    path = resolve_checkpoint_path(path)
    if path.endswith(".safetensors"):
        return read_weights(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:   # truncated zip, bad pickle opcodes, disallowed globals, ...
        raise ValueError(f"{path} is not a readable gptfast checkpoint (truncated, corrupt, or not "
                         f"written by gptfast): {type(err).__name__}: {str(err).splitlines()[0][:200]}") from None
    if not isinstance(state, dict) or state.get("format") != "gptfast-checkpoint":
        raise ValueError(f"{path} is not a gptfast checkpoint")
    if state.get("version") != 1:
        raise ValueError(f"{path} has checkpoint version {state.get('version')}; this gptfast reads version 1")
    return state


def resolve_checkpoint_path(path: str) -> str:
    """Accept a checkpoint file, a weights file, or a run folder holding `checkpoint.pt` (or, without
    it, `model.safetensors`)."""
    if os.path.isdir(path):
        weights = os.path.join(path, WEIGHTS_NAME)
        path = os.path.join(path, CHECKPOINT_NAME)
        if not os.path.isfile(path) and os.path.isfile(weights):
            path = weights
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(path: str, map_location="cpu", backend: str | None = None) -> tuple[object, dict]:
    """Rebuild the model from a checkpoint (or weights file); returns (model, the raw checkpoint dict).
    A quantized weights file gives the quantized model (state["quantization"] names how)."""
    state = read_checkpoint(path, map_location)
    cfg = config_from_dict(state["config"])   # GPT-2 or Llama/Qwen3 (its "family")
    cfg.backend = backend  # a runtime choice, not a property of the weights: None -> env/default
    model = build_model(cfg)
    if state.get("quantization"):
        prepare_quantized(model, state["quantization"])
    model.load_state_dict(state["model"])
    return model, state
