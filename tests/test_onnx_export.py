"""`kvd export RUN --format onnx`: the student as an ONNX decoder with its KV cache, run by
onnxruntime the way a generation loop would, against transformers on the same weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kvd.cli.app import main
from kvd.run.onnx_export import TOLERANCE, check_onnx, io_names
from kvd.run.train import train
from kvd.spec.runspec import parse_spec
from tests.specs import tiny_spec

PROMPT = "def add(a, b):\n    return a + b\n\nclass Point:\n"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ONNX export of a finished 4-step two-teacher run's last checkpoint."""
    root = tmp_path_factory.mktemp("onnx")
    data = tiny_spec(root / "run")
    train(parse_spec(data), data, base_dir=Path("."))
    assert main(["export", str(root / "run"), "--format", "onnx", "--out", str(root / "x")]) == 0
    return root / "x"


def greedy_onnx(path: Path, ids: list[int], new: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decoding with onnxruntime alone: a prefill, then one token a step, each step
    feeding back the graph's own `present.*` as `past_key_values.*`."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    past = {
        i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        for i in session.get_inputs()
        if i.name.startswith("past_key_values.")
    }
    tokens, steps, start = list(ids), [], 0
    for _ in range(new):
        chunk = tokens[start:]
        feed = {
            "input_ids": np.array([chunk], np.int64),
            "attention_mask": np.ones((1, len(tokens)), np.int64),
            "position_ids": np.arange(start, len(tokens), dtype=np.int64)[None],
            **past,
        }
        logits, *present = session.run(None, feed)
        past = dict(zip(names[3:], present, strict=True))
        steps.append(logits[0, -1])
        start = len(tokens)
        tokens.append(int(logits[0, -1].argmax()))
    return tokens, steps


def test_onnx_student_generates_what_transformers_generates(exported: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    card = (exported / "README.md").read_text()
    assert (exported / "config.json").exists() and "onnxruntime matched torch" in card
    model = AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    ids = AutoTokenizer.from_pretrained(str(exported))(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        want = model.generate(
            ids,
            max_new_tokens=12,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens, logits = greedy_onnx(exported / "model.onnx", ids[0].tolist(), 12)
    assert tokens == want.sequences[0].tolist()
    for got, ref in zip(logits, want.logits, strict=True):
        assert np.abs(got - ref[0].numpy()).max() < TOLERANCE


def test_the_check_catches_other_weights(exported: Path) -> None:
    """check_onnx is what stands between a wrong graph and the user: it must see a student whose
    weights differ from the graph's, even by a little."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    ids = torch.tensor([[5, 70, 101, 33, 9, 12, 40]])
    assert check_onnx(exported / "model.onnx", model, ids) < TOLERANCE
    with torch.no_grad():
        model.model.layers[-1].self_attn.v_proj.weight.mul_(1.01)
    assert check_onnx(exported / "model.onnx", model, ids) > TOLERANCE


def test_graph_names_follow_the_decoder_layout(exported: Path) -> None:
    import onnx

    graph = onnx.load(str(exported / "model.onnx")).graph
    inputs, outputs = io_names(2)
    assert [i.name for i in graph.input] == inputs and [o.name for o in graph.output] == outputs
    assert inputs[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]


def test_missing_onnx_extra_names_the_install(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr("kvd.run.onnx_export.NEEDS", ("onnx", "kvd_no_such_package"))
    run = exported.parent / "run"
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "kvd_no_such_package" in err and "pip install 'kvd[onnx]'" in err
    assert not (tmp_path / "o").exists()
