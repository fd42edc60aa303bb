"""`kvd ab EXPERIMENT`: train the groups x seeds grid of an experiment file, then report."""

from __future__ import annotations

from pathlib import Path

import typer

from kvd.core.errors import KvdError
from kvd.study.ab import execute, plan, plan_lines, rerun
from kvd.study.report import terminal


def ab_command(
    experiment: Path = typer.Argument(..., metavar="EXPERIMENT", help="An experiment YAML file."),
    min_seeds: int = typer.Option(
        3, "--min-seeds", min=1, help="Refuse experiments with fewer seeds (lower it for tests)."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Report folder (default: the experiment's `report`)."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the groups, their overrides and run dirs; train nothing."
    ),
    rerun_run: str | None = typer.Option(
        None,
        "--rerun",
        metavar="GROUP:SEED",
        help="Train a finished run again in a new dir and check that its metrics match within "
        "the experiment's tolerance (exit 1 where they do not).",
    ),
) -> None:
    """Run a rigorous comparison grid (resumable) and write its `kvd compare` report."""
    if not experiment.is_file():
        raise KvdError(f"{experiment}: no such experiment file")
    p = plan(experiment, min_seeds=min_seeds)
    if out is not None:
        p.report_dir = out
    console = terminal()
    if dry_run:
        for line in plan_lines(p):
            console.print(line, markup=False, soft_wrap=True)
        return
    if rerun_run is not None:
        found = rerun(p, rerun_run, console)
        for line in found[:20]:
            console.print(line, markup=False)
        tol = p.experiment.tolerance
        if found:
            console.print(f"{len(found)} difference(s) beyond tolerance {tol}", markup=False)
            raise typer.Exit(1)
        console.print(f"{rerun_run}: reproduced within tolerance {tol}", markup=False)
        return
    execute(p, console)


def register(app: typer.Typer) -> None:
    app.command("ab")(ab_command)
