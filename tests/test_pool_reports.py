"""scripts/pool_reports.py: the per-seed values of several kvd ab reports pooled into one
across-seed comparison, refused when the reports are not of one experiment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvd.study.stats import holm, welch

ROOT = Path(__file__).resolve().parent.parent


def compare_json(
    folder: Path, seeds: list[int], values: dict[str, list[float]], **exp: Any
) -> Path:
    """A minimal compare.json of `kvd ab` with bits/byte `values` per group (perplexity 2**v)."""
    experiment = {
        "name": "study",
        "base": "base.yaml",
        "steps": 200,
        "batch_size": 8,
        "grad_accum": 1,
        "seq_len": 128,
        "split_digest": "abc",
        "groups": {g: [f"set {g}"] for g in values},
        "seeds": seeds,
    } | exp
    groups = [
        {
            "label": g,
            "metrics": {
                "bits_per_byte": {"values": v},
                "perplexity": {"values": [2**x for x in v]},
            },
        }
        for g, v in values.items()
    ]
    folder.mkdir(parents=True)
    (folder / "compare.json").write_text(
        json.dumps({"baseline": "single", "groups": groups, "experiment": experiment})
    )
    return folder


def pool(*folders: Path, out: Path) -> subprocess.CompletedProcess[str]:
    script = str(ROOT / "scripts" / "pool_reports.py")
    return subprocess.run(
        [sys.executable, script, *map(str, folders), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
        env={"PYTHONPATH": str(ROOT)},
    )


def test_pooled_tests_are_those_of_all_seeds_in_one_report(tmp_path: Path) -> None:
    a = compare_json(
        tmp_path / "a", [0, 1], {"single": [1.75, 1.78], "multi": [1.70, 1.72], "ce": [2.0, 2.1]}
    )
    b = compare_json(
        tmp_path / "b", [3, 2], {"single": [1.74, 1.77], "multi": [1.69, 1.73], "ce": [2.0, 2.05]}
    )
    done = pool(a, b, out=tmp_path / "out")
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "out" / "pooled.json").read_text())["rows"]
    multi = next(r for r in rows if r["group"] == "multi" and r["metric"] == "bits_per_byte")
    assert multi["values"] == [1.70, 1.72, 1.73, 1.69]  # seeds 0, 1, 2, 3
    single, ce = [1.75, 1.78, 1.77, 1.74], [2.0, 2.1, 2.05, 2.0]
    p_multi, p_ce = welch(single, multi["values"]), welch(single, ce)
    assert multi["p"] == pytest.approx(p_multi)
    assert multi["p_holm"] == pytest.approx(holm([p_ce, p_multi])[1])
    assert multi["delta"] == pytest.approx(sum(multi["values"]) / 4 - sum(single) / 4)
    assert "| multi | bits/byte |" in (tmp_path / "out" / "report.md").read_text()


def test_reports_of_different_experiments_or_shared_seeds_are_refused(tmp_path: Path) -> None:
    values = {"single": [1.7, 1.8], "multi": [1.6, 1.7]}
    a = compare_json(tmp_path / "a", [0, 1], values)
    other_split = compare_json(tmp_path / "b", [2, 3], values, split_digest="def")
    same_seed = compare_json(tmp_path / "c", [1, 2], values)
    done = pool(a, other_split, out=tmp_path / "out")
    assert done.returncode != 0 and "experiment.split_digest differs" in done.stderr
    done = pool(a, same_seed, out=tmp_path / "out2")
    assert done.returncode != 0 and "seed 1 is in both" in done.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()
