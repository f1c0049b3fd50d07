"""Autoregressive generation: feed the model its own predictions, one token at a time.

`generate_simple` is the textbook loop (the book's `generate_text_simple`, with its top-k and temperature):
run the whole window through the model for every new token and keep the last position's logits. Everything
after it computes the same tokens faster (tests/test_generate.py checks that they agree).

With a KV cache (the default where the op backend supports it) the prompt is run once (prefill)
and every further step feeds only the newest token, attending to the cached keys and values.
Once the sequence outgrows the context window the positions shift by one each step, which
invalidates the cache (positions are baked into the cached keys): from then on the cache is rebuilt
from the cropped window every step - the same work as the textbook path, and the same tokens.
A one-token step runs each block as one fused op where the backend has one (`ops.decode_block`:
the `extension` backend on CPU), instead of ~12 op calls a block.
"""
from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from . import ops


@torch.no_grad()
def generate_simple(model, idx: torch.Tensor, max_new_tokens: int, context_size: int | None = None,
                    temperature: float = 0.0, top_k: int | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend idx (B, T) by max_new_tokens tokens, the whole window through the model each time: (B, T + n).

    The baseline `generate` accelerates: it feeds only the newest token against a KV cache, skips the LM head
    for all but the last position, and samples from the same distribution (same tokens for the same seed)."""
    context_size = context_size or model.cfg.context_length
    model.eval()
    for _ in range(max_new_tokens):
        window = idx[:, -context_size:]                          # the last context_size tokens, (B, <= ctx)
        logits = model(window)[:, -1, :model.cfg.vocab_size]     # (B, V): the last position predicts the next
        if top_k is not None:                                    # keep the k largest, the rest can't be drawn
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if temperature > 0.0:                                    # sample: <1 sharper, >1 flatter
            probs = torch.softmax(logits / temperature, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)   # (B, 1)
        else:                                                    # greedy: the most likely token
            idx_next = logits.argmax(dim=-1, keepdim=True)       # (B, 1)
        idx = torch.cat((idx, idx_next), dim=1)                  # (B, T + 1)
    return idx


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token id per row from `logits` (B, V) -> (B, 1).

    Temperature 0 is greedy (argmax). Otherwise keep the `top_k` largest logits (if given), divide
    by the temperature (<1 sharper, >1 flatter), keep the smallest set of most likely tokens whose
    probability reaches `top_p` (nucleus, if given), and sample from what is left.
    """
    check_sampling(temperature, top_k, top_p)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= top_p          # the mass before it already reaches p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.inference_mode()   # no autograd at all: our ops skip their (Python) autograd wrappers, ~1.5 ms a token
def generate_tokens(model, idx: torch.Tensor, max_new_tokens: int, context_size: int | None = None,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    eos_id: int | None = None, seed: int | None = None,
                    use_cache: bool | None = None, compile: bool = False,
                    fused_decoding: bool | str = True) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B, 1) one step at a time (see `generate`)."""
    check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if idx.ndim != 2:
        raise ValueError(f"idx must have shape (batch, tokens), got {tuple(idx.shape)}")
    context_size = min(context_size or model.cfg.context_length, model.cfg.context_length)
    if use_cache is None:
        use_cache = ops.supports_kv_cache(model.backend, idx.device)
    generator = torch.Generator(device=idx.device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    B, T0 = idx.shape
    finished = torch.zeros(B, 1, dtype=torch.bool, device=idx.device)
    cache = model.new_kv_cache(B, fused=fused_decoding, length=min(context_size, T0 + max_new_tokens)) \
        if use_cache else None                                   # the positions this call can use, no more
    tokens = torch.empty(B, T0 + max_new_tokens, dtype=idx.dtype, device=idx.device)   # filled as we go
    tokens[:, :T0] = idx
    n = T0                                                       # tokens so far
    V = model.cfg.vocab_size                                     # padded logit columns are never sampled
    try:
        # prefill: the prompt (cropped to the context window) in one forward; the LM head on the last position only
        window = tokens[:, max(0, n - context_size):n]
        logits = model(window, cache=cache, start_pos=0, last_position_only=True)[:, -1, :V]   # (B, V)
        pos = window.shape[1]                                    # positions held in the cache
        for step in range(max_new_tokens):
            idx_next = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
            if eos_id is not None:
                idx_next = idx_next.masked_fill(finished, eos_id)
                finished |= idx_next == eos_id
            tokens[:, n] = idx_next[:, 0]
            n += 1
            yield idx_next
            if step + 1 == max_new_tokens or (eos_id is not None and bool(finished.all())):
                break
            if cache is not None and pos < context_size:         # room left: feed just the new token
                logits = decode_step(model, idx_next, cache, pos, compile)[:, -1, :V]
                pos += 1
            else:                                                # textbook path, or a full window
                window = tokens[:, max(0, n - context_size):n]
                logits = model(window, cache=cache, start_pos=0, last_position_only=True)[:, -1, :V]
    finally:
        model.train(was_training)


def _forward_one_token(model, idx, cache, start_pos):
    return model(idx, cache=cache, start_pos=start_pos)


_compiled_forward_one_token = None


def decode_step(model, idx: torch.Tensor, cache, start_pos: int, compile: bool = False) -> torch.Tensor:
    """Logits (B, 1, V) for the new tokens idx (B, 1) at position start_pos, the cache holding the earlier ones.

    With `compile`, the step runs as one torch.compile graph (dynamic shapes: one compilation serves
    every position; the first call compiles, ~15-30 s on 2 CPU cores, cached on disk after). A step
    then pays for its kernels, not for Python-level op calls. Where the blocks run fused
    (ops.decode_block) there are few calls left to save - see benchmarks/NOTES.md, "Fast generation".
    """
    global _compiled_forward_one_token
    if not compile:
        return model(idx, cache=cache, start_pos=start_pos)
    if _compiled_forward_one_token is None:
        _compiled_forward_one_token = torch.compile(_forward_one_token, dynamic=True, fullgraph=True)
    return _compiled_forward_one_token(model, idx, cache, start_pos)


def generate(model, idx: torch.Tensor, max_new_tokens: int, context_size: int | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, seed: int | None = None, use_cache: bool | None = None,
             compile: bool = False, fused_decoding: bool | str = True) -> torch.Tensor:
    """Extend `idx` (B, T) by up to `max_new_tokens` tokens; returns (B, T + n).

    Only the last `context_size` tokens (default: the model's context length) are seen by the
    model. Generation stops early once every row has produced `eos_id`; a row that finished keeps
    receiving `eos_id` while the others go on. `seed` makes sampling reproducible. `use_cache`:
    KV cache on/off; None = on where the op backend supports it (identical tokens either way).
    `compile`: run each one-token step as a compiled graph (see `decode_step`; worth it for long runs).
    `fused_decoding`: a one-token step as one op for the whole model where the backend has it, else one op a block
    (model/kv_cache.py); "blocks": one op a block; False: op by op - the same tokens every way.
    The model runs in eval mode (no dropout) and is put back in its previous mode afterwards.
    """
    new = list(generate_tokens(model, idx, max_new_tokens, context_size, temperature, top_k, top_p, eos_id,
                               seed, use_cache, compile, fused_decoding))
    return torch.cat([idx, *new], dim=1) if new else idx


def stream_text(model, tokenizer, prompt: str, max_new_tokens: int, stats: dict | None = None,
                **kwargs) -> Iterator[str]:
    """Yield the continuation of `prompt` as text pieces, as the tokens are produced.

    A piece is held back while the tokens so far end inside a multi-byte character. `stats`, if given,
    is filled as the tokens come: "tokens" so far, "first_token_s" (the prompt's forward and the first
    token) and "decode_s" (the tokens after it), in seconds.
    """
    device = model.device
    idx = text_to_token_ids(prompt, tokenizer).to(device)
    ids, emitted = [], ""
    t0 = time.perf_counter()
    for tok in generate_tokens(model, idx, max_new_tokens, **kwargs):
        ids.append(int(tok[0, 0]))                               # (int(): the token is computed by now)
        if stats is not None:
            elapsed = time.perf_counter() - t0
            stats.setdefault("first_token_s", elapsed)
            stats.update(tokens=len(ids), decode_s=elapsed - stats["first_token_s"])
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd") and len(text) > len(emitted):
            yield text[len(emitted):]
            emitted = text
    text = tokenizer.decode(ids)
    if len(text) > len(emitted):
        yield text[len(emitted):]


def text_to_token_ids(text: str, tokenizer) -> torch.Tensor:
    return torch.tensor(tokenizer.encode(text), dtype=torch.long).unsqueeze(0)  # (1, T)


def token_ids_to_text(ids: torch.Tensor, tokenizer) -> str:
    return tokenizer.decode(ids.squeeze(0).tolist())
