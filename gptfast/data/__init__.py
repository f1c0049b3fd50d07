"""Data: load a corpus (path or cached URL), cut it into next-token windows, batch it."""
from .dataset import GPTDataset, create_dataloaders
from .download import (DEFAULT_CORPUS, VERDICT_URL, DownloadError, cache_path_for,
                       default_cache_dir, download, load_text)

__all__ = ["GPTDataset", "create_dataloaders", "load_text", "download", "DownloadError",
           "DEFAULT_CORPUS", "VERDICT_URL", "cache_path_for", "default_cache_dir"]
