"""Checkpoints: model + optimizer + config + tokenizer + progress, written atomically.

Everything in the file is tensors and plain Python types, so it loads with
`torch.load(weights_only=True)`: opening a checkpoint never runs pickled code.
"""
from __future__ import annotations

import os

import torch

from ..files import atomic_write
from ..model import GPTConfig, GPTModel

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(path: str, model: GPTModel, optimizer=None, tokenizer=None, **progress) -> str:
    """Written to a temporary file next to `path`, then renamed: never a half-written checkpoint."""
    state = {
        "format": "gptfast-checkpoint",
        "version": 1,
        "config": model.cfg.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "tokenizer": tokenizer.spec() if tokenizer is not None else None,
        **progress,  # e.g. step, epoch, tokens_seen
    }
    with atomic_write(path) as f:
        torch.save(state, f)
    return path


def resolve_checkpoint_path(path: str) -> str:
    """Accept a checkpoint file or a run folder holding `checkpoint.pt`."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(path: str, map_location="cpu", backend: str | None = None) -> tuple[GPTModel, dict]:
    """Rebuild the model from a checkpoint; returns (model, the raw checkpoint dict)."""
    state = torch.load(resolve_checkpoint_path(path), map_location=map_location, weights_only=True)
    if state.get("format") != "gptfast-checkpoint":
        raise ValueError(f"{path} is not a gptfast checkpoint")
    cfg = GPTConfig.from_dict(state["config"])
    cfg.backend = backend  # a runtime choice, not a property of the weights: None -> env/default
    model = GPTModel(cfg)
    model.load_state_dict(state["model"])
    return model, state
