"""Pool the per-seed values of several `kvd ab` reports of one experiment (disjoint seeds) into
one across-seed comparison, as if their runs had been in one report.

    python scripts/pool_reports.py REPORT_DIR REPORT_DIR... --out DIR

Each REPORT_DIR holds a compare.json written by `kvd ab` against the same baseline (a
`vs_GROUP` folder for a reference group). The reports must agree on the experiment, its base
spec, steps, batch, window length, split digest and every group's overrides, and their seeds
must not overlap; else the script stops and says which. For each group and metric it writes the
pooled mean ± std, the difference from the baseline with a bootstrap interval, Welch's p and
Holm's correction over the groups (as `kvd ab` does across seeds), plus a paired t-test over
seeds (same seed, same data order and initialisation on both sides) as a secondary test. The
per-text tests stay in each report: their per-text values are not in compare.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from scipy import stats as scipy_stats

from kvd.study.stats import bootstrap_ci, holm, summarize, welch

SAME = (
    "name",
    "base",
    "steps",
    "batch_size",
    "grad_accum",
    "seq_len",
    "split_digest",
    "groups",
    "eval_part",
)
DEFAULTS = {"eval_part": "all"}  # reports written before the key existed
METRICS = {"bits_per_byte": "bits/byte", "perplexity": "perplexity"}
DIGITS = {"bits_per_byte": 4, "perplexity": 2}


def load(folder: Path) -> dict[str, Any]:
    path = folder / "compare.json"
    if not path.is_file():
        sys.exit(f"error: {path}: no such file (a `kvd ab` report folder holds one)")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def check(reports: list[tuple[Path, dict[str, Any]]]) -> None:
    (first_dir, first), *rest = reports
    for folder, other in rest:
        if other["baseline"] != first["baseline"]:
            sys.exit(f"error: {folder}: baseline {other['baseline']} vs {first['baseline']}")
        for key in SAME:
            a = first["experiment"].get(key, DEFAULTS.get(key))
            b = other["experiment"].get(key, DEFAULTS.get(key))
            if a != b:
                sys.exit(f"error: {folder}: experiment.{key} differs from {first_dir}: {b} vs {a}")
    seen: dict[int, Path] = {}
    for folder, report in reports:
        for seed in report["experiment"]["seeds"]:
            if seed in seen:
                sys.exit(f"error: seed {seed} is in both {seen[seed]} and {folder}")
            seen[seed] = folder


def pooled(reports: list[tuple[Path, dict[str, Any]]]) -> dict[str, Any]:
    """Per group: seeds and, per metric, the per-seed values in seed order."""
    out: dict[str, Any] = {}
    for _, report in reports:
        seeds = report["experiment"]["seeds"]
        for group in report["groups"]:
            g = out.setdefault(group["label"], {"seeds": [], "metrics": {m: [] for m in METRICS}})
            g["seeds"] += seeds
            for metric in METRICS:
                g["metrics"][metric] += group["metrics"][metric]["values"]
    for g in out.values():
        order = sorted(range(len(g["seeds"])), key=g["seeds"].__getitem__)
        g["seeds"] = [g["seeds"][i] for i in order]
        g["metrics"] = {m: [v[i] for i in order] for m, v in g["metrics"].items()}
    return out


def paired_t(a: list[float], b: list[float]) -> float:
    return float(scipy_stats.ttest_rel(b, a).pvalue)


def report(folders: list[Path], out: Path) -> str:
    reports = [(f, load(f)) for f in folders]
    check(reports)
    groups = pooled(reports)
    base = reports[0][1]["baseline"]
    others = [g for g in groups if g != base]
    lines = [
        f"# Pooled across seeds: {reports[0][1]['experiment']['name']}",
        "",
        "Written by `python scripts/pool_reports.py "
        + " ".join(str(f) for f in folders)
        + f" --out {out}` from the compare.json of each report (runs, code versions and per-text "
        "tests: in each report).",
        "",
        f"Baseline: `{base}`. Seeds: {', '.join(map(str, groups[base]['seeds']))}. Welch's "
        "t-test across seeds, Holm-corrected over the groups compared with the baseline (one "
        "family per metric), as `kvd ab`; the paired t-test over seeds is a secondary test.",
        "",
        "| group | metric | mean ± std | by seed | Δ vs baseline | Δ % | 95% CI | p (Welch) | "
        "p Holm | p (paired t, by seed) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    result: dict[str, Any] = {"baseline": base, "reports": [str(f) for f in folders], "rows": []}
    for metric, label in METRICS.items():
        ref = groups[base]["metrics"][metric]
        ps = [welch(ref, groups[g]["metrics"][metric]) for g in others]
        adjusted = holm(ps)
        d = DIGITS[metric]
        s = base_summary = summarize(ref)
        by_seed = ", ".join(f"{v:.{d}f}" for v in ref)
        lines.append(
            f"| {base} | {label} | {s.mean:.{d}f} ± {s.std:.{d}f} | {by_seed} | | | | | | |"
        )
        for g, p, p_holm in zip(others, ps, adjusted, strict=True):
            values = groups[g]["metrics"][metric]
            if groups[g]["seeds"] != groups[base]["seeds"]:
                sys.exit(f"error: group {g} has seeds {groups[g]['seeds']}, the baseline others")
            s = summarize(values)
            delta = s.mean - base_summary.mean
            ci = bootstrap_ci(ref, values)
            paired = paired_t(ref, values)
            row = {
                "group": g,
                "metric": metric,
                "values": values,
                "mean": s.mean,
                "std": s.std,
                "delta": delta,
                "relative": delta / base_summary.mean,
                "ci95": ci,
                "p": p,
                "p_holm": p_holm,
                "p_paired_t": paired,
            }
            result["rows"].append(row)
            lines.append(
                f"| {g} | {label} | {s.mean:.{d}f} ± {s.std:.{d}f} | "
                + ", ".join(f"{v:.{d}f}" for v in values)
                + f" | {delta:+.{d}f} | {100 * row['relative']:+.2f} | "
                + (f"[{ci[0]:+.{d}f}, {ci[1]:+.{d}f}]" if ci else "")
                + f" | {p:.3g} | {p_holm:.3g} | {paired:.3g} |"
            )
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    (out / "pooled.json").write_text(json.dumps(result, indent=1) + "\n")
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("reports", type=Path, nargs="+", help="kvd ab report folders (compare.json)")
    p.add_argument("--out", type=Path, required=True, help="folder for report.md and pooled.json")
    args = p.parse_args()
    if len(args.reports) < 2:
        sys.exit("error: give two or more report folders to pool")
    print(report(args.reports, args.out))


if __name__ == "__main__":
    main()
