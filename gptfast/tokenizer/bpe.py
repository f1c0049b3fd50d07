"""A byte-level BPE tokenizer written from scratch, the way GPT-2's works.

Text -> pre-tokenization regex (GPT-2's) -> each chunk as UTF-8 bytes -> repeatedly merge the adjacent
pair of tokens with the best (lowest) merge rank until no known pair is left.

Two ways to get one:
- `ByteLevelBPE.train(text, vocab_size)`: learn merges from a corpus (most frequent pair first).
- `ByteLevelBPE.from_gpt2_files(dir)`: read OpenAI's `vocab.bpe` + `encoder.json`; it then produces
  exactly the token ids of tiktoken's `gpt2` encoding.

Token ids and merge ranks are separate: in a trained tokenizer merge i creates id 256 + i, so they
coincide; in GPT-2's files the ids come from `encoder.json` and the ranks from the line order of
`vocab.bpe`.
"""
from __future__ import annotations

import heapq
import json
import os
from collections import Counter, defaultdict

import regex

from ..files import atomic_write

# GPT-2's pre-tokenizer: contractions, letters, numbers, other symbols (each optionally with one
# leading space), and whitespace runs (a run before a word gives its last space to that word).
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"
FORMAT = "gptfast-bpe"


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    `vocab.bpe` and `encoder.json` spell tokens with these characters so that no token contains
    whitespace or control characters. Printable Latin-1 bytes map to themselves; the other 68 bytes
    are given the code points 256, 257, ... in byte order.
    """
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("\u00a1"), ord("\u00ac") + 1))
    printable |= set(range(ord("\u00ae"), ord("\u00ff") + 1))
    mapping, shifted = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def _pairs_of(word: tuple[int, ...]) -> Counter:
    return Counter(zip(word, word[1:]))


def _merge_word(word: tuple[int, ...], pair: tuple[int, int], new_id: int) -> tuple[int, ...]:
    """Replace every non-overlapping occurrence of `pair` in `word`, left to right."""
    out, i, n = [], 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def learn_merges(word_counts: dict[tuple[int, ...], int], num_merges: int, first_id: int = 256,
                 native: bool | None = None) -> list[tuple[int, int, int]]:
    """The BPE training loop: `num_merges` times, merge the most frequent adjacent pair.

    `word_counts` maps each distinct pre-tokenized chunk (a tuple of byte ids) to its frequency.
    Ties go to the smallest pair (a, b), so training is deterministic. Returns merges as
    (a, b, new_id) with new_id = first_id, first_id + 1, ...

    `native`: use the C++ loop of gptfast._C (True), the Python loop below (False), or the C++ one
    when it is already built (None). Both give identical merges.
    """
    if native is not False:
        from ..compiled import load_extension, loaded_extension

        ext = load_extension() if native else loaded_extension()
        if ext is not None:
            words = list(word_counts)
            merged = ext.bpe_learn_merges([list(w) for w in words], [word_counts[w] for w in words],
                                          num_merges, first_id)
            return [tuple(m) for m in merged]
    return _learn_merges_python(word_counts, num_merges, first_id)


def _learn_merges_python(word_counts: dict[tuple[int, ...], int], num_merges: int,
                         first_id: int) -> list[tuple[int, int, int]]:
    """Pair frequencies kept up to date incrementally: a merge only re-counts the words that
    contain the merged pair; a lazy max-heap finds the most frequent pair."""
    words = list(word_counts)
    freqs = [word_counts[w] for w in words]
    pair_counts: Counter = Counter()
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> indices of words holding it
    for idx, word in enumerate(words):
        for pair, n in _pairs_of(word).items():
            pair_counts[pair] += n * freqs[idx]
            where[pair].add(idx)
    # Max-heap by (count desc, pair asc); stale entries are skipped when popped.
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    merges = []
    while len(merges) < num_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count or neg_count == 0:
            continue  # stale entry: the count changed after it was pushed
        new_id = first_id + len(merges)
        merges.append((pair[0], pair[1], new_id))
        changed = set()
        for idx in sorted(where.pop(pair, ())):
            old = words[idx]
            new = _merge_word(old, pair, new_id)
            for p, n in _pairs_of(old).items():
                pair_counts[p] -= n * freqs[idx]
                changed.add(p)
            for p, n in _pairs_of(new).items():
                pair_counts[p] += n * freqs[idx]
                where[p].add(idx)
                changed.add(p)
            words[idx] = new
        for p in changed:
            count = pair_counts[p]
            if count > 0:
                heapq.heappush(heap, (-count, p))
            else:
                del pair_counts[p]
    return merges


class ByteLevelBPE:
    """Byte-level BPE: `encode(text) -> list[int]`, `decode(ids) -> str`, `save`/`load`."""

    def __init__(self, vocab: dict[int, bytes], merges: list[tuple[int, int, int]],
                 special_tokens: dict[str, int] | None = None,
                 pattern: str = GPT2_SPLIT_PATTERN, name: str = "bpe"):
        self.vocab = dict(vocab)                       # id -> bytes (ordinary tokens)
        self.merges = [tuple(m) for m in merges]       # (a, b, new_id) in rank order
        self.special_tokens = dict(special_tokens or {})
        self.pattern = pattern
        self.name = name
        self._split = regex.compile(pattern)
        self._ranks = {(a, b): (rank, new) for rank, (a, b, new) in enumerate(self.merges)}
        ids_of = {tok: i for i, tok in self.vocab.items()}
        missing = [b for b in range(256) if bytes([b]) not in ids_of]
        if missing:
            raise ValueError(f"vocab lacks single-byte tokens for bytes {missing[:8]}...; "
                             "a byte-level BPE needs all 256")
        self._byte_ids = [ids_of[bytes([b])] for b in range(256)]
        self._special_ids = {i: s for s, i in self.special_tokens.items()}
        self._special_split = (regex.compile("(" + "|".join(regex.escape(s) for s in
                               sorted(self.special_tokens, key=len, reverse=True)) + ")")
                               if self.special_tokens else None)
        self._cache: dict[str, list[int]] = {}

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def train(cls, text: str, vocab_size: int, special_tokens=(ENDOFTEXT,),
              pattern: str = GPT2_SPLIT_PATTERN) -> "ByteLevelBPE":
        """Learn `vocab_size - 256 - len(special_tokens)` merges from `text`."""
        num_merges = vocab_size - 256 - len(special_tokens)
        if num_merges < 0:
            raise ValueError(f"vocab_size must be at least {256 + len(special_tokens)} "
                             f"(256 bytes + special tokens), got {vocab_size}")
        split = regex.compile(pattern)
        pieces = [text]
        if special_tokens:  # never learn merges across or inside special tokens
            specials = regex.compile("|".join(regex.escape(s) for s in special_tokens))
            pieces = specials.split(text)
        word_counts: Counter = Counter()
        for piece in pieces:
            for chunk in split.findall(piece):
                word_counts[tuple(chunk.encode("utf-8"))] += 1
        merges = learn_merges(word_counts, num_merges)
        vocab = {i: bytes([i]) for i in range(256)}
        for a, b, new in merges:
            vocab[new] = vocab[a] + vocab[b]
        next_id = 256 + len(merges)
        specials = {s: next_id + k for k, s in enumerate(special_tokens)}
        return cls(vocab, merges, specials, pattern)

    @classmethod
    def from_gpt2_files(cls, folder: str | None = None, *, vocab_bpe: str | None = None,
                        encoder_json: str | None = None) -> "ByteLevelBPE":
        """Load OpenAI's GPT-2 `vocab.bpe` (merges) and `encoder.json` (token -> id); by default the
        copies shipped in the package (gptfast/tokenizer/gpt2/)."""
        folder = folder or os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpt2")
        vocab_bpe = vocab_bpe or os.path.join(folder, "vocab.bpe")
        encoder_json = encoder_json or os.path.join(folder, "encoder.json")
        for path in (vocab_bpe, encoder_json):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"GPT-2 tokenizer file not found: {path}")
        with open(encoder_json, encoding="utf-8") as f:
            encoder = json.load(f)
        with open(vocab_bpe, encoding="utf-8") as f:
            lines = f.read().split("\n")
        byte_of = {ch: b for b, ch in gpt2_bytes_to_unicode().items()}
        specials = {ENDOFTEXT: encoder.pop(ENDOFTEXT)} if ENDOFTEXT in encoder else {}
        vocab = {i: bytes(byte_of[ch] for ch in tok) for tok, i in encoder.items()}
        merges = []
        for line in lines:
            if not line or line.startswith("#version"):
                continue
            a, b = line.split(" ")
            merges.append((encoder[a], encoder[b], encoder[a + b]))
        return cls(vocab, merges, specials, GPT2_SPLIT_PATTERN, name="gpt2-bpe")

    def save_gpt2_files(self, folder: str) -> None:
        """The inverse of from_gpt2_files, under the names Hugging Face reads: vocab.json (token ->
        id, tokens spelled with GPT-2's byte-to-character map, special tokens included) and
        merges.txt (one merge per line, in rank order). Only for GPT-2's pre-tokenizer pattern,
        which is the one Hugging Face's byte-level BPE applies."""
        if self.pattern != GPT2_SPLIT_PATTERN:
            raise ValueError("this BPE splits text with its own pattern, not GPT-2's; the Hugging Face GPT-2 "
                             "tokenizer would pre-tokenize differently, so it cannot be exported in that format")
        char = gpt2_bytes_to_unicode()
        spell = {i: "".join(char[b] for b in tok) for i, tok in self.vocab.items()}
        encoder = {tok: i for i, tok in sorted(spell.items())}
        encoder.update(self.special_tokens)
        with atomic_write(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(encoder, f, ensure_ascii=False)
        with atomic_write(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{spell[a]} {spell[b]}\n" for a, b, _ in self.merges))

    # ----------------------------------------------------------------------------- encode/decode
    @property
    def n_vocab(self) -> int:
        return max([*self.vocab, *self.special_tokens.values()]) + 1

    @property
    def eot_id(self) -> int | None:
        return self.special_tokens.get(ENDOFTEXT)

    def _encode_chunk(self, chunk: str) -> list[int]:
        cached = self._cache.get(chunk)
        if cached is not None:
            return cached
        ids = [self._byte_ids[b] for b in chunk.encode("utf-8")]
        while len(ids) >= 2:
            # the adjacent pair with the lowest merge rank wins; unknown pairs rank as infinity
            best = min(zip(ids, ids[1:]), key=lambda p: self._ranks.get(p, (float("inf"),))[0])
            if best not in self._ranks:
                break
            ids = list(_merge_word(tuple(ids), best, self._ranks[best][1]))
        if len(self._cache) < 200_000:
            self._cache[chunk] = ids
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode treating special-token strings as plain text."""
        ids: list[int] = []
        for chunk in self._split.findall(text):
            ids.extend(self._encode_chunk(chunk))
        return ids

    def encode(self, text: str, allowed_special: str | set = "all") -> list[int]:
        """Encode; special tokens in `allowed_special` ("all" by default) become their ids."""
        if self._special_split is None or not allowed_special:
            return self.encode_ordinary(text)
        allowed = self.special_tokens if allowed_special == "all" else set(allowed_special)
        ids: list[int] = []
        for part in self._special_split.split(text):
            if part in allowed:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def decode_bytes(self, ids) -> bytes:
        out = []
        for i in ids:
            i = int(i)
            if i in self.vocab:
                out.append(self.vocab[i])
            elif i in self._special_ids:
                out.append(self._special_ids[i].encode("utf-8"))
            else:
                raise ValueError(f"token id {i} is not in this tokenizer's vocabulary "
                                 f"(n_vocab={self.n_vocab})")
        return b"".join(out)

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ----------------------------------------------------------------------------- persistence
    def state(self) -> dict:
        """Plain-JSON state (ids as ints, token bytes as hex) for save() and checkpoints."""
        return {"format": FORMAT, "version": 1, "name": self.name, "pattern": self.pattern,
                "vocab": {str(i): tok.hex() for i, tok in sorted(self.vocab.items())},
                "merges": [list(m) for m in self.merges],
                "special_tokens": self.special_tokens}

    @classmethod
    def from_state(cls, state: dict) -> "ByteLevelBPE":
        if state.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} tokenizer file (format={state.get('format')!r})")
        vocab = {int(i): bytes.fromhex(h) for i, h in state["vocab"].items()}
        return cls(vocab, [tuple(m) for m in state["merges"]], state["special_tokens"],
                   state["pattern"], name=state.get("name", "bpe"))

    def save(self, path: str) -> None:
        with atomic_write(path, "w", encoding="utf-8") as f:
            json.dump(self.state(), f)

    @classmethod
    def load(cls, path: str) -> "ByteLevelBPE":
        with open(path, encoding="utf-8") as f:
            return cls.from_state(json.load(f))

    def spec(self) -> dict:
        return {"name": "bpe", "state": self.state()}

    def __repr__(self) -> str:
        return (f"ByteLevelBPE(name={self.name!r}, n_vocab={self.n_vocab}, "
                f"merges={len(self.merges)}, special_tokens={list(self.special_tokens)})")
