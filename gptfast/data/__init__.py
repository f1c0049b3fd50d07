"""Data: load a corpus (path or cached URL), cut it into next-token windows, batch it."""
from .dataset import GPTDataset, RankStridedBatches, create_dataloaders, create_token_dataloaders
from .token_cache import corpus_files, load_corpus_tokens
from .download import (DEFAULT_CORPUS, VERDICT_URL, DownloadError, cache_path_for,
                       default_cache_dir, download, load_text)

__all__ = ["GPTDataset", "RankStridedBatches", "create_dataloaders", "create_token_dataloaders", "load_corpus_tokens", "corpus_files", "load_text", "download", "DownloadError",
           "DEFAULT_CORPUS", "VERDICT_URL", "cache_path_for", "default_cache_dir"]
