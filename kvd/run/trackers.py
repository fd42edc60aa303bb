"""Where a run's metrics go besides metrics.jsonl (which always holds every record): the
trackers named in `output.trackers`, each behind the same two calls (`log`, `close`).

- `tensorboard` (the default): event files in RUN/tensorboard when the package is installed,
  else said once on stderr and skipped.
- `wandb`: Weights & Biases, offline unless WANDB_MODE says otherwise (files in RUN/wandb;
  `wandb sync` uploads them). WANDB_PROJECT names the project (default `kvd`).
- `mlflow`: MLflow, at MLFLOW_TRACKING_URI when set, else a local SQLite store RUN/mlflow.db
  (`mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db`). MLFLOW_EXPERIMENT_NAME names the
  experiment (default `kvd`).

A resumed run continues the same W&B / MLflow run: their ids are kept in RUN/trackers.json.
Nothing here opens a network connection unless the user's environment asks for one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from kvd.core.errors import KvdError

PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}
"""The package each tracker that must be installed imports (TensorBoard is optional)."""

IDS = "trackers.json"
"""The file in the run dir that keeps the W&B / MLflow run ids for resuming."""


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record the numbers of one step."""

    def close(self) -> None:
        """Flush and finish."""


def check_trackers(names: Sequence[str]) -> None:
    """Raise a KvdError (output.trackers) for a named W&B / MLflow tracker whose package is not
    installed: asked for by name, it is not skipped silently. TensorBoard is optional."""
    for name in names:
        if name != "tensorboard" and importlib.util.find_spec(PACKAGES[name]) is None:
            raise KvdError(
                f"output.trackers: {name!r} needs the {PACKAGES[name]} package, which is not "
                "installed",
                hint=f"pip install 'kvd[{name}]', or remove {name!r} from output.trackers",
            )


def open_trackers(
    names: Sequence[str], run_dir: Path, name: str, config: dict[str, Any]
) -> list[Tracker]:
    """The trackers of `names` for the run in `run_dir` (named `name`, its resolved spec
    `config`), reusing the W&B / MLflow runs of an earlier start of the same run dir."""
    ids_path = run_dir / IDS
    ids = json.loads(ids_path.read_text()) if ids_path.exists() else {}
    out: list[Tracker] = []
    for tracker in names:
        if tracker == "tensorboard":
            board = TensorBoard.open(run_dir / "tensorboard")
            if board is not None:
                out.append(board)
        elif tracker == "wandb":
            out.append(WandB(run_dir, name, config, ids.setdefault("wandb", uuid.uuid4().hex[:16])))
        else:
            ml = MLflow(run_dir, name, config, ids.get("mlflow"))
            ids["mlflow"] = ml.run_id
            out.append(ml)
    if ids:
        ids_path.write_text(json.dumps(ids, indent=2))
    return out


class TensorBoard:
    """torch's SummaryWriter."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    @classmethod
    def open(cls, path: Path) -> TensorBoard | None:
        """A writer into `path`, or None (said once on stderr) without the package."""
        if importlib.util.find_spec("tensorboard") is None:
            print(
                "kvd: tensorboard is not installed, so no TensorBoard logs are written (every "
                "record is in metrics.jsonl; `pip install tensorboard` adds them)",
                file=sys.stderr,
            )
            return None
        from torch.utils.tensorboard import SummaryWriter

        return cls(SummaryWriter(str(path)))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A Weights & Biases run (module docstring); kvd's own console output is left alone."""

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any], run_id: str) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "kvd"),
            name=name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
            mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]
            settings=wandb.Settings(console="off", quiet=True, x_disable_stats=True),
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """An MLflow run (module docstring), written through the client API so that no global
    active run is left behind in the user's process."""

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any], run_id: str | None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.resolve()}/mlflow.db"
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "kvd")
            found = self.client.get_experiment_by_name(experiment)
            eid = found.experiment_id if found else self.client.create_experiment(experiment)
            run_id = self.client.create_run(eid, run_name=name).info.run_id
            params = [Param(k, v[:6000]) for k, v in flat_params(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params a call
                self.client.log_batch(run_id, params=params[i : i + 100])
        else:  # a resumed run: its MLflow run ended with the process before
            self.client.update_run(run_id, status="RUNNING")
        self.run_id: str = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics a call
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def flat_params(config: Any, prefix: str = "") -> dict[str, str]:
    """The resolved spec as MLflow params: dotted keys (list items by index), string values."""
    items: list[tuple[Any, Any]]
    if isinstance(config, dict):
        items = list(config.items())
    elif isinstance(config, list):
        items = list(enumerate(config))
    else:
        return {prefix: json.dumps(config)}
    out: dict[str, str] = {}
    for key, value in items:
        out |= flat_params(value, f"{prefix}.{key}" if prefix else str(key))
    return out
