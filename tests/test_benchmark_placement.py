"""`python -m benchmarks.teacher_placement --smoke` runs the teacher side of a step under
torchrun with 2 processes three ways (teachers replicated, FSDP-sharded, placed whole on one rank
each with their targets sent over) and writes its section of a results file (a temp one:
benchmarks/RESULTS.md is never touched here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_benchmark_ddp import table_rows
from tests.test_benchmarks import run_smoke, section


@pytest.mark.slow
def test_placement_smoke_times_three_configurations_and_placed_targets_equal_replicate(
    tmp_path: Path,
) -> None:
    body = section(run_smoke("teacher_placement", tmp_path / "RESULTS.md"), "teacher_placement")
    rows = {row["configuration"]: row for row in table_rows(body)}
    assert list(rows) == ["replicate", "fsdp", "placed"]
    # the placed targets are torch.equal to replicate's on every rank and step (the worker
    # asserts it: a difference fails the run), and so are fsdp's
    assert rows["placed"]["targets equal to replicate's"] == "yes, every step and rank"
    assert rows["fsdp"]["targets equal to replicate's"] == "yes, every step and rank"
    for row in rows.values():
        assert float(row["slowest rank s"]) > 0
        assert all(float(x) > 0 for x in row["peak RSS over steps MiB (rank 0 / 1)"].split(" / "))
    held = {c: [float(x) for x in r["teacher weights held MiB (rank 0 / 1)"].split(" / ")]
            for c, r in rows.items()}  # fmt: skip
    # fsdp holds half of every teacher per rank; placement splits the teachers between the ranks
    assert held["fsdp"] == pytest.approx([held["replicate"][0] / 2] * 2, rel=0.01)
    assert sum(held["placed"]) == pytest.approx(held["replicate"][0], abs=0.15)
    # the placed ranks exchange targets: each receives what the other computed for its batch
    for rank in (0, 1):
        got, sent = (
            float(x) for x in rows["placed"][f"rank {rank} MiB in / out per step"].split(" / ")
        )
        assert got > 0 and sent > 0
