"""A run's data stage: corpus -> tokenizer -> train and validation loaders (this process's share)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..data import (DEFAULT_CORPUS, corpus_files, create_dataloaders, create_token_dataloaders, describe_source,
                    load_corpus_tokens, load_text)
from ..model import config_from_preset, is_llama_folder
from ..tokenizer import HFTokenizer, get_tokenizer
from .parallel import Parallelism
from .settings import ConfigError, TrainSettings


@dataclass
class TrainingData:
    tokenizer: object
    train_loader: object        # this process's micro-batches (every world_size-th of the shuffled order)
    val_loader: object
    context_length: int         # tokens per window
    size: str                   # how much text, for the banner


def corpus_mode(data) -> bool:
    """Several files, or a folder: tokenize once into a memory-mapped token file."""
    return not isinstance(data, str) and len(data) > 1 or (isinstance(data, str) and os.path.isdir(data))


def read_text(s: TrainSettings, parallel: Parallelism, echo) -> tuple[str, int]:
    """(text, where its training split ends): the whole text of a single file or URL, or the first MiB of
    a corpus (what a BPE trains on)."""
    if corpus_mode(s.data):
        with open(corpus_files(s.data)[0], encoding="utf-8") as f:
            text = f.read(1 << 20)
        return text, len(text)
    with parallel.main_first():                        # rank 0 downloads; the others read its cache
        text = load_text(s.data)
    if s.data == DEFAULT_CORPUS:
        echo(f"corpus: {describe_source(s.data)} ({len(text):,} characters; --data PATH|URL for your own)")
    return text, int(s.train_ratio * len(text))


def load_training_data(s: TrainSettings, parallel: Parallelism, echo) -> TrainingData:
    text, split = read_text(s, parallel, echo)
    if s.init_from and os.path.isdir(s.init_from) and is_llama_folder(s.init_from):
        tokenizer = HFTokenizer.from_folder(s.init_from)         # a Llama/Qwen3 model comes with its tokenizer
        echo(f"tokenizer: {s.init_from}/tokenizer.json ({tokenizer.n_vocab:,} tokens)")
    elif s.tokenizer == "bpe":
        echo(f"training a byte-level BPE tokenizer ({s.bpe_vocab_size} tokens) on the training split")
        tokenizer = get_tokenizer("bpe", text=text[:split], vocab_size=s.bpe_vocab_size)
    else:
        tokenizer = get_tokenizer(s.tokenizer)
    context_length = s.context_length or config_from_preset(s.model_preset(parallel.device)).context_length
    windows = dict(batch_size=s.batch_size, context_length=context_length, stride=s.stride or context_length,
                   train_ratio=s.train_ratio, num_workers=s.num_workers, seed=s.seed, shard=parallel.loader_shard())
    try:
        if corpus_mode(s.data):
            with parallel.main_first():                # rank 0 writes the token file; the others map it
                tokens = load_corpus_tokens(s.data, tokenizer, progress=parallel.progress(s.progress))
            size = f"{len(corpus_files(s.data))} files, {len(tokens):,} tokens (memory-mapped)"
            train_loader, val_loader = create_token_dataloaders(tokens, **windows)
        else:
            size = f"{len(text):,} characters"
            train_loader, val_loader = create_dataloaders(text, tokenizer, **windows)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return TrainingData(tokenizer, train_loader, val_loader, context_length, size)
