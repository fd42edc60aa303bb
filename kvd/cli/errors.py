"""Printing: user-fixable errors (one screen, the place named, no traceback) and results."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

from kvd.core.errors import KvdError, SpecError

# Logs and pipes get long lines rather than a table folded at 80 columns.
stderr = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)

PIPED_WIDTH = 10_000
"""Columns of a command's output when it is not a terminal: no table folds or cuts a path."""


def stdout() -> Console:
    """The console of a command's results: the terminal's width, or PIPED_WIDTH in a pipe."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else PIPED_WIDTH)


def render_error(exc: KvdError, console: Console = stderr) -> None:
    """Print `exc` for a person: a table of problems for a spec, else one message and a hint."""
    if isinstance(exc, SpecError):
        table = Table(title=f"{exc.source}: the run spec has {len(exc.problems)} problem(s)")
        table.add_column("location", style="bold")
        table.add_column("problem")
        for problem in exc.problems:
            table.add_row(problem.loc, problem.message)
        console.print(table, markup=False)
    else:
        console.print(f"error: {exc.message}", markup=False)
    if exc.hint:
        console.print(f"hint: {exc.hint}", markup=False)
