"""Text files as a source: .txt, .jsonl and .parquet, named by paths or globs."""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from kvd.core.component import ComponentConfig
from kvd.core.errors import KvdError
from kvd.data.base import Document, TextSource

SUFFIXES = (".txt", ".jsonl", ".parquet")
_BLANK_LINES = re.compile(r"\n[ \t\f\v]*\n")


class TextFilesSource(TextSource):
    """Your own text: .txt files, JSON lines (.jsonl) or Parquet tables (.parquet, with pyarrow).

    A .txt file is one document, or one per blank-line-separated paragraph (`split: paragraph`).
    A .jsonl line / a .parquet row is one document: the string in `text_field` (kept verbatim),
    and its task label in `task_field` when that field is there. Blank texts are skipped.
    """

    class Config(ComponentConfig):
        paths: list[str] = Field(min_length=1)
        """Files or glob patterns (`**` recurses), relative to the spec file's folder."""
        split: Literal["file", "paragraph"] = "file"
        """How a .txt file becomes documents."""
        text_field: str = "text"
        """The field of a .jsonl line or .parquet row that holds the document's text."""
        task_field: str = "task"
        """The field that holds its task label (read when present)."""
        default_task: str = "text"
        """The task label of documents that carry none (every .txt document)."""

    config: Config

    def files(self) -> list[Path]:
        """The files named by `paths`, in the order given (globs sorted), each once."""
        found: dict[Path, None] = {}
        for pattern in self.config.paths:
            full = str(self.base_dir / pattern)
            if glob.has_magic(pattern):
                matches = sorted(Path(p) for p in glob.glob(full, recursive=True))
                matches = [p for p in matches if p.is_file()]
                if not matches:
                    raise KvdError(
                        f"data.paths: {pattern!r} matches no file (looked in {self.base_dir})",
                        hint="relative paths start at the spec file's folder",
                    )
            else:
                matches = [Path(full)]
            for path in matches:
                if not path.exists():
                    raise KvdError(
                        f"data.paths: {path}: no such file or directory",
                        hint="relative paths start at the spec file's folder",
                    )
                if path.is_dir():
                    raise KvdError(
                        f"data.paths: {path}: is a directory", hint="name its files: 'DIR/*.txt'"
                    )
                if path.suffix not in SUFFIXES:
                    raise KvdError(
                        f"data.paths: {path}: unsupported file type {path.suffix or '(none)'!r}",
                        hint=f"use one of {', '.join(SUFFIXES)}",
                    )
                found[path] = None
        return list(found)

    def documents(self) -> Iterator[Document]:
        for path in self.files():
            if path.suffix == ".txt":
                yield from self._txt(path)
            elif path.suffix == ".jsonl":
                yield from self._jsonl(path)
            else:
                yield from self._parquet(path)

    def _doc_id(self, path: Path) -> str:
        try:
            return path.relative_to(self.base_dir).as_posix()
        except ValueError:
            return path.as_posix()

    def _txt(self, path: Path) -> Iterator[Document]:
        text = _read_text(path)
        task, doc_id = self.config.default_task, self._doc_id(path)
        if self.config.split == "file":
            if text.strip():
                yield Document(text.strip(), task, doc_id)
            return
        blocks = (block.strip() for block in _BLANK_LINES.split(text))
        for i, block in enumerate(b for b in blocks if b):
            yield Document(block, task, f"{doc_id}#{i}")

    def _jsonl(self, path: Path) -> Iterator[Document]:
        doc_id = self._doc_id(path)
        for number, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise KvdError(f"{where}: invalid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(record, dict):
                raise KvdError(f"{where}: expected a JSON object, got {type(record).__name__}")
            doc = self._record(record, where, f"{doc_id}:{number}")
            if doc is not None:
                yield doc

    def _parquet(self, path: Path) -> Iterator[Document]:
        try:
            import pyarrow.parquet as pq  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise KvdError(
                f"{path}: install pyarrow to read .parquet files", hint="pip install pyarrow"
            ) from None
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises its own OSError / ArrowInvalid family
            raise KvdError(f"{path}: cannot read as Parquet ({exc})") from None
        if self.config.text_field not in table.column_names:
            raise KvdError(
                f"{path}: no column {self.config.text_field!r} "
                f"(columns: {', '.join(table.column_names)})",
                hint="set text_field to the column that holds the text",
            )
        doc_id = self._doc_id(path)
        for row, record in enumerate(table.to_pylist()):
            doc = self._record(record, f"{path}: row {row}", f"{doc_id}#{row}")
            if doc is not None:
                yield doc

    def _record(self, record: dict[str, Any], where: str, doc_id: str) -> Document | None:
        """A document from one JSON object / table row; None when its text is blank."""
        field, task_field = self.config.text_field, self.config.task_field
        if field not in record:
            raise KvdError(
                f"{where}: no {field!r} field", hint="set text_field to the field with the text"
            )
        text, task = record[field], record.get(task_field)
        if not isinstance(text, str):
            raise KvdError(f"{where}: {field!r} must be a string, got {type(text).__name__}")
        if task is None:
            task = self.config.default_task
        elif not isinstance(task, str) or not task:
            raise KvdError(f"{where}: {task_field!r} must be a non-empty string, got {task!r}")
        return Document(text, task, doc_id) if text.strip() else None


def _read_text(path: Path) -> str:
    """The file's UTF-8 text; a missing file, bad UTF-8 or a NUL byte (a binary file) is a
    KvdError naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KvdError(f"{path}: no such file", hint="check data.paths") from None
    except UnicodeDecodeError as exc:
        raise KvdError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise KvdError(f"{path}: cannot read ({exc.strerror or exc})") from None
    nul = text.find("\0")
    if nul >= 0:
        raise KvdError(f"{path}: not a text file (a NUL byte at character {nul})")
    return text
