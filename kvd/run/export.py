"""The student as users take it: an HF model dir that loads under transformers 5 and under the
last 4.x release, whose tokenizer config says what the student was trained with (not where its
files came from), and a model card (README.md) of its run.

transformers 5 names a tokenizer class (`TokenizersBackend`) that 4.x does not know, and keeps
RoPE settings in `rope_parameters`, which 4.x ignores (it would rotate with theta 10000 whatever
the student was trained with). The export names `PreTrainedTokenizerFast`, which both read, and
writes the 4.x keys `rope_theta` / `rope_scaling` beside `rope_parameters`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from kvd.core.errors import KvdError
from kvd.core.files import atomic_path
from kvd.run.onnx_export import TOLERANCE, check_onnx, export_onnx
from kvd.spec.models import LoadedModel
from kvd.spec.runspec import RunSpec

LOCAL_KEYS = ("local_files_only", "is_local", "chat_template")
"""Tokenizer-config keys about the machine that saved it, or the teacher's chat format (a base
student trained on plain text has none)."""


def make_portable(out: Path, *, adds_bos: bool, max_positions: int | None) -> None:
    """Rewrite the configs of the HF model dir `out` (module docstring). Tokenizer: the BOS the
    student was trained with (not every tokenizer class records it), its real context length
    instead of transformers' 1e30 placeholder, a class both major versions know, no keys of
    LOCAL_KEYS and no chat_template.jinja. Model: RoPE settings also as 4.x reads them."""
    tokenizer = out / "tokenizer_config.json"
    data = json.loads(tokenizer.read_text()) if tokenizer.exists() else {}
    for key in LOCAL_KEYS:
        data.pop(key, None)
    data["add_bos_token"] = adds_bos
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    if max_positions is not None:
        data["model_max_length"] = max_positions
    tokenizer.write_text(json.dumps(data, indent=2))
    (out / "chat_template.jinja").unlink(missing_ok=True)
    model = out / "config.json"
    config = json.loads(model.read_text())
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") != "default":
            config["rope_scaling"] = scaling
        model.write_text(json.dumps(config, indent=2, sort_keys=True))


def model_card(spec: RunSpec, resolved: dict[str, Any], results: dict[str, Any]) -> str:
    """README.md of an exported student: what it was distilled from, on what, for how long, how
    well it scores on its validation split, and the resolved spec to reproduce it."""
    val = results.get("validation", {})
    teachers = "\n".join(f"- `{t.id}`: {t.build().describe()}" for t in spec.teachers)
    losses = ", ".join(f"{ref.name} ({ref.weight:g})" for ref in spec.losses)
    lines = [
        "---",
        "library_name: transformers",
        "tags: [kvd, knowledge-distillation]",
        "---",
        "",
        f"# {spec.name}: a student distilled by kvd",
        "",
        "Teachers:",
        "",
        teachers,
        "",
        f"- data: `{spec.data.name}`, sequences of {spec.data.seq_len} tokens",
        f"- losses: {losses}; fusion: `{spec.fusion.name}`",
        f"- trained: {results.get('step')} steps, {results.get('tokens')} tokens",
    ]
    if "bits_per_byte" in val:
        lines.append(
            f"- validation: {val['bits_per_byte']:.4f} bits/byte, perplexity "
            f"{val['perplexity']:.2f}, next-token accuracy {val['accuracy']:.4f} "
            f"({val['tokens']} tokens of the run's held-out split)"
        )
    lines += [
        "",
        "Load it with transformers: `AutoModelForCausalLM.from_pretrained(DIR)` and",
        "`AutoTokenizer.from_pretrained(DIR)`. The spec it was trained with (`kvd train`",
        "reruns it):",
        "",
        "```yaml",
        yaml.safe_dump(resolved, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_student(
    path: Path,
    student: LoadedModel,
    spec: RunSpec,
    resolved: dict[str, Any],
    results: dict[str, Any],
    *,
    onnx: bool = False,
    weights: dict[str, Any] | None = None,
) -> float | None:
    """The student as one HF model dir at `path`, written whole or not at all: weights (the
    model's own, or `weights`: whole tensors of a sharded model), tokenizer, portable configs
    and the model card of `results` (step, tokens, validation).
    With `onnx`, also `model.onnx` (kvd.run.onnx_export), checked with onnxruntime on CHECK_TEXT;
    returns the largest |logit difference| found there (None without `onnx`)."""
    with atomic_path(path, directory=True) as out:
        student.model.save_pretrained(out, state_dict=weights)
        student.tokenizer.save_pretrained(out)
        make_portable(
            out,
            adds_bos=student.geometry.adds_bos,
            max_positions=getattr(student.model.config, "max_position_embeddings", None),
        )
        card = model_card(spec, resolved, results)
        diff = None
        if onnx:
            diff = write_onnx(out / "model.onnx", student)
            card += ONNX_CARD.format(diff=diff)
        (out / "README.md").write_text(card)
    return diff


CHECK_TEXT = "def mean(xs):\n    return sum(xs) / len(xs)  # the average of a list of numbers\n"
"""Real text the ONNX export is checked on (code and prose, as in the built-in corpus)."""

ONNX_CARD = """
## ONNX

`model.onnx` is the same student as an ONNX decoder with its KV cache (inputs `input_ids`,
`attention_mask`, `position_ids`, `past_key_values.{{i}}.key|value`; outputs `logits`,
`present.{{i}}.key|value`). onnxruntime matched torch on real text within {diff:.1e} (largest
|logit difference|, a prefill then one token at a time through the cache).
"""


def write_onnx(path: Path, student: LoadedModel) -> float:
    """Export the student to `path` and check it (kvd.run.onnx_export); the largest |logit
    difference| from torch, or a KvdError when it exceeds onnx_export.TOLERANCE."""
    ids = student.tokenizer(CHECK_TEXT, return_tensors="pt").input_ids
    export_onnx(student.model, path)
    diff = check_onnx(path, student.model, ids)
    if diff > TOLERANCE:
        raise KvdError(
            f"{path.name}: onnxruntime's logits differ from torch's by {diff:.2e} "
            f"(> {TOLERANCE:g}); the export was not kept",
            hint="report it with the run's spec.yaml; `kvd export` without --format onnx works",
        )
    return diff
