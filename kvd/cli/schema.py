"""`kvd schema`: the JSON Schema of the run spec."""

from __future__ import annotations

import json

import typer

from kvd.spec.runspec import json_schema


def schema() -> None:
    """Print the JSON Schema of the run spec (for editors and for generated docs)."""
    typer.echo(json.dumps(json_schema(), indent=2))


def register(app: typer.Typer) -> None:
    app.command("schema")(schema)
