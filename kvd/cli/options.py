"""Options shared by several commands."""

from __future__ import annotations

import typer

SET_HELP = "Override a spec value, e.g. --set training.max_steps=50 --set teachers.0.weight=2."


def set_option() -> list[str]:
    """The repeatable `--set KEY=VALUE` option of every command that reads a spec."""
    value: list[str] = typer.Option([], "--set", help=SET_HELP, metavar="KEY=VALUE")
    return value
