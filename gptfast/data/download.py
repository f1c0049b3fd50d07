"""Corpus loading: the shipped default corpus, a local path, or a URL downloaded once into a cache folder.

The default corpus, Edith Wharton's "The Verdict" (1908, public domain; 20,479 characters, 5,145 GPT-2
tokens: the book's training text), ships inside the package (gptfast/data/corpora/), so the main job
runs offline. Its URL still works as --data, through the download cache.

Downloads are atomic: bytes go to a temporary file in the cache folder, are checked (optional
sha256), and only then renamed into place, so an interrupted download never leaves a half-written
cache file behind.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request

from tqdm.auto import tqdm

from ..files import atomic_write

VERDICT_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
               "ch02/01_main-chapter-code/the-verdict.txt")
VERDICT_SHA256 = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
VERDICT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpora", "the-verdict.txt")
DEFAULT_CORPUS = VERDICT_PATH
SHIPPED_CORPORA = {VERDICT_PATH: 'The Verdict (Edith Wharton, 1908; public domain), shipped with gptfast'}


def describe_source(source) -> str:
    """How the run names its corpus: shipped corpora by title, everything else as given."""
    return SHIPPED_CORPORA.get(source, str(source)) if isinstance(source, str) else ", ".join(map(str, source))


class DownloadError(RuntimeError):
    """A corpus URL could not be fetched (and nothing was cached)."""


def default_cache_dir() -> str:
    return os.environ.get("GPTFAST_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "gptfast")


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://", "file://"))


def cache_path_for(url: str, cache_dir: str | None = None) -> str:
    """Where `url` is cached: its file name prefixed by a short hash of the whole URL."""
    name = os.path.basename(url.split("?", 1)[0]) or "download"
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:12]
    return os.path.join(cache_dir or default_cache_dir(), f"{digest}-{name}")


def download(url: str, dest: str, sha256: str | None = None, timeout: float = 30.0,
             progress: bool = True) -> str:
    """Download `url` to `dest` atomically; verify `sha256` when given. Returns `dest`."""
    digest = hashlib.sha256()
    with atomic_write(dest) as out, urllib.request.urlopen(url, timeout=timeout) as resp:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {os.path.basename(dest)}",
                  disable=not progress, leave=False) as bar:
            for block in iter(lambda: resp.read(1 << 16), b""):
                out.write(block)
                digest.update(block)
                bar.update(len(block))
        if total is not None and out.tell() != total:
            raise DownloadError(f"download of {url} was cut short: got {out.tell()} of {total} bytes")
        if sha256 is not None and digest.hexdigest() != sha256.lower():
            raise DownloadError(f"sha256 mismatch for {url}: expected {sha256}, got {digest.hexdigest()}")
    return dest


def load_text(source: str = DEFAULT_CORPUS, cache_dir: str | None = None,
              sha256: str | None = None, timeout: float = 30.0) -> str:
    """Return the text of a local file, or of a URL (downloaded once and cached).

    When a URL cannot be fetched and is not cached, raises DownloadError naming the URL and the
    `--data PATH` way out.
    """
    if not is_url(source):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"data file not found: {source}")
        with open(source, encoding="utf-8") as f:
            return f.read()
    if source == VERDICT_URL and sha256 is None:
        sha256 = VERDICT_SHA256
    path = cache_path_for(source, cache_dir)
    if not os.path.isfile(path):
        try:
            download(source, path, sha256=sha256, timeout=timeout)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise DownloadError(
                f"could not download {source} ({reason}) and no cached copy exists at {path}; "
                "connect to the internet once, or pass a local text file with --data PATH"
            ) from err
    with open(path, encoding="utf-8") as f:
        return f.read()
