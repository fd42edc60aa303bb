"""kvd's cache directory: converted GGUF models and assembled PyPI GGUFs, written atomically."""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

from kvd.core.errors import KvdError

CACHE_ENV = "KVD_CACHE_DIR"


def cache_dir() -> Path:
    """`$KVD_CACHE_DIR`, else `~/.cache/kvd`; it must be a folder (or not exist yet)."""
    raw = os.environ.get(CACHE_ENV)
    path = Path(raw).expanduser() if raw else Path.home() / ".cache" / "kvd"
    if path.exists() and not path.is_dir():
        where = f"{CACHE_ENV}={raw}" if raw else str(path)
        raise KvdError(
            f"{where}: is not a folder (kvd keeps converted models there)",
            hint=f"point {CACHE_ENV} at a folder, or remove the file",
        )
    return path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file (memoised per path, size and mtime within a process)."""
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # part of the cache key only
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
