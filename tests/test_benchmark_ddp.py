"""`python -m benchmarks.ddp --smoke` runs real 1- and 2-process `kvd train` runs and writes its
section of a results file (a temp one: benchmarks/RESULTS.md is never touched here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def table_rows(section: str) -> list[dict[str, str]]:
    """The markdown table of a section as {header: cell} rows."""
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
            for line in lines[2:]]  # fmt: skip


@pytest.mark.slow
def test_ddp_smoke_writes_tokens_per_s_for_one_and_two_processes(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.ddp", "--smoke", "--results", str(results)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 processes" in proc.stdout
    text = results.read_text()
    assert "<!-- bench:ddp -->" in text and "<!-- /bench:ddp -->" in text
    section = text.split("<!-- bench:ddp -->", 1)[1].split("<!-- /bench:ddp -->", 1)[0]
    rows = table_rows(section)
    by_processes = {row["processes"]: float(row["tokens/s"]) for row in rows}
    assert set(by_processes) == {"1", "2"}
    assert all(v > 0 for v in by_processes.values())
    two = next(row for row in rows if row["processes"] == "2")
    one = next(row for row in rows if row["processes"] == "1")
    assert float(two["tokens/step"]) > float(one["tokens/step"])  # each rank its own batch
