"""Tiny run specs for tests: random models with kvd's offline byte tokenizer, built-in text."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

LLAMA_TEACHER = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
QWEN_TEACHER = {
    "model_type": "qwen2",
    "hidden_size": 96,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 6,
    "num_key_value_heads": 1,
}
STUDENT = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def tiny_spec(out: Path, **sections: Any) -> dict[str, Any]:
    """A two-teacher (llama MHA/GQA + qwen2 MQA) spec into a 2-layer student; `sections`
    replace top-level keys."""
    spec: dict[str, Any] = {
        "name": "tiny",
        "seed": 0,
        "teachers": [
            {"id": "llama", "source": "tiny", "seed": 1, "config": LLAMA_TEACHER},
            {"id": "qwen", "source": "tiny", "seed": 2, "config": QWEN_TEACHER},
        ],
        "student": {"source": "tiny", "seed": 3, "config": STUDENT},
        "data": {"name": "stdlib", "seq_len": 48, "tasks": ["reference", "module_doc"]},
        "losses": [{"name": "kv_mse"}, {"name": "ce"}],
        "training": {
            "max_steps": 4,
            "batch_size": 2,
            "checkpoint_every": 2,
            "warmup_steps": 1,
        },
        "evaluation": {"every": 2, "batches": 1},
        "output": {"dir": str(out)},
    }
    spec = copy.deepcopy(spec)  # callers edit it: the module's configs must stay as they are
    for key, value in sections.items():
        spec[key] = copy.deepcopy(value)
    return spec


MC_ITEMS = [
    ("def add(a, b):\n    return a", [" + b", " * 2 +", " - c)"]),
    ("for i in range(10):\n    print(", ["i)", "]]", "def"]),
    ("import os\npath = os.path.", ["join(a, b)", "while True", "+++"]),
    ("class Stack:\n    def __init__(self):\n        self.items = ", ["[]", "))", "import"]),
    ("# Return the sum of the", [" numbers in xs.", " (((", " lambda:"]),
    ("x = [1, 2, 3]\ny = len(", ["x)", "x]", ":"]),
]


def local_mc_task(folder: Path, name: str = "kvd_code_mc") -> str:
    """A local lm-evaluation-harness multiple-choice task (code continuations, the first
    choice true) in `folder`; returns its name."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"context": c, "choices": ch, "answer": 0} for c, ch in MC_ITEMS]
    (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(folder / "items.jsonl")}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "answer",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return name
