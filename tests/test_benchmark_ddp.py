"""`python -m benchmarks.ddp --smoke` runs real 1- and 2-process `kvd train` runs and writes its
section of a results file (a temp one: benchmarks/RESULTS.md is never touched here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_benchmarks import run_smoke, section


def table_rows(body: str) -> list[dict[str, str]]:
    """The markdown table of a section as {header: cell} rows."""
    lines = [line for line in body.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
            for line in lines[2:]]  # fmt: skip


@pytest.mark.slow
def test_ddp_smoke_writes_tokens_per_s_for_one_process_and_two_under_ddp_and_fsdp(
    tmp_path: Path,
) -> None:
    rows = table_rows(section(run_smoke("ddp", tmp_path / "RESULTS.md"), "ddp"))
    assert [(row["processes"], row["parallel"]) for row in rows] == [
        ("1", "-"),
        ("2", "ddp"),
        ("2", "fsdp"),
        ("2", "fsdp, teachers fsdp"),
    ]
    assert all(float(row["tokens/s"]) > 0 and float(row["rank peak RSS MiB"]) > 0 for row in rows)
    two, fsdp, both = (row for row in rows if row["processes"] == "2")
    assert fsdp["tokens/step"] == two["tokens/step"] == both["tokens/step"]  # the same batches
    one = next(row for row in rows if row["processes"] == "1")
    assert float(two["tokens/step"]) > float(one["tokens/step"])  # each rank its own batch
