"""Tokenizers: tiktoken's GPT-2 encoding, our own byte-level BPE, and a Hugging Face tokenizer.json (hf_json.py).

Every tokenizer offers `encode(text) -> list[int]`, `decode(ids) -> str`, `n_vocab`, `eot_id`
and `spec()` (a small dict stored in checkpoints; `tokenizer_from_spec` rebuilds it).
"""
from __future__ import annotations

import os

from .bpe import GPT2_SPLIT_PATTERN, ByteLevelBPE, gpt2_bytes_to_unicode, learn_merges
from .hf_json import HFTokenizer
from .tiktoken_gpt2 import GPT2_FILES_DIR, TiktokenGPT2, TokenizerUnavailableError, gpt2_encoding

TOKENIZERS = ("gpt2", "bpe")
DEFAULT_BPE_VOCAB_SIZE = 1024


def get_tokenizer(name: str = "gpt2", *, path: str | None = None, text: str | None = None,
                  vocab_size: int = DEFAULT_BPE_VOCAB_SIZE):
    """Return a tokenizer by name.

    - "gpt2": tiktoken's GPT-2 encoding (50,257 tokens), built from the BPE files shipped in the
      package (GPT2_FILES_DIR): no download.
    - "bpe": our byte-level BPE. With `path` a folder holding GPT-2's `vocab.bpe` and
      `encoder.json`, those are loaded (ids identical to tiktoken's). With `path` an existing
      tokenizer file (written by `ByteLevelBPE.save`), it is loaded. Otherwise a new one is trained
      on `text` with `vocab_size` tokens, and saved to `path` when one is given.
    """
    if name == "gpt2":
        return TiktokenGPT2()
    if name == "bpe":
        if path and os.path.isdir(path):
            return ByteLevelBPE.from_gpt2_files(path)
        if path and os.path.isfile(path):
            return ByteLevelBPE.load(path)
        if text is None:
            raise ValueError("get_tokenizer('bpe') needs `text` to train on, or `path` to an existing "
                             "tokenizer file or a folder with GPT-2's vocab.bpe and encoder.json")
        tok = ByteLevelBPE.train(text, vocab_size)
        if path:
            tok.save(path)
        return tok
    raise ValueError(f"unknown tokenizer {name!r}; choose one of: {', '.join(TOKENIZERS)}")


def tokenizer_from_spec(spec: dict):
    """Rebuild a tokenizer from the `spec()` dict saved in a checkpoint."""
    if spec.get("name") == "gpt2":
        return TiktokenGPT2()
    if spec.get("name") == "bpe":
        return ByteLevelBPE.from_state(spec["state"])
    if spec.get("name") == "hf":
        return HFTokenizer(spec["json"], spec.get("eot_token"))
    raise ValueError(f"unknown tokenizer spec {spec.get('name')!r}")


__all__ = ["ByteLevelBPE", "TiktokenGPT2", "HFTokenizer", "GPT2_FILES_DIR", "gpt2_encoding", "TokenizerUnavailableError", "get_tokenizer",
           "tokenizer_from_spec", "gpt2_bytes_to_unicode", "learn_merges", "GPT2_SPLIT_PATTERN",
           "TOKENIZERS"]
