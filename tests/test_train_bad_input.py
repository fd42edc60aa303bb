"""`kvd train` on bad input: exit 2, a message naming the place, no traceback, nothing written."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from kvd.cli.app import main
from tests.specs import STUDENT, tiny_spec


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def non_utf8(tmp: Path, data: dict) -> None:
    (tmp / "bad.txt").write_bytes(b"caf\xe9 au lait " * 40)
    data["data"] = {"name": "text_files", "paths": [str(tmp / "bad.txt")], "seq_len": 48}


def empty_corpus(tmp: Path, data: dict) -> None:
    (tmp / "empty.txt").write_text("")
    data["data"] = {"name": "text_files", "paths": [str(tmp / "empty.txt")], "seq_len": 48}


def seq_len_too_long(tmp: Path, data: dict) -> None:
    data["student"]["config"] = dict(STUDENT, max_position_embeddings=32)


def teacher_not_causal_lm(tmp: Path, data: dict) -> None:
    model = tmp / "bert"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps(
            {
                "model_type": "bert",
                "architectures": ["BertForMaskedLM"],
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "intermediate_size": 64,
            }
        )
    )
    data["teachers"][1] = {"id": "bert", "source": "hf", "path": str(model)}


def teacher_dir_without_model(tmp: Path, data: dict) -> None:
    (tmp / "notes").mkdir()
    (tmp / "notes" / "readme.txt").write_text("not a model")
    data["teachers"][0] = {"id": "notes", "source": "hf", "path": str(tmp / "notes")}


def output_dir_with_user_files(tmp: Path, data: dict) -> None:
    out = Path(data["output"]["dir"])
    out.mkdir(parents=True)
    (out / "thesis.tex").write_text("do not touch")


CASES: dict[str, tuple[Callable[[Path, dict], None], str]] = {
    "non_utf8": (non_utf8, "bad.txt"),
    "empty_corpus": (empty_corpus, "empty.txt"),
    "seq_len_too_long": (seq_len_too_long, "data.seq_len 48 exceeds student's 32 positions"),
    "teacher_not_causal_lm": (teacher_not_causal_lm, "bert"),
    "teacher_dir_without_model": (teacher_dir_without_model, "notes"),
    "output_dir_with_user_files": (output_dir_with_user_files, "not empty"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_names_place_and_writes_nothing(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make, expected = CASES[case]
    data = tiny_spec(tmp_path / "run")
    make(tmp_path, data)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    before = tree(tmp_path)
    assert main(["train", str(spec)]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert "Traceback" not in err
    assert tree(tmp_path) == before


def test_out_of_memory_names_the_model_and_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import kvd.step.teacher_side

    def oom(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(kvd.step.teacher_side, "teacher_targets", oom)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(tmp_path / "run")))
    assert main(["train", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "out of memory in teacher 'llama'" in err and "batch of 2 x" in err
    assert "batch_size" in err and "Traceback" not in err
