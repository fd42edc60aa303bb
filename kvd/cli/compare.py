"""`kvd compare A B [C ...]`: groups of runs against the first, with significance and plots."""

from __future__ import annotations

from pathlib import Path

import typer

from kvd.core.errors import KvdError
from kvd.study.compare import compare_groups, differences
from kvd.study.report import show, terminal, write_report
from kvd.study.runs import Group, expand


def unique_labels(groups: list[Group]) -> list[Group]:
    """Groups with distinct labels (a repeated label gets `#2`, `#3`, ...)."""
    seen: dict[str, int] = {}
    for g in groups:
        seen[g.label] = seen.get(g.label, 0) + 1
        if seen[g.label] > 1:
            g.label = f"{g.label}#{seen[g.label]}"
    return groups


def compare_command(
    args: list[str] = typer.Argument(
        ...,
        metavar="GROUP",
        help="Groups: a run dir, a folder of run dirs (seeds), a quoted glob, or a `kvd eval` "
        "JSON file; LABEL=ARG names a group. The first is the baseline.",
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Write report.md, compare.json and PNG plots into this folder."
    ),
    eval_name: str = typer.Option(
        "validation", "--eval", help="Read RUN/eval/NAME.json of each run when it exists."
    ),
    alpha: float = typer.Option(0.05, "--alpha", min=0.0, max=1.0, help="Significance level."),
    assert_equal: bool = typer.Option(
        False,
        "--assert-equal",
        help="Only check that all runs' metrics are identical; exit 1 where they differ.",
    ),
    tolerance: float = typer.Option(
        0.0,
        "--tolerance",
        min=0.0,
        help="With --assert-equal: allowed absolute/relative difference.",
    ),
) -> None:
    """Compare groups of runs: mean ± std, deltas against the first, p-values, plots."""
    groups = unique_labels([expand(a, eval_name) for a in args])
    console = terminal()
    if assert_equal:
        members = [m for g in groups for m in g.members]
        if len(members) < 2:
            raise KvdError("--assert-equal needs at least two runs")
        found = differences(members, tolerance)
        for line in found[:20]:
            console.print(line, markup=False)
        if found:
            console.print(f"{len(found)} difference(s) between {len(members)} runs", markup=False)
            raise typer.Exit(1)
        console.print(f"{len(members)} runs have identical metrics (tolerance {tolerance})")
        return
    result = compare_groups(groups, alpha=alpha)
    show(console, result)
    if out is not None:
        report = write_report(groups, result, out, title="kvd compare")
        console.print(f"report: {report}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("compare")(compare_command)
