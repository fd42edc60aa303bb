"""The command line as a user meets it: --version, near-miss keys, output that survives a pipe,
no third-party progress bars, and what is skipped said once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import kvd
from kvd.cli.app import main
from tests.specs import tiny_spec


def test_shell_completion_of_commands() -> None:
    """`kvd --install-completion` installs what `--show-completion` prints; the shell then asks
    kvd itself for the words that complete a command line."""
    import os

    cli = [sys.executable, "-m", "kvd.cli"]
    script = subprocess.run([*cli, "--show-completion", "bash"], capture_output=True, text=True)
    assert script.returncode == 0 and "complete -o default -F _kvd_completion kvd" in script.stdout
    env = os.environ | {
        "_KVD_COMPLETE": "complete_bash",
        "COMP_WORDS": "kvd check-",
        "COMP_CWORD": "1",
    }
    words = subprocess.run(cli, env=env, capture_output=True, text=True)
    assert words.stdout.split() == ["check-shapes"]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"kvd {kvd.__version__}"


def test_the_command_reexecutes_with_mimalloc_and_imports_this_kvd(tmp_path: Path) -> None:
    """`python -m kvd.cli` replaces itself once by a process with mimalloc preloaded; that
    process must import this kvd and the standard library, from any working directory (a kvd
    folder on its path would shadow `types` with kvd/types.py and stop Python at start-up)."""
    from kvd.core.allocator import mimalloc_library

    assert mimalloc_library() is not None  # a dependency on Linux: the re-exec path is taken
    env = {k: v for k, v in os.environ.items() if k not in ("KVD_ALLOCATOR", "LD_PRELOAD")}
    done = subprocess.run(
        [sys.executable, "-m", "kvd.cli", "--version"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"kvd {kvd.__version__}"


@pytest.mark.parametrize(
    ("setting", "location", "suggestion"),
    [
        ("training.max_step=5", "training.max_step", "max_steps"),
        ("trainng.max_steps=5", "trainng", "training"),
        ("teachers.0.dtyp=float32", "teachers.0.dtyp", "dtype"),  # a reference's own key
        ("fusion={name: mean, combin: losses}", "fusion.combin", "combine"),  # an option
    ],
)
def test_a_mistyped_key_names_the_near_match(
    setting: str,
    location: str,
    suggestion: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(tmp_path / "run")))
    assert main(["validate", str(spec), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert location in err and f"did you mean '{suggestion}'?" in err


def test_a_piped_run_prints_whole_paths_and_no_progress_bars(tmp_path: Path) -> None:
    """kvd train in a pipe: the results table keeps the run dir whole however long; no tqdm bar
    of transformers ('Writing model shards') reaches the log; a missing tensorboard is said
    once."""
    out = tmp_path / ("a-rather-long-folder-name-for-the-run-" * 3) / "run"
    data = tiny_spec(out)
    data["training"]["max_steps"] = 1
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    done = subprocess.run(
        [sys.executable, "-m", "kvd.cli", "train", str(spec)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert str(out) in done.stdout
    assert "Writing model shards" not in done.stderr and "Loading weights" not in done.stderr
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert done.stderr.count("tensorboard is not installed") == 1
