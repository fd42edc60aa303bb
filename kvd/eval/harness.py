"""lm-evaluation-harness on any model `kvd eval` opens (`kvd eval TARGET --lm-eval TASKS`).

kvd's own eval stays the quick bits/byte; the harness scores its tasks (built-in ones, or
local task YAMLs from `--lm-eval-include DIR`) on the same loaded model, with the BOS rule kvd
trains with. The result, RUN/eval/lm_eval.json for a run dir, is read by `kvd compare` and
`kvd ab` as metrics `lm_eval/TASK/METRIC`. Needs `pip install 'kvd[lm-eval]'`.
"""

from __future__ import annotations

import difflib
import functools
import math
from pathlib import Path
from typing import Any

import torch

from kvd.core.errors import KvdError
from kvd.eval.measure import (
    Subject,
    check_result_name,
    eval_device,
    open_subject,
    result_path,
    write_report,
)

FORMAT = 1
"""Version of the lm_eval.json layout."""

DEFAULT_NAME = "lm_eval"
"""RUN/eval/lm_eval.json: where a run's harness scores go, and where `kvd compare` reads them."""


def harness_metrics(report: dict[str, Any]) -> dict[str, tuple[float, bool]]:
    """lm_eval.json -> {`lm_eval/TASK/METRIC`: (value, higher is better)}, standard errors left
    out."""
    out = {}
    for task, metrics in report["tasks"].items():
        better = report["higher_is_better"].get(task, {})
        for metric, value in metrics.items():
            if not metric.endswith("_stderr"):
                out[f"lm_eval/{task}/{metric}"] = (float(value), bool(better.get(metric, True)))
    return out


def _metric_name(key: str) -> str:
    """lm-eval's `acc,none` -> `acc`; a filtered metric `exact_match,strict-match` ->
    `exact_match/strict-match`."""
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric}/{filt}"


@functools.lru_cache(maxsize=4)
def task_manager(include: Path | None) -> Any:
    """The harness's task index, with the local task YAMLs of `include` (indexing its
    thousands of tasks takes seconds: built once per folder)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise KvdError(
            "--lm-eval needs lm-evaluation-harness, which is not installed",
            hint="pip install 'kvd[lm-eval]'",
        ) from None
    if include is not None and not include.is_dir():
        raise KvdError(f"{include}: no such folder of lm-eval task YAML files")
    return TaskManager(include_path=str(include) if include else None)


def check_tasks(tasks: list[str], manager: Any, where: str = "--lm-eval") -> None:
    """Every task name is one the harness knows (its own, or one of the included YAMLs);
    `where` names the place a bad one came from."""
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, sorted(known), n=1)
            raise KvdError(
                f"{where} {task}: lm-evaluation-harness has no such task"
                + (f"; did you mean {close[0]!r}?" if close else ""),
                hint="`lm-eval ls tasks` lists them; a local task YAML's folder goes in "
                "--lm-eval-include DIR",
            )


def evaluate_harness(
    subject: Subject,
    tasks: list[str],
    manager: Any,
    *,
    limit: int | None,
    batch_size: int,
    device: torch.device,
) -> dict[str, Any]:
    """The harness's scores of `subject` on `tasks` (the first `limit` documents of each)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(
        pretrained=subject.loaded.model,
        tokenizer=subject.loaded.tokenizer,
        batch_size=batch_size,
        device=str(device),
        add_bos_token=subject.add_bos,
    )
    res = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit)
    if res is None:  # only on a non-zero rank of a distributed harness run
        raise KvdError("lm-evaluation-harness returned no results")
    scores: dict[str, dict[str, float]] = {}
    for task, row in res["results"].items():
        scores[task] = {
            _metric_name(k): float(v)
            for k, v in row.items()
            if "," in k and isinstance(v, int | float) and math.isfinite(v)
        }
    return {
        "format": FORMAT,
        "model": subject.label,
        "tasks": scores,
        "higher_is_better": res["higher_is_better"],
        "samples": {t: n["effective"] for t, n in res["n-samples"].items()},
        "limit": limit,
        "lm_eval_version": res.get("lm_eval_version"),
    }


def run_harness(
    target: str,
    tasks: list[str],
    *,
    include: Path | None = None,
    limit: int | None = None,
    teacher: str | None = None,
    name: str | None = None,
    out: Path | None = None,
    batch_size: int = 8,
    base_dir: Path = Path("."),
    device: str = "auto",
) -> tuple[dict[str, Any], Path | None]:
    """Score `target` with the harness and save the result: to `out`, else RUN/eval/NAME.json
    for a run dir (NAME: lm_eval, `teacher-ID-` in front for a teacher); returns it and where
    it went. Task names are checked before any model loads."""
    check_result_name(name)
    manager = task_manager(include)
    check_tasks(tasks, manager)
    dev = eval_device(device)
    subject = open_subject(target, teacher=teacher, base_dir=base_dir, device=dev)
    report = evaluate_harness(
        subject, tasks, manager, limit=limit, batch_size=batch_size, device=dev
    )
    report |= {"target": target, "teacher": teacher}
    label = name or (f"teacher-{teacher}-{DEFAULT_NAME}" if teacher else DEFAULT_NAME)
    dest = result_path(target, label, out)
    if dest is not None:
        write_report(report, dest)
    return report, dest
