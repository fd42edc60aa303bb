"""Files written whole or not at all: each goes to a temporary name beside its target and is
renamed into place only when complete, so a crash or a full disk never leaves half of one (and
the previous version, if any, stays as it was)."""

from __future__ import annotations

import json
import math
import os
import shutil
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
