"""Text sources (a registered component kind) and the documents they yield."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from kvd.core.component import ComponentConfig
from kvd.core.errors import KvdError


@dataclass(frozen=True)
class Document:
    """One document: its text, a task label (for task-conditional fusion) and a stable id."""

    text: str
    task: str
    doc_id: str


class TextSource:
    """Base of text sources. Subclasses define `Config` and `documents()`.

    Relative paths in the Config are taken from `base_dir` (the spec file's folder). Documents
    come in a deterministic order; their text is non-empty.
    """

    Config: ClassVar[type[ComponentConfig]] = ComponentConfig

    def __init__(self, config: Any, *, base_dir: Path = Path(".")) -> None:
        self.config = config
        self.base_dir = base_dir

    def documents(self) -> Iterator[Document]:
        raise NotImplementedError


@dataclass(frozen=True)
class TaskVocab:
    """Task names in sorted order; a task's id is its index (the input of task-aware fusion)."""

    names: tuple[str, ...]

    @classmethod
    def of(cls, tasks: Iterable[str]) -> TaskVocab:
        return cls(tuple(sorted(set(tasks))))

    def __len__(self) -> int:
        return len(self.names)

    def ids(self, tasks: Iterable[str]) -> torch.Tensor:
        """Task names -> a long tensor of ids; an unknown name is a KvdError listing the known."""
        index = {name: i for i, name in enumerate(self.names)}
        try:
            return torch.tensor([index[t] for t in tasks], dtype=torch.long)
        except KeyError as exc:
            raise KvdError(
                f"unknown task {exc.args[0]!r}; known tasks: {', '.join(self.names) or '(none)'}"
            ) from None
