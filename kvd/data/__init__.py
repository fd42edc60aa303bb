"""The data layer: text sources, the content-hash split, windows cut for the student, batches.

data = build_data(spec.data, student_tokenizer=tok, base_dir=spec_dir, add_bos=True)
stream = BatchStream(data.train, batch_size, seed=spec.seed)   # resumable via stream.state
task_ids = data.tasks.ids(next(stream).tasks)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvd.core.errors import KvdError
from kvd.data.base import Document, TaskVocab, TextSource
from kvd.data.packing import (
    Batch,
    BatchStream,
    DataState,
    TextWindow,
    fixed_batches,
    pack_documents,
)
from kvd.data.split import (
    DataLeakageError,
    SplitManifest,
    check_leakage,
    content_hash,
    read_manifest,
    split_documents,
    write_manifest,
)

if TYPE_CHECKING:
    from kvd.spec.runspec import DataRef

__all__ = [
    "Batch",
    "BatchStream",
    "Data",
    "DataLeakageError",
    "DataState",
    "Document",
    "SplitManifest",
    "TaskVocab",
    "TextSource",
    "TextWindow",
    "build_data",
    "check_leakage",
    "content_hash",
    "fixed_batches",
    "pack_documents",
    "read_manifest",
    "split_documents",
    "write_manifest",
]


@dataclass(frozen=True)
class Data:
    """Windows for training and validation, the task vocabulary and the split's manifest."""

    train: list[TextWindow]
    validation: list[TextWindow]
    tasks: TaskVocab
    manifest: SplitManifest


def build_data(
    data_ref: DataRef,
    *,
    student_tokenizer: Any,
    base_dir: Path,
    add_bos: bool,
    min_tokens: int = 16,
) -> Data:
    """Read the dataset named in the spec, split it by content hash, and cut student windows."""
    source = data_ref.component_of(TextSource)(data_ref.config, base_dir=base_dir)
    documents = list(source.documents())
    if not documents:
        raise KvdError(
            f"data: dataset {data_ref.name!r} {data_ref.options()} has no documents",
            hint="check its paths and filters (min_chars, tasks)",
        )
    split = split_documents(documents, data_ref.val_fraction)
    check_leakage(split.manifest)
    for side, docs in (("train", split.train), ("validation", split.validation)):
        if not docs:  # said before any tokenizing: a single 20 MB document costs nothing
            raise KvdError(
                f"data: dataset {data_ref.name!r} has {len(documents)} document(s) and none "
                f"falls in the {side} split (documents are split whole, by content hash, "
                f"val_fraction {data_ref.val_fraction:g})",
                hint="give more documents: more files, or `split: paragraph` for .txt files",
            )

    def windows(side: str, docs: list[Document]) -> list[TextWindow]:
        packed = pack_documents(
            docs,
            student_tokenizer,
            seq_len=data_ref.seq_len,
            add_bos=add_bos,
            min_tokens=min_tokens,
            append_eos=data_ref.append_eos,
        )
        if not packed:
            raise KvdError(
                f"data: dataset {data_ref.name!r} gives no {side} window of at least {min_tokens} "
                f"student tokens ({len(docs)} of {len(documents)} documents are {side} documents)",
                hint="add text, or change data.val_fraction (documents split by content hash)",
            )
        return packed

    return Data(
        train=windows("train", split.train),
        validation=windows("validation", split.validation),
        tasks=TaskVocab.of(d.task for d in documents),
        manifest=split.manifest,
    )
