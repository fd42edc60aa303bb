"""Paths given in a spec or on the command line."""

from __future__ import annotations

from pathlib import Path


def local_path(raw: str, base_dir: Path) -> Path:
    """`raw` with `~` expanded; a relative path is taken from `base_dir` (the spec's folder)."""
    path = Path(raw).expanduser()
    return path if path.is_absolute() else base_dir / path
