"""`source: kvd_run`: the student a finished kvd run saved, as a model (born-again distillation).

    teachers:
      - {id: gen1, source: kvd_run, run: runs/first}

`kvd train` ends a run by saving its student in HF format with its tokenizer (`RUN/student`)
and writing `RUN/results.json`; a directory with both is a finished run. Its student then
teaches the next student like any HF model: geometry from `RUN/student/config.json` without
weights, weights loaded with `AutoModelForCausalLM`, no network.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from kvd.component import ComponentConfig
from kvd.errors import KvdError
from kvd.geometry import ModelGeometry, read_hf_dir
from kvd.models import LoadedModel, ModelSource
from kvd.sources.hf import load_tokenizer_dir

FINISHED = ("student", "results.json")
"""What a finished kvd run directory holds."""


class KvdRunSource(ModelSource):
    """The distilled student of a finished kvd run (RUN/student), e.g. as the next run's
    teacher."""

    class Config(ComponentConfig):
        run: str
        """A finished kvd run directory; a relative path is taken from the spec file's folder."""

    config: Config

    @property
    def run_dir(self) -> Path:
        path = Path(self.config.run).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def student_dir(self) -> Path:
        """RUN/student, once RUN is known to be a finished kvd run."""
        run = self.run_dir
        hint = (
            "point `run:` at a directory `kvd train` finished: it holds student/ and results.json"
        )
        if not run.is_dir():
            raise KvdError(f"{run}: no such kvd run directory", hint=hint)
        missing = [name for name in FINISHED if not (run / name).exists()]
        if missing:
            raise KvdError(
                f"{run}: not a finished kvd run (no {' and no '.join(missing)})", hint=hint
            )
        return run / "student"

    def describe(self) -> str:
        return f"kvd run {self.run_dir}"

    def geometry(self) -> ModelGeometry:
        """The saved student's geometry, named after the run directory; reads no weights."""
        return replace(read_hf_dir(self.student_dir()), name=self.run_dir.resolve().name)

    def load(self, *, device: torch.device, dtype: torch.dtype) -> LoadedModel:
        from transformers import AutoModelForCausalLM

        path = self.student_dir()
        try:
            model: Any = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, local_files_only=True
            )
        except OSError as exc:
            raise KvdError(f"{path}: cannot load the run's student ({exc})") from None
        return LoadedModel(model.to(device).eval(), self.tokenizer(), self.geometry())

    def tokenizer(self) -> Any:
        return load_tokenizer_dir(self.student_dir())
