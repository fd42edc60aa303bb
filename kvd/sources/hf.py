"""`source: hf`: a local Hugging Face model directory (config.json, weights, tokenizer files)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from pydantic import model_validator
from safetensors import SafetensorError

from kvd.core.component import ComponentConfig
from kvd.core.errors import KvdError
from kvd.sources.paths import local_path
from kvd.spec.geometry import ModelGeometry, read_hf_dir
from kvd.spec.models import LoadedModel, ModelSource

_COMMIT = re.compile(r"[0-9a-f]{7,40}")


class HfSource(ModelSource):
    """A local HF model directory, loaded with AutoModelForCausalLM (no network)."""

    class Config(ComponentConfig):
        path: str
        """An HF model dir (config.json, safetensors weights, tokenizer), relative to the spec
        file's folder."""
        trust_remote_code: bool = False
        """Run the model's own Python code (needs `revision` pinned to a commit hash)."""
        revision: str | None = None
        """The commit hash of the model's code you have read (with trust_remote_code)."""

        @model_validator(mode="after")
        def _pinned(self) -> HfSource.Config:
            if self.trust_remote_code and not (self.revision and _COMMIT.fullmatch(self.revision)):
                raise ValueError(
                    "trust_remote_code runs the model's own Python code: pin `revision` to the "
                    "commit hash you have read"
                )
            return self

    config: Config

    @property
    def path(self) -> Path:
        return local_path(self.config.path, self.base_dir)

    def describe(self) -> str:
        return str(self.path)

    def geometry(self) -> ModelGeometry:
        return read_hf_dir(self.path, **self._code_options())

    def load(self, *, device: torch.device, dtype: torch.dtype) -> LoadedModel:
        from transformers import AutoModelForCausalLM

        geometry = self.geometry()
        try:
            # safetensors only: a pickled checkpoint (pytorch_model.bin) can run code on load
            model: Any = AutoModelForCausalLM.from_pretrained(
                str(self.path),
                dtype=dtype,
                local_files_only=True,
                use_safetensors=True,
                **self._code_options(),
            )
        except SafetensorError as exc:  # a truncated or damaged file
            raise KvdError(
                f"{self.path}: a safetensors weights file is damaged or incomplete ({exc})",
                hint="copy or save the model again; a partial download or a full disk cuts a "
                "file short",
            ) from None
        except OSError as exc:
            raise KvdError(
                f"{self.path}: cannot load the model weights ({exc})",
                hint="kvd loads weights from safetensors files only; convert a pickled "
                "checkpoint with save_pretrained(..., safe_serialization=True) in a trusted "
                "environment",
            ) from None
        return LoadedModel(model.to(device).eval(), self.tokenizer(), geometry)

    def tokenizer(self) -> Any:
        return load_tokenizer_dir(self.path, **self._code_options())

    def _code_options(self) -> dict[str, Any]:
        return {
            "trust_remote_code": self.config.trust_remote_code,
            "revision": self.config.revision,
        }


def load_tokenizer_dir(path: Path, **options: Any) -> Any:
    """The fast tokenizer of a model directory; kvd needs its character offsets."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, **options)
    except (OSError, ValueError) as exc:
        raise KvdError(
            f"{path}: cannot load a tokenizer ({exc})",
            hint="the directory needs tokenizer.json (or tokenizer files transformers can read)",
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise KvdError(
            f"{path}: the tokenizer is not a fast tokenizer, so it has no character offsets",
            hint="add a tokenizer.json to the directory",
        )
    return tokenizer
