"""Large corpora: tokenize once into a uint16 token file (uint32 for vocabularies over 65,536), then read it
memory-mapped.

`load_corpus_tokens(paths, tokenizer)` takes text files and/or folders (every *.txt inside, sorted),
joins their documents with <|endoftext|>, and caches the token ids as raw uint16 next to the text
(`FILE.<tokenizer>.tokens.u16`, for a single file) or in the cache folder (several files or an
unwritable place, such as a read-only data folder), with a JSON sidecar naming the sources' sizes
and modification times so a changed source is re-tokenized. The result is a read-only np.memmap:
memory does not grow with the corpus.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from tqdm.auto import tqdm

from ..files import atomic_write
from .download import default_cache_dir


def corpus_files(paths) -> list[str]:
    files = []
    for p in [paths] if isinstance(paths, str) else paths:
        if os.path.isdir(p):
            files += sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".txt"))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"data file or folder not found: {p}")
    if not files:
        raise FileNotFoundError(f"no .txt files in {paths}")
    return files


def _fingerprint(files: list[str], tokenizer_name: str) -> dict:
    return {"tokenizer": tokenizer_name,
            "sources": [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]}


def writable_dir(folder: str) -> bool:
    """Writable for us *and* meant to be written: root passes os.access on read-only folders, so the
    mode's write bits are checked too (a data folder shipped read-only stays untouched)."""
    return os.access(folder, os.W_OK) and bool(os.stat(folder).st_mode & 0o222)


def token_cache_path(files: list[str], tokenizer_name: str, cache_dir: str | None = None) -> str:
    """Next to a single writable text file; otherwise in the cache folder, named by the sources."""
    if len(files) == 1 and writable_dir(os.path.dirname(os.path.abspath(files[0]))):
        return f"{files[0]}.{tokenizer_name}.tokens.u16"
    key = hashlib.sha256(json.dumps([os.path.abspath(f) for f in files]).encode()).hexdigest()[:12]
    return os.path.join(cache_dir or default_cache_dir(), f"{key}-{os.path.basename(files[0])}.{tokenizer_name}.tokens.u16")


def token_dtype(n_vocab: int) -> np.dtype:
    """uint16 while every id fits (GPT-2's 50,257), uint32 beyond 65,536 (Qwen3's 151,936, Llama 3's 128,256)."""
    return np.dtype(np.uint16 if n_vocab <= 65536 else np.uint32)


def load_corpus_tokens(paths, tokenizer, cache_dir: str | None = None, progress: bool = True) -> np.memmap:
    """uint16 (or, for vocabularies over 65,536, uint32) token ids of the corpus, memory-mapped; tokenized only
    when the cache is missing or stale."""
    dtype = token_dtype(tokenizer.n_vocab)
    files = corpus_files(paths)
    spec = tokenizer.spec()
    name = spec["name"]                                           # trained / loaded vocabularies: a content hash
    if name == "bpe":
        name += hashlib.sha256(json.dumps(spec["state"]["merges"]).encode()).hexdigest()[:8]
    elif name == "hf":
        name += hashlib.sha256(spec["json"].encode()).hexdigest()[:8]
    path = token_cache_path(files, name, cache_dir)
    if dtype == np.uint32:
        path = path.removesuffix(".u16") + ".u32"
    meta_path = path + ".json"
    want = _fingerprint(files, name)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if {k: meta[k] for k in want} == want and os.path.getsize(path) == dtype.itemsize * meta["n_tokens"]:
            return np.memmap(path, dtype=dtype, mode="r", shape=(meta["n_tokens"],))
    except (OSError, ValueError, KeyError):
        pass
    n_tokens = 0
    eot = tokenizer.eot_id
    with atomic_write(path) as out:
        for k, f in enumerate(tqdm(files, desc="tokenizing", unit="file", disable=not progress, leave=False)):
            with open(f, encoding="utf-8") as src:
                text = src.read()
            ids = tokenizer.encode(text) + ([eot] if eot is not None and k + 1 < len(files) else [])
            np.asarray(ids, dtype=dtype).tofile(out)
            n_tokens += len(ids)
    with atomic_write(meta_path, "w") as f:
        json.dump({**want, "n_tokens": n_tokens}, f)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,))
