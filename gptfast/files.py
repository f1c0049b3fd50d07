"""Atomic file writes: readers see the old file or the complete new one, never half of one."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager


@contextmanager
def atomic_write(path: str, mode: str = "wb", **open_kwargs):
    """Write to a temporary file beside `path`; rename it over `path` only if the block succeeds.

    An exception (or Ctrl-C) inside the block removes the temporary file and leaves `path` as it was.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".part-", dir=folder)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
