"""`kvd plugins`: every registered component by kind, with its plugin, package and version."""

from __future__ import annotations

import json

import typer
from rich.table import Table
from rich.text import Text

from kvd.cli.errors import stdout
from kvd.core.hookspecs import KINDS
from kvd.core.manager import get_plugins


def plugins(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List installed components by kind, and plugins that failed to load."""
    loaded = get_plugins()
    rows = [
        {
            "kind": kind,
            "name": entry.name,
            "plugin": entry.plugin,
            "package": entry.package,
            "version": entry.version,
            "summary": entry.summary,
        }
        for kind in KINDS
        for entry in loaded.registry(kind)
    ]
    failures = [f.__dict__ for f in loaded.failures]
    if as_json:
        typer.echo(json.dumps({"components": rows, "failures": failures}, indent=2))
        return
    table = Table(title="kvd components")
    for col in ("kind", "name", "plugin", "package", "version", "summary"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(
            *(Text(row[c]) for c in ("kind", "name", "plugin", "package", "version", "summary"))
        )
    console = stdout()
    console.print(table)
    for failure in loaded.failures:
        console.print(
            f"failed: plugin {failure.name} ({failure.package}): {failure.error}", markup=False
        )


def register(app: typer.Typer) -> None:
    app.command("plugins")(plugins)
