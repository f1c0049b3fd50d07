"""Data: load a corpus (the shipped default, a path or a cached URL), cut it into next-token windows, batch it."""
from .dataset import GPTDataset, RankStridedBatches, create_dataloaders, create_token_dataloaders
from .token_cache import corpus_files, load_corpus_tokens
from .download import (DEFAULT_CORPUS, VERDICT_PATH, VERDICT_URL, DownloadError, cache_path_for,
                       default_cache_dir, describe_source, download, load_text)

__all__ = ["GPTDataset", "RankStridedBatches", "create_dataloaders", "create_token_dataloaders", "load_corpus_tokens", "corpus_files", "load_text", "download", "DownloadError",
           "DEFAULT_CORPUS", "VERDICT_PATH", "VERDICT_URL", "describe_source", "cache_path_for", "default_cache_dir"]
