"""Finished runs and `kvd eval` results as members of the groups that `kvd compare` compares.

A command-line argument names one group: a run dir, a folder of run dirs (e.g. the seeds of one
`kvd ab` group), a quoted glob of run dirs, or a `kvd eval` JSON file; `LABEL=ARG` names it.
A run's metrics come from RUN/eval/NAME.json when that exists (full validation split, cloze
accuracy, per-sequence bits per byte), else from its results.json (the validation at the end of
training, per-sequence NLL); RUN/eval/lm_eval.json adds lm-evaluation-harness scores
(`lm_eval/TASK/METRIC`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvd.core.errors import KvdError
from kvd.data import read_manifest
from kvd.eval.harness import DEFAULT_NAME as HARNESS_NAME
from kvd.eval.harness import harness_metrics
from kvd.run.rundir import holds_run, read_metrics

TIMING_KEYS = ("tokens_per_s", "step_s", "peak_rss_mb", "peak_mem_mb")
"""Record keys that measure the machine, not the run (left out of reproducibility checks)."""


@dataclass
class Member:
    """One run, or one eval result, with what a comparison reads from it.

    per_sequence: a value per validation text (bits per byte from an eval JSON, NLL in nats from
    results.json); sequence_key: equal keys mean the same texts in the same order.
    """

    path: Path
    source: str
    metrics: dict[str, float]
    per_sequence: list[float] | None = None
    sequence_key: str | None = None
    sequence_unit: str = ""
    records: list[dict[str, Any]] = field(default_factory=list)
    exact: dict[str, Any] = field(default_factory=dict)
    """Everything that must match in a reproducibility check (`kvd compare --assert-equal`)."""
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    """The direction of each metric kvd.study.compare.METRICS does not know (lm-eval's)."""


@dataclass
class Group:
    label: str
    members: list[Member]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KvdError(f"{path}: cannot read JSON ({exc})") from None
    if not isinstance(data, dict):
        raise KvdError(f"{path}: expected a JSON object")
    return data


def _eval_metrics(report: dict[str, Any], path: Path) -> dict[str, float]:
    if "metrics" not in report or "sequences" not in report:
        raise KvdError(f"{path}: not a `kvd eval` result")
    m = report["metrics"]
    out = {k: m[k] for k in ("bits_per_byte", "perplexity", "accuracy") if k in m}
    if m.get("cloze_accuracy") is not None:
        out["cloze_accuracy"] = m["cloze_accuracy"]
    out["eval_tokens_per_s"] = m["tokens_per_s"]
    out["eval_peak_mem_mb"] = m["peak_mem_mb"]
    return out


def _apply_eval(member: Member, report: dict[str, Any], path: Path) -> None:
    member.metrics |= _eval_metrics(report, path)
    member.per_sequence = list(report["sequences"]["bits_per_byte"])
    member.sequence_key = report["data"]["texts_digest"]
    member.sequence_unit = "bits/byte"
    timing = ("tokens_per_s", "peak_mem_mb", "seconds")
    member.exact["eval"] = {
        "metrics": {k: v for k, v in report["metrics"].items() if k not in timing},
        "sequences": report["sequences"],
        "cloze": report.get("cloze"),
    }


def _apply_harness(member: Member, report: dict[str, Any], path: Path) -> None:
    if "tasks" not in report or "higher_is_better" not in report:
        raise KvdError(f"{path}: not a `kvd eval --lm-eval` result")
    for key, (value, higher) in harness_metrics(report).items():
        member.metrics[key] = value
        member.higher_is_better[key] = higher
    member.exact["lm_eval"] = report["tasks"]


def load_eval(path: Path) -> Member:
    """A `kvd eval` JSON file (held-out text, or `--lm-eval` tasks) as a member (a teacher or
    any model evaluated on its own)."""
    member = Member(path, path.name, {})
    report = _read_json(path)
    if "tasks" in report and "metrics" not in report:
        _apply_harness(member, report, path)
    else:
        _apply_eval(member, report, path)
    return member


def load_run(path: Path, eval_name: str = "validation") -> Member:
    """A finished run dir as a member; a missing, unfinished or foreign dir is a KvdError."""
    if not path.exists():
        raise KvdError(f"{path}: no such run directory")
    if not path.is_dir() or not holds_run(path):
        raise KvdError(
            f"{path}: not a kvd run directory (no spec.yaml, metrics.jsonl or checkpoints)"
        )
    if not (path / "results.json").is_file():
        raise KvdError(
            f"{path}: the run has not finished (no results.json)",
            hint="finish it with `kvd train SPEC --resume` (or `kvd ab` resumes it)",
        )
    results = _read_json(path / "results.json")
    validation = results.get("validation", {})
    records = [r for r in read_metrics(path / "metrics.jsonl") if "loss/total" in r]
    split = read_manifest(path / "split.json").digest
    resolved = yaml.safe_load((path / "spec.resolved.yaml").read_text(encoding="utf-8")) or {}
    texts = {
        "split": split,
        "data": resolved.get("data"),
        "evaluation": resolved.get("evaluation"),
        "batch_size": resolved.get("training", {}).get("batch_size"),
        "tokenizer": {  # of the student: not its init or weights
            k: v
            for k, v in (resolved.get("student") or {}).items()
            if k not in ("seed", "config", "dtype", "reinit")
        },
    }
    metrics = {k: validation[k] for k in ("bits_per_byte", "perplexity", "accuracy")}
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    if speeds:
        metrics["train_tokens_per_s"] = statistics.median(speeds)
    memory = [r.get("peak_mem_mb", r.get("peak_rss_mb")) for r in records]
    if any(m is not None for m in memory):
        metrics["train_peak_mem_mb"] = max(m for m in memory if m is not None)
    member = Member(
        path,
        "results.json",
        metrics,
        per_sequence=list(validation.get("nll", [])) or None,
        sequence_key=hashlib.sha256(json.dumps(texts, sort_keys=True).encode()).hexdigest(),
        sequence_unit="nats",
        records=records,
        exact={
            "results": results,
            "records": [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records],
        },
    )
    evaluated = path / "eval" / f"{eval_name}.json"
    if evaluated.is_file():
        member.source = f"eval/{eval_name}.json"
        _apply_eval(member, _read_json(evaluated), evaluated)
    harness = path / "eval" / f"{HARNESS_NAME}.json"
    if harness.is_file():
        _apply_harness(member, _read_json(harness), harness)
    return member


def expand(arg: str, eval_name: str = "validation") -> Group:
    """The group one command-line argument names (see the module docstring)."""
    label, sep, rest = arg.partition("=")
    if not sep or "/" in label or not label:
        label, rest = "", arg
    path = Path(rest)
    if path.is_file() and path.suffix == ".json":
        return Group(label or path.stem, [load_eval(path)])
    if path.is_dir() and not holds_run(path):
        runs = sorted(p for p in path.iterdir() if p.is_dir() and holds_run(p))
        if not runs:
            raise KvdError(f"{path}: not a kvd run directory, and holds no run directories")
        return Group(label or path.name, [load_run(p, eval_name) for p in runs])
    if glob.has_magic(rest):
        runs = sorted(Path(p) for p in glob.glob(rest) if holds_run(Path(p)))
        if not runs:
            raise KvdError(f"{rest}: matches no run directory")
        parent = Path(rest).parent.name if glob.has_magic(Path(rest).name) else ""
        return Group(label or parent or rest, [load_run(p, eval_name) for p in runs])
    return Group(label or _short(rest), [load_run(path, eval_name)])


def _short(text: str) -> str:
    return re.sub(r"/+$", "", text) or text
