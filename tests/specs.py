"""Tiny run specs for tests: random models with kvd's offline byte tokenizer, built-in text."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

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
