"""`kvd check-shapes` (placeholder until the geometry report lands)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    del app
