"""`kvd eval`: one model's metrics on held-out text (`kvd.eval.eval_texts`), saved as JSON for
`kvd compare`: bits per byte, perplexity, next-token accuracy, cloze accuracy (`kvd.eval.cloze`),
tokens/s and peak memory of the scoring pass, and per-text values for paired tests."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvd.core.errors import KvdError
from kvd.core.files import json_text, write_atomic
from kvd.core.memory import read_peak_mb, reset_peak
from kvd.core.names import name_problem
from kvd.data.split import content_hash
from kvd.data.tokenize import tokenize
from kvd.eval.cloze import build_items, cloze_correct
from kvd.eval.eval_texts import EvalTexts, Part, is_run_dir, resolve_texts, run_spec
from kvd.run.evaluate import evaluate_lm, span_bytes
from kvd.sources.build import load_model
from kvd.spec.models import LoadedModel
from kvd.spec.runspec import load_spec

FORMAT = 1
"""Version of the eval JSON layout."""


@dataclass
class Subject:
    """The model evaluated, whether it adds a BOS, and a label for reports."""

    loaded: LoadedModel
    add_bos: bool
    label: str


def open_subject(
    target: str, *, teacher: str | None, base_dir: Path, device: torch.device
) -> Subject:
    """A run dir (its trained student, or `teacher`), a spec file (its student as initialised,
    or `teacher`), or any model `kvd check-shapes` accepts (preset, HF dir, .gguf, pypi:NAME)."""
    path = Path(target)
    if is_run_dir(path) or path.suffix in (".yaml", ".yml"):
        run = is_run_dir(path)
        spec = run_spec(path, base_dir) if run else load_spec(path)
        if teacher is not None:
            refs = {t.id: (i, t) for i, t in enumerate(spec.teachers)}
            if teacher not in refs:
                raise KvdError(
                    f"{target}: no teacher {teacher!r}",
                    hint=f"its teachers: {', '.join(refs)}",
                )
            i, ref = refs[teacher]
            loaded = load_model(ref, device, f"teachers.{i}", spec.seed)
            return Subject(loaded, loaded.geometry.adds_bos, f"teacher {teacher} of {target}")
        adds_bos = spec.student.build().geometry().adds_bos
        if not run:
            loaded = load_model(spec.student, device, "student", spec.seed)
            return Subject(loaded, adds_bos, f"untrained student of {target}")
        if not (path / "student" / "config.json").is_file():
            raise KvdError(
                f"{target}: the run has no trained student yet (student/ is missing)",
                hint="finish it with `kvd train SPEC --resume`",
            )
        from kvd.sources.hf import HfSource

        source = HfSource(HfSource.Config(path=str(path / "student")))
        loaded = source.load(device=device, dtype=torch.float32)
        return Subject(loaded, adds_bos, f"student of {target}")
    if teacher is not None:
        raise KvdError(f"--teacher {teacher}: {target} is not a run dir or a spec file")
    from kvd.sources.resolve import resolve_model

    model = resolve_model(target)
    loaded = model.load(device=device, dtype=torch.float32)
    return Subject(loaded, loaded.geometry.adds_bos, model.describe())


def sequence_bytes(
    tokenizer: Any, texts: list[str], *, max_length: int, add_bos: bool
) -> list[int]:
    """UTF-8 bytes of the predicted tokens of each text (what bits per byte divides by)."""
    batch = tokenize(tokenizer, texts, max_length=max_length, add_bos=add_bos)
    valid = batch.attention_mask[:, 1:] & batch.attention_mask[:, :-1]
    return [int(span_bytes(t, batch.offsets[b, 1:])[valid[b]].sum()) for b, t in enumerate(texts)]


def evaluate_subject(
    subject: Subject,
    data: EvalTexts,
    *,
    batch_size: int,
    cloze_choices: int,
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """The eval report: LM metrics, cloze accuracy, speed, memory and per-sequence values."""
    model, tokenizer = subject.loaded.model, subject.loaded.tokenizer
    limit = subject.loaded.geometry.max_position
    longest = max(len(t.encode("utf-8")) for t in data.texts) + 1  # >= tokens of any text
    max_length = min(longest, limit) if limit else longest
    pair_length = min(2 * longest, limit) if limit else 2 * longest  # context + any choice
    reset_peak(device)
    started = time.perf_counter()
    lm = evaluate_lm(
        model,
        tokenizer,
        data.texts,
        batch_size=batch_size,
        max_length=max_length,
        add_bos=subject.add_bos,
        device=device,
    )
    seconds = time.perf_counter() - started
    items = build_items(data.texts, choices=cloze_choices, seed=seed)
    correct = cloze_correct(
        model,
        tokenizer,
        items,
        batch_size=batch_size,
        max_length=pair_length,
        add_bos=subject.add_bos,
        device=device,
    )
    nbytes = sequence_bytes(tokenizer, data.texts, max_length=max_length, add_bos=subject.add_bos)
    hashes = [content_hash(t) for t in data.texts]
    return {
        "format": FORMAT,
        "model": subject.label,
        "data": {
            "source": data.source,
            "texts": len(data.texts),
            "split_digest": data.split_digest,
            "texts_digest": hashlib.sha256("".join(hashes).encode()).hexdigest(),
        },
        "metrics": {
            "bits_per_byte": lm.bits_per_byte,
            "perplexity": lm.perplexity,
            "accuracy": lm.accuracy,
            "cloze_accuracy": sum(correct) / len(correct) if correct else None,
            "tokens": lm.tokens,
            "bytes": lm.bytes,
            "tokens_per_s": lm.tokens / max(seconds, 1e-9),
            "peak_mem_mb": read_peak_mb(device),
            "seconds": seconds,
        },
        "cloze": {"choices": cloze_choices, "seed": seed, "correct": correct},
        "sequences": {
            "hash": hashes,
            "nll": lm.nll,
            "bytes": nbytes,
            "bits_per_byte": [
                n / math.log(2) / max(b, 1) for n, b in zip(lm.nll, nbytes, strict=True)
            ],
        },
    }


def write_report(report: dict[str, Any], path: Path) -> None:
    write_atomic(path, json_text(report, indent=1))


@dataclass(frozen=True)
class EvalOptions:
    """The knobs of `kvd eval` besides target and data."""

    max_texts: int | None = None
    window_bytes: int = 512
    cloze_choices: int = 4
    seed: int = 0
    batch_size: int = 8
    base_dir: Path = Path(".")
    device: str = "auto"
    part: Part = "all"


def check_result_name(name: str | None) -> None:
    """`--name` becomes a file name in RUN/eval/: a plain name only."""
    if name is not None and (problem := name_problem(name)) is not None:
        raise KvdError(f"--name {name!r} {problem}", hint="give a plain name, e.g. --name heldout")


def eval_device(device: str) -> torch.device:
    """`auto` (CUDA when there is one, else CPU) or a torch device string."""
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(auto if device == "auto" else device)


def result_path(target: str, label: str, out: Path | None) -> Path | None:
    """Where a result goes: `out`, else RUN/eval/LABEL.json for a run dir, else nowhere."""
    path = Path(target)
    return out or (path / "eval" / f"{label}.json" if is_run_dir(path) else None)


def run_eval(
    target: str,
    *,
    data: str | None = None,
    teacher: str | None = None,
    name: str | None = None,
    out: Path | None = None,
    options: EvalOptions = EvalOptions(),
) -> tuple[dict[str, Any], Path | None]:
    """Evaluate `target` and save the report: to `out`, else RUN/eval/NAME.json for a run dir
    (NAME from the data, `teacher-ID-` in front for a teacher); returns it and where it went."""
    check_result_name(name)
    device = eval_device(options.device)
    path = Path(target)
    if not is_run_dir(path) and path.suffix not in (".yaml", ".yml"):
        from kvd.sources.resolve import resolve_model

        resolve_model(target)  # a missing or unknown model is named before any text is read
    texts = resolve_texts(
        target,
        data,
        base_dir=options.base_dir,
        window_bytes=options.window_bytes,
        limit=options.max_texts,
        part=options.part,
    )
    subject = open_subject(target, teacher=teacher, base_dir=options.base_dir, device=device)
    report = evaluate_subject(
        subject,
        texts,
        batch_size=options.batch_size,
        cloze_choices=options.cloze_choices,
        seed=options.seed,
        device=device,
    )
    report |= {"target": target, "teacher": teacher}
    label = name or (f"teacher-{teacher}-{texts.name}" if teacher else texts.name)
    dest = result_path(target, label, out)
    if dest is not None:
        write_report(report, dest)
    return report, dest
