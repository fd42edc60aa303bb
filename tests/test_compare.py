"""`kvd compare` on tiny runs: the report, groups by folder, glob and label, reproducibility
checks (`--assert-equal`), and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvd.cli.app import main
from kvd.run.train import train
from kvd.spec.runspec import parse_spec
from tests.specs import tiny_spec

SMALL_DATA = {"name": "stdlib", "seq_len": 48, "tasks": ["module_doc"]}  # quick to build


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/{ce,kv}/seed{0,1} and runs/twin (ce, seed 0 again): 2-step tiny runs."""
    root = tmp_path_factory.mktemp("compare")
    grid = [
        ("ce/seed0", 0, "ce"),
        ("ce/seed1", 1, "ce"),
        ("kv/seed0", 0, "kv"),
        ("kv/seed1", 1, "kv"),
    ]
    for where, seed, kind in [*grid, ("twin", 0, "ce")]:
        data = tiny_spec(root / where, seed=seed, data=SMALL_DATA)
        data["training"]["max_steps"] = 2
        if kind == "ce":
            data["losses"] = [{"name": "ce"}]
        else:
            data["fusion"] = {"name": "similarity"}  # learned routing: a heatmap to draw
        train(parse_spec(data), data, base_dir=Path("."))
    return root


def test_report_over_folders_of_seeds(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main(["compare", str(runs / "ce"), f"kv={runs}/kv/seed*", "--out", str(out)]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["baseline"] == "ce"
    assert [g["label"] for g in result["groups"]] == ["ce", "kv"]
    assert [len(g["runs"]) for g in result["groups"]] == [2, 2]
    bpb = {r["metric"]: r for r in result["comparisons"]}["bits_per_byte"]
    assert bpb["p"] is not None and bpb["p_holm"] >= bpb["p"] and bpb["ci95"] is not None
    (paired,) = result["paired"]
    assert paired["texts"] == 2 and paired["unit"] == "nats"  # results.json NLL, same texts
    report = (out / "report.md").read_text()
    assert "## Against the baseline" in report and "bits/byte" in report
    kv = result["groups"][1]["metrics"]["bits_per_byte"]["values"]  # every seed's value
    assert f"| kv | {kv[0]:.4f}, {kv[1]:.4f} |" in report
    for png in ("loss_curves.png", "kv_loss_and_validation.png", "routing_kv.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG"), png
        assert f"({png})" in report


def test_one_run_per_group_lists_no_empty_per_run_table(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert (
        main(["compare", str(runs / "ce" / "seed0"), str(runs / "kv" / "seed0"), "--out", str(out)])
        == 0
    )
    report = (out / "report.md").read_text()
    assert "## Metrics" in report and "Each run (seed)" not in report and ", by run" not in report


def test_assert_equal(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", str(runs / "ce" / "seed0"), str(runs / "twin"), "--assert-equal"]) == 0
    assert "identical" in capsys.readouterr().out
    assert main(["compare", str(runs / "ce"), "--assert-equal"]) == 1  # seeds 0 and 1 differ
    assert "difference(s)" in capsys.readouterr().out
    assert main(["compare", str(runs / "ce"), "--assert-equal", "--tolerance", "1e9"]) == 0


def test_bad_input_exits_2(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "spec.yaml").write_text("name: x\n")
    cases = [
        ([str(tmp_path / "missing"), str(runs / "ce")], "no such run directory"),
        ([str(runs / "ce"), str(tmp_path / "empty")], "not a kvd run directory"),
        ([str(runs / "ce"), str(tmp_path / "unfinished")], "has not finished"),
        ([f"{tmp_path}/nothing*"], "matches no run directory"),
        (["--assert-equal", str(runs / "twin")], "at least two runs"),
    ]
    for args, message in cases:
        assert main(["compare", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
