"""`kvd eval --lm-eval`: lm-evaluation-harness on a run's student (a local task, offline),
the same scores as the harness run by hand on student/, names checked before any model loads,
and lm-eval metrics compared in their own direction."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from kvd.cli.app import main
from kvd.eval.eval_texts import run_spec
from kvd.study.compare import compare_groups
from kvd.study.runs import Group, Member
from tests.specs import MC_ITEMS, local_mc_task, tiny_spec


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("harness")
    spec = tmp / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(tmp / "run")))
    assert main(["train", str(spec)]) == 0
    return tmp / "run"


def test_a_runs_student_scores_a_local_task_as_the_harness_does_by_hand(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = tmp_path / "tasks"
    name = local_mc_task(tasks)
    assert main(["eval", str(run), "--lm-eval", name, "--lm-eval-include", str(tasks)]) == 0
    report = json.loads((run / "eval" / "lm_eval.json").read_text())
    assert report["samples"] == {name: len(MC_ITEMS)}
    assert report["higher_is_better"][name] == {"acc": True}

    adds_bos = run_spec(run, Path(".")).student.build().geometry().adds_bos  # kvd's BOS rule
    by_hand = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(run / "student"), "device": "cpu", "add_bos_token": adds_bos},
        tasks=[name],
        task_manager=TaskManager(include_path=str(tasks)),
    )
    assert by_hand is not None
    assert report["tasks"][name]["acc"] == pytest.approx(by_hand["results"][name]["acc,none"])


def test_an_unknown_task_is_named_before_any_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = tmp_path / "tasks"
    local_mc_task(tasks)
    # no such model either: the task name is the first thing checked
    code = main(
        ["eval", "preset:none", "--lm-eval", "kvd_code_mcq", "--lm-eval-include", str(tasks)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--lm-eval kvd_code_mcq" in err and "'kvd_code_mc'" in err
    assert "Traceback" not in err


def test_without_the_harness_the_error_says_what_to_install(
    run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvd.eval.harness import task_manager

    task_manager.cache_clear()
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)  # as if not installed
    assert main(["eval", str(run), "--lm-eval", "arc_easy"]) == 2
    assert "pip install 'kvd[lm-eval]'" in capsys.readouterr().err
    task_manager.cache_clear()


def test_lm_eval_metrics_are_compared_in_their_own_direction() -> None:
    def group(label: str, acc: list[float], ppl: list[float]) -> Group:
        members = [
            Member(
                Path(f"{label}{i}"),
                "eval/lm_eval.json",
                {"lm_eval/t/acc": a, "lm_eval/t/word_perplexity": p},
                higher_is_better={"lm_eval/t/acc": True, "lm_eval/t/word_perplexity": False},
            )
            for i, (a, p) in enumerate(zip(acc, ppl, strict=True))
        ]
        return Group(label, members)

    base = group("base", [0.50, 0.52, 0.51], [30.0, 31.0, 30.5])
    other = group("other", [0.70, 0.71, 0.69], [40.0, 41.0, 40.5])  # more accurate, higher ppl
    result = compare_groups([base, other])
    verdict = {r["metric"]: r["significant"] for r in result["comparisons"]}
    assert verdict == {"lm_eval/t/acc": "better", "lm_eval/t/word_perplexity": "worse"}
    labels = {m["key"]: m["label"] for m in result["metrics"]}
    assert labels["lm_eval/t/acc"] == "t/acc"
