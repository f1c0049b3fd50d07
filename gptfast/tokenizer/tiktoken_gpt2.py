"""GPT-2's tokenizer through tiktoken (fast Rust BPE), with an offline-friendly error."""
from __future__ import annotations

import os

ENDOFTEXT = "<|endoftext|>"


class TokenizerUnavailableError(RuntimeError):
    """The requested tokenizer's files could neither be found locally nor downloaded."""


def _unavailable_message(encoding: str, err: Exception) -> str:
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    where = (f"TIKTOKEN_CACHE_DIR={cache} does not hold them" if cache else
             "TIKTOKEN_CACHE_DIR is not set")
    return (
        f"Could not load tiktoken's '{encoding}' encoding: its BPE files are not cached and could not "
        f"be downloaded ({type(err).__name__}: {err}). {where}. To fix it, either go online once "
        "(tiktoken caches the files), or point TIKTOKEN_CACHE_DIR at a folder holding the cached "
        "GPT-2 files (e.g. `export TIKTOKEN_CACHE_DIR=../shared/data/tiktoken-cache`), or use our "
        "own byte-level BPE instead: `--tokenizer bpe` (trained on your corpus) or "
        "get_tokenizer('bpe', path=DIR) with DIR holding GPT-2's vocab.bpe and encoder.json."
    )


class TiktokenGPT2:
    """tiktoken's GPT-2 encoding; `<|endoftext|>` is allowed in the text."""

    name = "gpt2"

    def __init__(self, encoding: str = "gpt2"):
        import tiktoken

        try:
            self._enc = tiktoken.get_encoding(encoding)
        except Exception as err:  # network errors come in many types (requests, urllib, OSError)
            raise TokenizerUnavailableError(_unavailable_message(encoding, err)) from err
        self.encoding = encoding

    @property
    def n_vocab(self) -> int:
        return self._enc.n_vocab

    @property
    def eot_id(self) -> int:
        return self._enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special={ENDOFTEXT})

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])

    def spec(self) -> dict:
        return {"name": "gpt2"}

    def __repr__(self) -> str:
        return f"TiktokenGPT2(encoding={self.encoding!r}, n_vocab={self.n_vocab})"
