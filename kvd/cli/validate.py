"""`kvd validate SPEC`: resolve every component, read every model's geometry and build the
teacher -> student plan that `kvd train` would build, without loading weights."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from kvd.cli.errors import stdout
from kvd.cli.options import set_option
from kvd.core.errors import PlanError
from kvd.shapes.plan import Choices, spec_plan, spec_sources
from kvd.spec.runspec import component_refs, load_spec


def validate(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="A YAML run spec."),
    overrides: list[str] = set_option(),
) -> None:
    """Check a run spec: keys, types, component names and options, model files, and the plan
    (shapes, layers, RoPE, lengths: what `kvd check-shapes` checks). Loads no weights.
    Exit 0: valid; 1: the plan cannot work; 2: bad input."""
    spec = load_spec(spec_path, overrides)
    sources = spec_sources(spec, str(spec_path))
    plan = spec_plan(sources, Choices.from_spec(spec))
    if plan.problems:
        raise PlanError(
            f"{spec_path}: the plan is unsound: " + "; ".join(plan.problems),
            hint=f"`kvd check-shapes {spec_path}` shows the whole plan",
        )
    locations = [f"teachers.{i}" for i in range(len(spec.teachers))] + ["student"]
    described = {
        loc: f"{src.describe()} ({geom.architecture}, {geom.num_layers} layers)"
        for loc, (_, _, src, geom) in zip(locations, sources, strict=True)
    }
    table = Table(title=f"{spec_path}: valid")
    table.add_column("location")
    table.add_column("component")
    for loc, component in component_refs(spec):
        table.add_row(loc, described.get(loc, component.component_name))
    stdout().print(table)


def register(app: typer.Typer) -> None:
    app.command("validate")(validate)
