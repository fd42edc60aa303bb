"""Tests of the kvd_run model source against the installed kvd (`pip install -e .` first).

One short `kvd train` on tiny random models makes a finished run; its student then teaches the
next run. The fixture `kvd_plugins` comes from kvd's pytest plugin (`kvd.testing`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvd.cli.app import main
from kvd.errors import KvdError
from kvd.manager import ALLOWLIST_ENV, Plugins, reset_plugins
from kvd.testing import check_component, tiny_lm_config

STUDENT = tiny_lm_config(layers=2, heads=4, kv_heads=2, head_dim=8)


def run_spec(out: Path, teachers: list[dict[str, Any]], **training: Any) -> dict[str, Any]:
    """A short run of `teachers` into a fresh tiny student."""
    return {
        "seed": 0,
        "teachers": teachers,
        "student": {"source": "tiny", "seed": 3, "config": STUDENT},
        "data": {"name": "stdlib", "seq_len": 32, "tasks": ["reference", "module_doc"]},
        "losses": [{"name": "kv_mse"}, {"name": "ce"}],
        "training": {"max_steps": 3, "batch_size": 2, "warmup_steps": 1, **training},
        "evaluation": {"every": 3, "batches": 1},
        "output": {"dir": str(out)},
    }


def write(path: Path, spec: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A finished run: a tiny GQA llama teacher distilled into a 2-layer student in 3 steps."""
    root = tmp_path_factory.mktemp("first")
    teacher = {"id": "llama", "source": "tiny", "seed": 1, "config": tiny_lm_config(layers=4)}
    spec = write(root / "spec.yaml", run_spec(root / "run", [teacher]))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(ALLOWLIST_ENV, raising=False)
        reset_plugins()
        assert main(["train", str(spec)]) == 0
        reset_plugins()
    yield root / "run"


def test_registered_through_the_entry_point(kvd_plugins: Plugins) -> None:
    entry = kvd_plugins.registry("models").entry("kvd_run")
    assert (entry.plugin, entry.package) == ("run_teacher", "kvd-run-teacher")
    assert entry.version == metadata.version("kvd-run-teacher")


def test_keeps_the_model_source_contract(kvd_plugins: Plugins, finished_run: Path) -> None:
    check_component("models", "kvd_run", plugins=kvd_plugins, run=str(finished_run))
    report = check_component(
        "models", "kvd_run", plugins=kvd_plugins, load_weights=True, run=str(finished_run)
    )
    assert report.checked[-1].startswith("load()")


def test_geometry_is_the_saved_students(kvd_plugins: Plugins, finished_run: Path) -> None:
    cls = kvd_plugins.registry("models").get("kvd_run")
    source = cls(cls.Config(run=finished_run.name), base_dir=finished_run.parent)  # relative
    g = source.geometry()
    assert g.name == finished_run.name
    assert (g.num_layers, g.num_heads, g.num_kv_heads, g.head_dim) == (2, 4, 2, 8)
    assert (
        g.vocab_size
        == json.loads((finished_run / "student" / "config.json").read_text())["vocab_size"]
    )


def test_born_again_kvd_train(kvd_plugins: Plugins, finished_run: Path, tmp_path: Path) -> None:
    """The first run's student teaches a new student, next to a tiny MQA qwen2 teacher."""
    shutil.copytree(finished_run, tmp_path / "runs" / "first")
    teachers: list[dict[str, Any]] = [
        {"id": "gen1", "source": "kvd_run", "run": "runs/first"},  # from the spec's folder
        {
            "id": "qwen",
            "source": "tiny",
            "seed": 2,
            "config": tiny_lm_config("qwen2", layers=3, heads=6, kv_heads=1, head_dim=16),
        },
    ]
    spec = write(tmp_path / "spec.yaml", run_spec(tmp_path / "second", teachers))
    assert main(["validate", str(spec)]) == 0
    assert main(["train", str(spec)]) == 0
    records = [json.loads(line) for line in (tmp_path / "second" / "metrics.jsonl").open()]
    routed = {k for r in records for k in r if k.startswith("route/L0/")}
    assert routed == {"route/L0/gen1", "route/L0/qwen"}
    assert (tmp_path / "second" / "results.json").exists()


@pytest.mark.parametrize(
    ("layout", "problem"),
    [
        ([], "no such kvd run directory"),
        (["student/"], "not a finished kvd run (no results.json)"),
        (["results.json"], "not a finished kvd run (no student)"),
        (["checkpoints/"], "not a finished kvd run (no student and no results.json)"),
    ],
    ids=["missing", "unfinished", "no-student", "empty"],
)
def test_not_a_finished_run(
    kvd_plugins: Plugins,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    layout: list[str],
    problem: str,
) -> None:
    run = tmp_path / "run"
    for name in layout:
        run.mkdir(exist_ok=True)
        (run / name).mkdir() if name.endswith("/") else (run / name).write_text("{}")
    cls = kvd_plugins.registry("models").get("kvd_run")
    with pytest.raises(KvdError) as err:
        cls(cls.Config(run=str(run))).geometry()
    assert err.value.message == f"{run}: {problem}"
    assert "student/ and results.json" in str(err.value.hint)
    teacher = {"source": "kvd_run", "run": str(run)}
    spec = write(tmp_path / "spec.yaml", run_spec(tmp_path / "out", [teacher]))
    assert main(["validate", str(spec)]) == 2
    err_text = " ".join(capsys.readouterr().err.split())
    assert problem in err_text and "Traceback" not in err_text
