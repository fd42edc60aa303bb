"""`kvd validate SPEC`: resolve every component and read every model's geometry, no weights."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from kvd.cli.options import set_option
from kvd.errors import KvdError, Problem, SpecError
from kvd.spec import ModelRef, component_refs, load_spec


def validate(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="A YAML run spec."),
    overrides: list[str] = set_option(),
) -> None:
    """Check a run spec: keys, types, component names and options, model files. Loads no weights."""
    spec = load_spec(spec_path, overrides)
    problems: list[Problem] = []
    models: list[tuple[str, ModelRef]] = [(f"teachers.{i}", t) for i, t in enumerate(spec.teachers)]
    models.append(("student", spec.student))
    described = {}
    for loc, ref in models:
        try:
            source = ref.build()
            geometry = source.geometry()
        except KvdError as exc:
            problems.append(Problem(loc, exc.message))
            continue
        described[loc] = (
            f"{source.describe()} ({geometry.architecture}, {geometry.num_layers} layers)"
        )
    if problems:
        raise SpecError(str(spec_path), problems)
    table = Table(title=f"{spec_path}: valid")
    table.add_column("location")
    table.add_column("component")
    for loc, component in component_refs(spec):
        table.add_row(loc, described.get(loc, component.component_name))
    Console(highlight=False).print(table)


def register(app: typer.Typer) -> None:
    app.command("validate")(validate)
