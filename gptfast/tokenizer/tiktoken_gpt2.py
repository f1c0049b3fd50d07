"""GPT-2's tokenizer through tiktoken (fast Rust BPE), built from the BPE files shipped in the package.

tiktoken's own `get_encoding("gpt2")` downloads `vocab.bpe` and `encoder.json` on first use. We ship
both files (gptfast/tokenizer/gpt2/, OpenAI's modified MIT licence, see NOTICE) and hand tiktoken the
mergeable ranks read from them, so GPT-2 tokenization never needs the network or a cache folder and
keeps tiktoken's speed. The files are checked against the sha256 sums tiktoken itself expects.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil

from .bpe import ENDOFTEXT, GPT2_SPLIT_PATTERN, gpt2_bytes_to_unicode

GPT2_FILES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpt2")
# The sums tiktoken checks its downloads against (tiktoken_ext/openai_public.py).
GPT2_FILE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
GPT2_N_VOCAB = 50257                       # 50,256 BPE tokens + <|endoftext|>


class TokenizerUnavailableError(RuntimeError):
    """The requested tokenizer's files could not be found or are damaged."""


def gpt2_file(name: str) -> str:
    """Path of a shipped GPT-2 BPE file, verified against its sha256."""
    path = os.path.join(GPT2_FILES_DIR, name)
    try:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except OSError as err:
        raise TokenizerUnavailableError(
            f"GPT-2's {name} is missing from the gptfast package ({path}: {err.strerror}); reinstall gptfast "
            "(pip install -e .), or use our own byte-level BPE: --tokenizer bpe") from err
    if digest != GPT2_FILE_SHA256[name]:
        raise TokenizerUnavailableError(f"GPT-2's {name} in the gptfast package is damaged ({path}: sha256 "
                                        f"{digest}, expected {GPT2_FILE_SHA256[name]}); reinstall gptfast")
    return path


def gpt2_mergeable_ranks() -> dict[bytes, int]:
    """token bytes -> rank, as tiktoken wants them. In GPT-2's encoder.json a token's id is its merge
    rank (the 256 single bytes first, then the merges of vocab.bpe in order), so the ids serve as ranks."""
    with open(gpt2_file("encoder.json"), encoding="utf-8") as f:
        encoder = json.load(f)                         # token spelled in GPT-2's byte alphabet -> id
    byte_of = {ch: b for b, ch in gpt2_bytes_to_unicode().items()}
    encoder.pop(ENDOFTEXT, None)
    return {bytes(byte_of[ch] for ch in token): rank for token, rank in encoder.items()}


def _split_pattern() -> str:
    """tiktoken's spelling of GPT-2's pre-tokenizer (possessive quantifiers: same splits, no backtracking
    on long whitespace runs) where this tiktoken has one; GPT-2's original otherwise."""
    try:
        from tiktoken_ext.openai_public import r50k_pat_str
        return r50k_pat_str
    except ImportError:
        return GPT2_SPLIT_PATTERN


@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    """tiktoken's GPT-2 `Encoding`, from the shipped files (built once per process, ~0.1 s)."""
    import tiktoken

    return tiktoken.Encoding(name="gpt2", pat_str=_split_pattern(), mergeable_ranks=gpt2_mergeable_ranks(),
                             special_tokens={ENDOFTEXT: GPT2_N_VOCAB - 1}, explicit_n_vocab=GPT2_N_VOCAB)


class TiktokenGPT2:
    """tiktoken's GPT-2 encoding; `<|endoftext|>` is allowed in the text."""

    name = "gpt2"

    def __init__(self):
        self._enc = gpt2_encoding()

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

    def save_gpt2_files(self, folder: str) -> None:
        """GPT-2's own files under the names Hugging Face reads: encoder.json -> vocab.json,
        vocab.bpe -> merges.txt (the formats are the same)."""
        for src, dst in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
            shutil.copyfile(gpt2_file(src), os.path.join(folder, dst))

    def __repr__(self) -> str:
        return f"TiktokenGPT2(n_vocab={self.n_vocab}, files={GPT2_FILES_DIR})"
