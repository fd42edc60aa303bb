"""The report of `kvd compare`: Markdown, JSON, plots, and console tables."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kvd.core.files import json_text, write_atomic
from kvd.study.compare import Metric
from kvd.study.runs import Group

METHOD = (
    "Each metric: mean ± std over a group's runs (seeds). Against the baseline: difference of "
    "means with a 95% bootstrap percentile interval (resampling runs) and Welch's t-test across "
    "seeds. Paired: Wilcoxon signed-rank test on per-sequence values of the same texts (bits per "
    "byte from `kvd eval`, else NLL in nats from results.json; each group averaged over its "
    "seeds) with a paired bootstrap interval. p-values are Holm-corrected over the groups "
    "compared with the baseline, one family per metric and test; `significant` is adjusted "
    "p < {alpha} (better / worse by the metric's direction)."
)


def number(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def pvalue(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.3g}"


def interval(ci: list[float] | tuple[float, float] | None, digits: int) -> str:
    return "n/a" if ci is None else f"[{number(ci[0], digits)}, {number(ci[1], digits)}]"


def metric_table(result: dict[str, Any]) -> dict[str, Metric]:
    """The result's metrics by key, in order (kvd's own, then lm-eval's)."""
    return {m["key"]: Metric(**m) for m in result["metrics"]}


def shown_metrics(result: dict[str, Any]) -> list[str]:
    present = {k for g in result["groups"] for k in g["metrics"]}
    return [k for k in metric_table(result) if k in present]


def metric_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the mean ± std table."""
    keys, by_key = shown_metrics(result), metric_table(result)
    header = ["group", "runs", "source"] + [by_key[k].label for k in keys]
    rows = []
    for g in result["groups"]:
        cells = [g["label"], str(len(g["runs"])), ", ".join(g["sources"])]
        for k in keys:
            s = g["metrics"].get(k)
            digits = by_key[k].digits
            cells.append(
                "n/a" if s is None else f"{number(s['mean'], digits)} ± {number(s['std'], digits)}"
            )
        rows.append(cells)
    return header, rows


PER_RUN = ("bits_per_byte", "perplexity")
"""The metrics whose every run's value the report lists (in run order: seeds)."""


def per_run_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of each run's value of the PER_RUN metrics, groups of 2+ runs."""
    keys, by_key = [k for k in PER_RUN if k in shown_metrics(result)], metric_table(result)
    header = ["group"] + [f"{by_key[k].label}, by run" for k in keys]
    rows = []
    for g in result["groups"]:
        if len(g["runs"]) < 2:
            continue
        cells = [g["label"]]
        for k in keys:
            vals = g["metrics"].get(k, {}).get("values", [])
            cells.append(", ".join(number(v, by_key[k].digits) for v in vals) or "n/a")
        rows.append(cells)
    return header, rows


def comparison_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = [
        "group",
        "metric",
        "Δ vs baseline",
        "Δ %",
        "95% CI",
        "p (Welch)",
        "p Holm",
        "significant",
    ]
    rows = []
    by_key = metric_table(result)
    for r in result["comparisons"]:
        digits = by_key[r["metric"]].digits
        rows.append(
            [
                r["group"],
                by_key[r["metric"]].label,
                f"{r['delta']:+.{digits}f}",
                number(100 * r["relative"], 2),
                interval(r["ci95"], digits),
                pvalue(r["p"]),
                pvalue(r["p_holm"]),
                r["significant"],
            ]
        )
    return header, rows


def paired_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = [
        "group",
        "texts",
        "mean Δ per text",
        "95% CI",
        "p (Wilcoxon)",
        "p Holm",
        "significant",
    ]
    rows = []
    for r in result["paired"]:
        if "p" not in r:
            rows.append([r["group"], "0", r["reason"], "", "", "", "n/a"])
            continue
        rows.append(
            [
                r["group"],
                str(r["texts"]),
                f"{r['delta']:+.5f} {r['unit']}",
                interval(r["ci95"], 5),
                pvalue(r["p"]),
                pvalue(r["p_holm"]),
                r["significant"],
            ]
        )
    return header, rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(result: dict[str, Any], plots: list[Path], *, title: str, intro: str = "") -> str:
    """The whole report; plot paths are linked relative to the report's folder."""
    parts = [f"# {title}", ""]
    if intro:
        parts += [intro, ""]
    parts += [
        f"Baseline: `{result['baseline']}`. " + METHOD.format(alpha=result["alpha"]),
        "",
        "## Metrics",
        "",
        _table(*metric_rows(result)),
        "",
    ]
    per_run = per_run_rows(result)
    if per_run[1]:  # no group of one run has a list to show
        parts += ["Each run (seed) of a group, in the order of its runs:", "", _table(*per_run), ""]
    parts += [
        "## Against the baseline",
        "",
        _table(*comparison_rows(result)) if result["comparisons"] else "(one group only)",
        "",
        "## Paired, per text",
        "",
        _table(*paired_rows(result)) if result["paired"] else "(one group only)",
        "",
    ]
    if plots:
        parts += ["## Plots", ""]
        parts += [f"![{p.stem}]({p.name})" for p in plots]
        parts.append("")
    return "\n".join(parts)


def terminal() -> Console:
    """stdout for tables: a terminal's width, or long lines in logs and pipes."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def print_table(console: Console, title: str, header: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title)
    for name in header:
        table.add_column(name)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def write_report(
    groups: list[Group],
    result: dict[str, Any],
    out: Path,
    *,
    title: str,
    intro: str = "",
    extra: dict[str, Any] | None = None,
) -> Path:
    """report.md, compare.json and the PNG plots into `out`; returns the report's path."""
    from kvd.study.plots import write_plots

    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(groups, out)
    data = result | (extra or {}) | {"plots": [p.name for p in plots]}
    write_atomic(out / "compare.json", json_text(data, indent=1))
    report = out / "report.md"
    write_atomic(report, markdown(result, plots, title=title, intro=intro))
    return report


def show(console: Console, result: dict[str, Any]) -> None:
    print_table(console, "metrics (mean ± std over runs)", *metric_rows(result))
    if result["comparisons"]:
        print_table(console, f"against {result['baseline']}", *comparison_rows(result))
        print_table(console, "paired, per text", *paired_rows(result))
