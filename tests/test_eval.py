"""`kvd eval` on tiny models: a run's student and teacher on its validation split, other
targets on a dataset or files, the cloze task, and bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from kvd.cli.app import main
from kvd.data import SplitManifest, write_manifest
from kvd.eval.cloze import build_items, cut
from kvd.eval.eval_texts import in_part
from kvd.run.train import train
from kvd.spec.runspec import parse_spec
from tests.specs import tiny_spec


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-step two-teacher tiny run."""
    out = tmp_path_factory.mktemp("eval") / "run"
    data = tiny_spec(out, data={"name": "stdlib", "seq_len": 48, "tasks": ["module_doc"]})
    data["training"]["max_steps"] = 2
    train(parse_spec(data), data, base_dir=Path("."))
    return out


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_run_student_on_its_validation_split(run_dir: Path) -> None:
    assert main(["eval", str(run_dir), "--max-texts", "12"]) == 0
    report = read(run_dir / "eval" / "validation.json")
    m, seq = report["metrics"], report["sequences"]
    assert report["data"]["texts"] == len(seq["nll"]) == len(seq["hash"]) == 12
    assert report["data"]["split_digest"] == read(run_dir / "split.json")["digest"]
    assert sum(seq["bytes"]) == m["bytes"]
    assert m["bits_per_byte"] == pytest.approx(sum(seq["nll"]) / math.log(2) / m["bytes"])
    assert 0 <= m["accuracy"] <= 1 and 0 <= m["cloze_accuracy"] <= 1
    assert len(report["cloze"]["correct"]) == 12 and m["tokens_per_s"] > 0 and m["peak_mem_mb"] > 0
    # the first texts are the ones validated at the end of training: same bits per byte
    assert main(["eval", str(run_dir), "--max-texts", "2", "--name", "first2"]) == 0
    final = read(run_dir / "results.json")["validation"]["bits_per_byte"]
    assert read(run_dir / "eval" / "first2.json")["metrics"]["bits_per_byte"] == pytest.approx(
        final, rel=1e-5
    )


def test_teacher_on_the_same_texts(run_dir: Path) -> None:
    assert main(["eval", str(run_dir), "--teacher", "qwen", "--max-texts", "12"]) == 0
    teacher = read(run_dir / "eval" / "teacher-qwen-validation.json")
    student = read(run_dir / "eval" / "validation.json")
    assert teacher["data"]["texts_digest"] == student["data"]["texts_digest"]
    assert teacher["teacher"] == "qwen"


def test_other_targets_on_a_dataset_and_on_files(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf.json"
    args = ["--max-texts", "4", "--window-bytes", "200"]
    assert (
        main(["eval", str(run_dir / "student"), "--data", "stdlib", "--out", str(out), *args]) == 0
    )
    assert read(out)["data"]["source"] == "stdlib (held-out documents)"
    text = tmp_path / "notes.txt"
    text.write_text(" ".join(f"word{i} and some more text to read." for i in range(40)))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(tmp_path / "unused")))
    out = tmp_path / "spec.json"
    assert main(["eval", str(spec), "--data", str(text), "--out", str(out), *args]) == 0
    report = read(out)
    assert report["data"]["source"] == str(text) and report["model"].startswith("untrained")


def test_tune_and_test_halves_split_the_validation_documents(run_dir: Path) -> None:
    results = {}
    for part in ("all", "tune", "test"):
        assert main(["eval", str(run_dir), "--part", part]) == 0
        name = "validation" if part == "all" else f"validation-{part}"
        results[part] = read(run_dir / "eval" / f"{name}.json")
    hashes = {part: r["sequences"]["hash"] for part, r in results.items()}
    assert hashes["tune"] and hashes["test"]  # both halves hold texts
    assert not set(hashes["tune"]) & set(hashes["test"])
    assert sorted(hashes["tune"] + hashes["test"]) == sorted(hashes["all"])
    assert results["test"]["data"]["source"].startswith("test half of the validation split")
    # one document's windows all fall on the same side: the halves split documents
    windows = build_windows(run_dir)
    sides = {w.doc_id: set() for w in windows}
    for w in windows:
        sides[w.doc_id].add(in_part(w.doc_id, "tune"))
    assert all(len(s) == 1 for s in sides.values())


def build_windows(run_dir: Path) -> list:
    from kvd.data import build_data

    spec = parse_spec(yaml.safe_load((run_dir / "spec.yaml").read_text()))
    student = spec.student.build()
    data = build_data(
        spec.data,
        student_tokenizer=student.tokenizer(),
        base_dir=Path("."),
        add_bos=student.geometry().adds_bos,
        min_tokens=spec.data.min_tokens,
    )
    return data.validation


def test_the_halves_are_fixed_and_about_even() -> None:
    ids = [f"doc:{i}" for i in range(2000)]
    tune = [i for i in ids if in_part(i, "tune")]
    assert 900 < len(tune) < 1100  # a fair coin per document id
    assert tune == [i for i in ids if in_part(i, "tune")]  # no seed, no state
    assert all(in_part(i, "tune") != in_part(i, "test") and in_part(i, "all") for i in ids)


def test_cloze_items_are_deterministic() -> None:
    texts = [f"context number {i} goes here then continuation {i} follows" for i in range(6)]
    assert cut("abc def ghi") == ("abc", " def ghi")
    assert cut("nospace") is None
    items = build_items(texts, choices=4, seed=0)
    assert items == build_items(texts, choices=4, seed=0)
    assert items != build_items(texts, choices=4, seed=1)
    for text, item in zip(texts, items, strict=True):
        assert len(item.choices) == 4 and len(set(item.choices)) == 4
        assert item.context + item.choices[item.answer] == text
    assert build_items(texts[:3], choices=4, seed=0) == []  # too few texts for 3 distractors


def test_bad_input_exits_2(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        (["eval", str(tmp_path / "missing")], "no such file or directory"),
        (["eval", str(run_dir / "student")], "--data is needed"),
        (["eval", str(run_dir), "--teacher", "nope"], "no teacher 'nope'"),
        (["eval", str(run_dir / "student"), "--data", "nope.txt"], "not a dataset name"),
        (["eval", str(run_dir), "--part", "half"], "--part half: not one of all, tune, test"),
        (
            ["eval", str(run_dir / "student"), "--data", "stdlib", "--part", "tune"],
            "only a run's validation split has tune and test halves",
        ),
    ]
    tampered = tmp_path / "tampered"
    shutil.copytree(run_dir, tampered)
    write_manifest(SplitManifest.of(["0" * 64], ["f" * 64], 0.05), tampered / "split.json")
    cases.append((["eval", str(tampered)], "does not match its split.json"))
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
