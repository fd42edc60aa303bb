"""The run spec: strict keys, component options checked against each component's Config,
all problems at once with dotted locations, --set overrides, example configs valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kvd.cli.app import main
from kvd.core.errors import KvdError, SpecError
from kvd.spec.runspec import apply_overrides, load_spec, parse_spec
from tests.specs import tiny_spec

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


def problems(data: dict) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return {p.loc: p.message for p in info.value.problems}


def test_tiny_spec_resolves_every_component(tmp_path: Path) -> None:
    spec = parse_spec(tiny_spec(tmp_path / "run"))
    assert [t.id for t in spec.teachers] == ["llama", "qwen"]
    assert spec.alignment.tokens.component_name == "soft"
    assert spec.fusion.config is not None  # validated against the fusion's own Config


def test_all_problems_reported_at_once_with_dotted_locations(tmp_path: Path) -> None:
    data = tiny_spec(tmp_path / "run")
    data["teachers"][1]["sourse"] = "tiny"  # unknown key
    data["training"]["max_steps"] = "many"  # wrong type
    data["fusion"] = {"name": "simlarity"}  # unknown component
    data["projector"] = {"name": "elastic_bottleneck", "mlp_ratio": -1}  # component option
    found = problems(data)
    assert "teachers.1.sourse" in found and "unknown key" in found["teachers.1.sourse"]
    assert "training.max_steps" in found
    # pydantic errors stop before components are resolved; fix them and the rest shows
    del data["teachers"][1]["sourse"]
    data["training"]["max_steps"] = 3
    found = problems(data)
    assert "did you mean 'similarity'" in found["fusion.name"]
    assert "projector.mlp_ratio" in found


def test_component_options_are_strict(tmp_path: Path) -> None:
    data = tiny_spec(tmp_path / "run", fusion={"name": "mean", "temperature": 0.5})
    assert "fusion.temperature" in problems(data)


def test_empty_teachers_and_duplicate_ids(tmp_path: Path) -> None:
    data = tiny_spec(tmp_path / "run")
    assert "teachers" in problems({**data, "teachers": []})
    twins = [dict(data["teachers"][0]), dict(data["teachers"][0])]
    assert any("repeated: llama" in m for m in problems({**data, "teachers": twins}).values())


def test_aligner_in_the_wrong_slot(tmp_path: Path) -> None:
    data = tiny_spec(tmp_path / "run", alignment={"tokens": {"name": "uniform"}})
    assert "belongs in alignment.layers" in problems(data)["alignment.tokens.name"]


def test_loss_teacher_filter_must_name_teachers(tmp_path: Path) -> None:
    data = tiny_spec(tmp_path / "run", losses=[{"name": "logit_kd", "teachers": ["gpt"]}])
    assert "no teacher with id 'gpt'" in problems(data)["losses.0.teachers"]


def test_student_layers_listed_once_and_at_least_one(tmp_path: Path) -> None:
    for layers, message in (([1, 1], "layers listed twice in [1, 1]"), ([], "at least one")):
        data = tiny_spec(
            tmp_path / "run", alignment={"layers": {"name": "uniform", "student_layers": layers}}
        )
        found = problems(data)
        assert list(found) == ["alignment.layers.student_layers"]  # one place, named plainly
        assert message in found["alignment.layers.student_layers"]


def test_loss_layers_only_on_kv_losses_and_listed_once(tmp_path: Path) -> None:
    data = tiny_spec(tmp_path / "run", losses=[{"name": "logit_kd", "layers": [0]}])
    assert "only K/V losses take `layers`" in problems(data)["losses.0.layers"]
    data = tiny_spec(tmp_path / "run", losses=[{"name": "kv_mse", "layers": [1, 1]}])
    assert "listed twice" in problems(data)["losses.0.layers"]
    data = tiny_spec(tmp_path / "run", losses=[{"name": "kv_mse", "layers": []}])
    assert "losses.0.layers" in problems(data)
    spec = parse_spec(tiny_spec(tmp_path / "run", losses=[{"name": "kv_mse", "layers": [1]}]))
    assert spec.losses[0].layers == [1]


def test_cpu_offload_needs_fsdp(tmp_path: Path) -> None:
    data = tiny_spec(tmp_path / "run")
    data["training"]["cpu_offload"] = True
    assert "needs parallel: fsdp" in problems(data)["training"]
    data["training"]["parallel"] = "fsdp"
    assert parse_spec(data).training.cpu_offload


def test_overrides_set_nested_values_and_list_items() -> None:
    data = {"training": {"max_steps": 1}, "teachers": [{"weight": 1}, {"weight": 1}]}
    apply_overrides(data, ["training.max_steps=50", "teachers.1.weight=2.5", "output.dir=x"])
    assert data == {
        "training": {"max_steps": 50},
        "teachers": [{"weight": 1}, {"weight": 2.5}],
        "output": {"dir": "x"},
    }
    with pytest.raises(KvdError, match="list index below 2"):
        apply_overrides(data, ["teachers.5.weight=1"])
    with pytest.raises(KvdError, match="KEY=VALUE"):
        apply_overrides(data, ["training.max_steps"])


@pytest.mark.parametrize("text", ["teachers: [\n", "- just\n- a list\n"])
def test_bad_yaml_names_the_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(KvdError, match=str(path)):
        load_spec(path)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_example_config_is_valid(path: Path) -> None:
    spec = load_spec(path)
    assert spec.teachers


def test_example_configs_exist() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"quickstart", "cluster_qwen2_tinyllama", "three_teachers"} <= names


def test_validate_command_prints_table_and_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(tiny_spec(tmp_path / "run")))
    assert main(["validate", str(good)]) == 0
    assert "valid" in capsys.readouterr().out
    bad_data = tiny_spec(tmp_path / "run")
    bad_data["teachers"][0]["config"] = {"hidden_size": 8}  # no model_type
    bad_data["student"]["colour"] = "red"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(bad_data))
    assert main(["validate", str(bad), "--set", "training.max_steps=2"]) == 2
    err = capsys.readouterr().err
    assert "teachers.0.config" in err and "student.colour" in err
    assert "Traceback" not in err


def test_validate_reports_missing_model_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tiny_spec(tmp_path / "run")
    data["teachers"][1] = {"id": "gone", "source": "gguf", "path": "nowhere.gguf"}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "teachers.1" in err and "nowhere.gguf" in err


def test_schema_is_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "RunSpec"
    assert "teachers" in schema["required"]


def test_contradictory_direction_and_fusion(tmp_path: Path) -> None:
    data = tiny_spec(
        tmp_path / "run",
        projector={"name": "linear", "direction": "student_to_teacher"},
        fusion={"name": "similarity"},
    )
    assert "cannot route" in problems(data)["projector.direction"]


BAD_SPECS = {
    "yaml_syntax": ("teachers: [\n  - {id: a\n", "YAML syntax error"),
    "not_a_mapping": ("- a\n- b\n", "top level must be a mapping"),
    "unknown_top_key": ("teacherz: []\n", "teacherz"),
    "empty_teachers": (
        "teachers: []\nstudent: {source: tiny, config: {model_type: llama}}\n",
        "teachers",
    ),
    "unknown_source": (
        "teachers: [{source: hff, path: x}]\nstudent: {source: tiny, config: "
        "{model_type: llama}}\n",
        "did you mean 'hf'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_specs_on_the_command_line(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, expected = BAD_SPECS[case]
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    for command in ("validate", "check-shapes", "train"):
        assert main([command, str(path)]) == 2, command
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, (command, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]
