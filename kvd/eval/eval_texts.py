"""The texts `kvd eval` scores. They do not depend on the model evaluated, so students and
teachers with different tokenizers are scored on the same bytes: a run's own validation windows
(rebuilt from its spec.yaml and checked against its split.json), the held-out documents of a
dataset cut into windows of a fixed number of UTF-8 bytes, or every document of text files.

A run's validation documents fall into two fixed halves, `tune` and `test`, by a hash of each
document's id (no seed, independent of order and of the model): choose a recipe's settings on
`tune`, report the chosen recipe on `test`, so no number reported was also used to choose.
"""

from __future__ import annotations

import glob
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kvd.core.errors import KvdError
from kvd.core.manager import registry
from kvd.data import Data, build_data, pack_documents, read_manifest, split_documents
from kvd.data.split import goes_to_validation
from kvd.run.rundir import holds_run
from kvd.sources.byte_tokenizer import byte_tokenizer
from kvd.spec.runspec import DataRef, RunSpec, parse_spec, read_yaml

Part = Literal["all", "tune", "test"]
"""Which of a run's validation windows are scored: all, or one half of its documents."""

_WINDOWS: dict[tuple[str, str, bool, Path], Data] = {}
"""Data rebuilt for runs in this process, by data spec, student tokenizer, BOS and folder."""


@dataclass(frozen=True)
class EvalTexts:
    """The texts scored, where they come from, and the digest of the run split they belong to."""

    texts: list[str]
    source: str
    name: str
    split_digest: str | None = None


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and holds_run(path)


def run_spec(run_dir: Path, base_dir: Path) -> RunSpec:
    """The spec of a run (its spec.yaml); relative paths in it are taken from `base_dir`."""
    if not (run_dir / "spec.yaml").is_file():
        raise KvdError(f"{run_dir}: not a finished kvd run directory (no spec.yaml)")
    data = read_yaml(run_dir / "spec.yaml")
    return parse_spec(data, source=str(run_dir / "spec.yaml"), base_dir=base_dir)


def in_part(doc_id: str, part: Part) -> bool:
    """Whether a validation document is in `part`: `tune` iff the first 64 bits of the sha256 of
    its id, read as a fraction of 2**64, are below 1/2; `test` the others."""
    if part == "all":
        return True
    tune = goes_to_validation(hashlib.sha256(doc_id.encode("utf-8")).hexdigest(), 0.5)
    return tune == (part == "tune")


def run_texts(run_dir: Path, base_dir: Path, *, limit: int | None, part: Part = "all") -> EvalTexts:
    """The run's validation windows (those of `part`'s documents), rebuilt from its spec with
    its student's tokenizer; the split must have the content hashes of the run's split.json."""
    spec = run_spec(run_dir, base_dir)
    student = spec.student.build()
    geometry = student.geometry()
    tokenizer = geometry.tokenizer_hash or spec.student.model_dump_json()
    key = (spec.data.model_dump_json(), tokenizer, geometry.adds_bos, base_dir)
    if key not in _WINDOWS:  # the runs of one experiment share their data
        _WINDOWS[key] = build_data(
            spec.data,
            student_tokenizer=student.tokenizer(),
            base_dir=base_dir,
            add_bos=geometry.adds_bos,
            min_tokens=spec.data.min_tokens,
        )
    data = _WINDOWS[key]
    recorded = read_manifest(run_dir / "split.json")
    if data.manifest.digest != recorded.digest:
        raise KvdError(
            f"{run_dir}: the data rebuilt from its spec.yaml does not match its split.json "
            "(content hashes differ: the text changed since the run)",
            hint="evaluate on the same data the run used (same Python version for stdlib)",
        )
    texts = [w.text for w in data.validation if in_part(w.doc_id, part)][:limit]
    if part == "all":
        return EvalTexts(texts, f"validation split of {run_dir}", "validation", recorded.digest)
    source = f"{part} half of the validation split of {run_dir}"
    return EvalTexts(texts, source, f"validation-{part}", recorded.digest)


def dataset_texts(text: str, *, window_bytes: int, limit: int | None) -> EvalTexts:
    """`NAME` of a dataset (its held-out documents, split by content hash as in a run with the
    default val_fraction) or text files (every document), cut into windows of at most
    `window_bytes` UTF-8 bytes."""
    datasets = registry("datasets")
    if text in datasets:
        ref = DataRef(name=text)
        documents = split_documents(
            datasets.get(text)(ref.config, base_dir=Path(".")).documents(), ref.val_fraction
        ).validation
        source, name = f"{text} (held-out documents)", text
    else:
        if not glob.glob(text):
            raise KvdError(
                f"--data {text}: no such file, and not a dataset name",
                hint=f"datasets: {', '.join(datasets.names())}; or a .txt/.jsonl/.parquet file",
            )
        ref = DataRef.model_validate({"name": "text_files", "paths": [text]})
        documents = list(datasets.get("text_files")(ref.config, base_dir=Path(".")).documents())
        source, name = text, re.sub(r"[^\w.-]+", "_", Path(text).stem).strip("_") or "data"
    windows = pack_documents(
        documents, byte_tokenizer(), seq_len=window_bytes, add_bos=False, min_tokens=16
    )
    if not windows:
        raise KvdError(f"--data {text}: no window of at least 16 bytes")
    return EvalTexts([w.text for w in windows][:limit], source, name)


def resolve_texts(
    target: str,
    data: str | None,
    *,
    base_dir: Path,
    window_bytes: int,
    limit: int | None,
    part: Part = "all",
) -> EvalTexts:
    """The texts `--data` names; without it, a run target's own validation split (or `part` of
    it)."""
    path = Path(target)
    if data is None:
        if not is_run_dir(path):
            raise KvdError(
                f"{target}: --data is needed for a target that is not a run dir",
                hint="--data RUN_DIR (its validation texts), a dataset name (stdlib) or a file",
            )
        return run_texts(path, base_dir, limit=limit, part=part)
    if is_run_dir(Path(data)):
        texts = run_texts(Path(data), base_dir, limit=limit, part=part)
        if Path(data).resolve() == path.resolve():
            return texts
        name = f"{texts.name}-{Path(data).resolve().name}"
        return EvalTexts(texts.texts, texts.source, name, texts.split_digest)
    if part != "all":
        raise KvdError(
            f"--part {part}: only a run's validation split has tune and test halves ({data} is "
            "not a run dir)",
            hint="drop --part, or give a run dir as TARGET or --data",
        )
    return dataset_texts(data, window_bytes=window_bytes, limit=limit)
