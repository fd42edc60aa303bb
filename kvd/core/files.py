"""Files written whole or not at all: each goes to a temporary name beside its target and is
renamed into place only when complete, so a crash or a full disk never leaves half of one (and
the previous version, if any, stays as it was)."""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(target: Path, *, directory: bool) -> Iterator[Path]:
    """A temporary path beside `target`, renamed onto it when the block succeeds.

    A crash leaves only a `.tmp-*` entry, never a half-written `target`; when another process
    finished `target` first, its result is kept and ours dropped.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    work = tmp if directory else tmp / target.name
    try:
        yield work
        try:
            os.replace(work, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def exclusive(target: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `.TARGET.lock` beside `target` while the block runs, so that
    processes building the same cache entry take turns: on one machine, and across nodes where
    their shared file system supports flock. The block should check again whether `target` was
    made meanwhile. A process that has to wait says so on stderr, naming `what`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"kvd: waiting for another process that is {what}", file=sys.stderr)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` whole: a temporary file beside it, then a rename."""
    with atomic_path(path, directory=False) as work:
        work.write_text(text, encoding="utf-8")


def finite(data: Any) -> Any:
    """`data` with every non-finite float (NaN, inf) replaced by None, so it is valid JSON."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [finite(v) for v in data]
    return data


def json_text(data: Any, indent: int | None = 2) -> str:
    """Strict JSON of `data` (non-finite floats as null), with a final newline."""
    return json.dumps(finite(data), indent=indent, allow_nan=False) + "\n"
