"""`output.trackers`: a run's metrics reach TensorBoard, Weights & Biases (offline) and MLflow
(a local SQLite store) as metrics.jsonl has them, a restart continues the same tracker runs, and
a named tracker that is not installed stops the run before it starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kvd.cli.app import main
from kvd.run.rundir import MetricsLog, read_metrics
from kvd.run.trackers import flat_params, open_trackers
from kvd.run.train import train
from kvd.spec.runspec import parse_spec
from tests.specs import tiny_spec


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No tracker server and nothing written outside tmp_path."""
    for var in ("WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))


def test_metrics_log_sends_each_steps_numbers_to_every_tracker(tmp_path: Path) -> None:
    class Recorder:
        def __init__(self) -> None:
            self.logged: list[tuple[dict[str, float], int]] = []
            self.closed = False

        def log(self, metrics: dict[str, float], step: int) -> None:
            self.logged.append((metrics, step))

        def close(self) -> None:
            self.closed = True

    a, b = Recorder(), Recorder()
    log = MetricsLog(tmp_path / "metrics.jsonl", [a, b])
    log.write({"step": 3, "loss/total": 1.5, "tokens": 96, "skipped": False, "event": "x"})
    log.write({"event": "no step"})
    log.close()
    assert a.logged == b.logged == [({"loss/total": 1.5, "tokens": 96.0}, 3)]
    assert a.closed and b.closed


def test_a_run_reports_to_wandb_and_mlflow(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    data = tiny_spec(tmp_path / "run")
    data["output"]["trackers"] = ["wandb", "mlflow"]
    train(parse_spec(data), data, base_dir=Path("."))
    run_dir = tmp_path / "run"
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss/total" in r]
    ids = json.loads((run_dir / "trackers.json").read_text())

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve()}/mlflow.db")
    history = client.get_metric_history(ids["mlflow"], "loss/total")
    assert [(m.step, m.value) for m in history] == [(r["step"], r["loss/total"]) for r in records]
    run = client.get_run(ids["mlflow"])
    assert run.info.status == "FINISHED" and run.data.params["training.max_steps"] == "4"
    assert run.data.params["teachers.1.id"] == '"qwen"'

    (events,) = run_dir.glob(f"wandb/offline-run-*-{ids['wandb']}/run-*.wandb")
    assert b"loss/total" in events.read_bytes() and b"grad_norm" in events.read_bytes()


def test_a_restarted_run_continues_its_tracker_runs(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    first = open_trackers(["mlflow", "wandb"], tmp_path, "r", {"a": 1})
    for tracker in first:
        tracker.close()
    ids = json.loads((tmp_path / "trackers.json").read_text())
    again = open_trackers(["mlflow", "wandb"], tmp_path, "r", {"a": 1})
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    assert client.get_run(ids["mlflow"]).info.status == "RUNNING"  # open again, not finished
    for tracker in again:
        tracker.close()
    assert client.get_run(ids["mlflow"]).info.status == "FINISHED"
    assert json.loads((tmp_path / "trackers.json").read_text()) == ids
    assert list(tmp_path.glob(f"wandb/offline-run-*-{ids['wandb']}"))  # the same W&B run id


def test_a_missing_tracker_package_stops_the_run_before_it_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(
        __import__("kvd.run.trackers").run.trackers.PACKAGES, "mlflow", "kvd_no_such"
    )
    data = tiny_spec(tmp_path / "run")
    data["output"]["trackers"] = ["mlflow"]
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    assert main(["train", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "output.trackers: 'mlflow' needs the kvd_no_such package" in err
    assert "pip install 'kvd[mlflow]'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_params_are_dotted_keys() -> None:
    assert flat_params({"a": {"b": [1, {"c": None}]}, "d": "x"}) == {
        "a.b.0": "1",
        "a.b.1.c": "null",
        "d": '"x"',
    }
