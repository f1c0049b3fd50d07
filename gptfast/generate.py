"""Autoregressive generation: feed the model its own predictions, one token at a time."""
from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token id per row from `logits` (B, V) -> (B, 1).

    Temperature 0 is greedy (argmax). Otherwise keep only the `top_k` largest logits (if given),
    divide by the temperature (<1 sharper, >1 flatter) and sample from the softmax.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, context_size: int | None = None,
             temperature: float = 0.0, top_k: int | None = None, eos_id: int | None = None,
             seed: int | None = None) -> torch.Tensor:
    """Extend `idx` (B, T) by up to `max_new_tokens` tokens; returns (B, T + n).

    Only the last `context_size` tokens are fed to the model (the window it was trained on).
    Generation stops early once every row has produced `eos_id`; a row that finished keeps
    receiving `eos_id` while the others go on. `seed` makes sampling reproducible.
    The model runs in eval mode (no dropout) and is put back in its previous mode afterwards.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if idx.ndim != 2:
        raise ValueError(f"idx must have shape (batch, tokens), got {tuple(idx.shape)}")
    context_size = context_size or model.cfg.context_length
    generator = None
    if seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    finished = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
    try:
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -context_size:]                    # crop to the context window
            logits = model(idx_cond)[:, -1, :]                   # (B, V): the last position only
            idx_next = sample_next(logits, temperature, top_k, generator)  # (B, 1)
            if eos_id is not None:
                idx_next = idx_next.masked_fill(finished, eos_id)
                finished |= idx_next == eos_id
            idx = torch.cat((idx, idx_next), dim=1)              # (B, T + 1)
            if eos_id is not None and bool(finished.all()):
                break
    finally:
        model.train(was_training)
    return idx


def text_to_token_ids(text: str, tokenizer) -> torch.Tensor:
    return torch.tensor(tokenizer.encode(text), dtype=torch.long).unsqueeze(0)  # (1, T)


def token_ids_to_text(ids: torch.Tensor, tokenizer) -> str:
    return tokenizer.decode(ids.squeeze(0).tolist())
