"""A Hugging Face `tokenizer.json` (Llama 3's, Qwen3's, any made with the `tokenizers` library) as a gptfast
tokenizer: encode, decode, n_vocab, eot_id, spec (the whole JSON, so a checkpoint carries it)."""
from __future__ import annotations

import json
import os


class HFTokenizer:
    """`tokenizers.Tokenizer` behind gptfast's tokenizer interface. Text round-trips: encode adds no special
    tokens, decode drops none."""

    def __init__(self, json_text: str, eot_token: str | None = None):
        from tokenizers import Tokenizer

        self._json = json_text
        self._tok = Tokenizer.from_str(json_text)
        self._eot = self._tok.token_to_id(eot_token) if eot_token else None

    @classmethod
    def from_folder(cls, folder: str) -> "HFTokenizer":
        """The tokenizer.json of a Hugging Face model folder; its end-of-text token from tokenizer_config.json's
        eos_token where given."""
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer.json in {folder}")
        eos = None
        config = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(config):
            with open(config, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
        with open(path, encoding="utf-8") as f:
            return cls(f.read(), eos)

    @property
    def n_vocab(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int | None:
        return self._eot

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def spec(self) -> dict:
        eot = self._tok.id_to_token(self._eot) if self._eot is not None else None
        return {"name": "hf", "json": self._json, "eot_token": eot}

    def save(self, folder: str) -> None:
        """tokenizer.json and a tokenizer_config.json naming the end-of-text token (what AutoTokenizer reads)."""
        with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(self._json)
        eot = self._tok.id_to_token(self._eot) if self._eot is not None else None
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **({"eos_token": eot} if eot else {})}, f,
                      indent=2)

    def __repr__(self) -> str:
        return f"HFTokenizer(n_vocab={self.n_vocab})"
