"""Model sources: where a teacher or the student comes from (a registered component kind)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from kvd.core.component import ComponentConfig
from kvd.spec.geometry import ModelGeometry


@dataclass
class LoadedModel:
    """A causal LM of transformers with its tokenizer (a `PreTrainedTokenizerFast`)."""

    model: Any
    tokenizer: Any
    geometry: ModelGeometry


class ModelSource:
    """Base of model sources. Subclasses define `Config`, `geometry()` and `load()`.

    `geometry()` must not load weights (it backs `kvd check-shapes` and `kvd validate`).
    Relative paths in the Config are taken from `base_dir` (the spec file's folder).
    """

    Config: ClassVar[type[ComponentConfig]] = ComponentConfig

    def __init__(self, config: Any, *, base_dir: Path = Path(".")) -> None:
        self.config = config
        self.base_dir = base_dir

    def describe(self) -> str:
        """A short label for reports: a path, a package or a preset name."""
        raise NotImplementedError

    def geometry(self) -> ModelGeometry:
        raise NotImplementedError

    def load(self, *, device: torch.device, dtype: torch.dtype) -> LoadedModel:
        """The model in eval mode on `device`, its tokenizer and geometry."""
        raise NotImplementedError

    def tokenizer(self) -> Any:
        """The tokenizer alone (a `PreTrainedTokenizerFast`), without the model's weights."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Make `load()` quick without keeping weights in memory (a GGUF source converts its
        file into kvd's cache). kvd prepares every teacher before loading any, so a conversion's
        memory never adds to models already loaded. Default: nothing to prepare."""
