"""`kvd cache-teachers SPEC`: run the teachers once and store their aligned targets on disk."""

from __future__ import annotations

from pathlib import Path

import typer

from kvd.cli.errors import stdout
from kvd.cli.options import set_option
from kvd.core.errors import KvdError
from kvd.core.progress import Progress
from kvd.core.runtime import setup_runtime
from kvd.run.assemble import build_teacher_cache
from kvd.spec.runspec import load_spec
from kvd.step.curriculum import uses_teachers
from kvd.step.teacher_cache import ensure_empty


def cache_teachers(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="A YAML run spec."),
    overrides: list[str] = set_option(),
) -> None:
    """Store the teachers' aligned K/V (and logits where read) for every step of the run in
    training.teacher_cache; `kvd train` with the same spec then reads them instead."""
    spec = load_spec(spec_path, overrides)
    if not spec.training.teacher_cache:
        raise KvdError(
            f"{spec_path}: training.teacher_cache is not set",
            hint="add it to the spec or pass --set training.teacher_cache=FOLDER",
        )
    if not uses_teachers(spec):
        raise KvdError(f"{spec_path}: no loss reads the teachers; there is nothing to cache")
    root = Path(spec.training.teacher_cache)
    ensure_empty(root)  # before loading any model
    runtime = setup_runtime(spec.training.device)
    progress = Progress(label="cache", every=10)
    cache = build_teacher_cache(spec, runtime, spec_path.parent, root, progress)
    size = sum(p.stat().st_size for p in root.iterdir()) / 2**20
    stdout().print(f"cached {cache.steps} steps of teacher targets in {root} ({size:.0f} MB)")


def register(app: typer.Typer) -> None:
    app.command("cache-teachers")(cache_teachers)
