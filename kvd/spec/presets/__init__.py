"""Config facts of well-known models, one YAML file each: the HF config dict plus tokenizer facts.

repo: Qwen/Qwen2-7B                          # where the facts come from
tokenizer: {family: qwen2, adds_bos: false}
config: {model_type: qwen2, hidden_size: 3584, ...}   # as in the model's config.json
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import yaml

from kvd.core.errors import KvdError
from kvd.spec.geometry import ModelGeometry, TokenizerFacts, geometry_from_dict


@dataclass(frozen=True)
class Preset:
    """One preset: its canonical name, HF config dict and tokenizer facts."""

    name: str
    repo: str
    config: dict[str, Any]
    tokenizer: TokenizerFacts


def preset_names() -> list[str]:
    """Canonical names of every built-in preset, sorted."""
    return sorted(
        entry.name.removesuffix(".yaml")
        for entry in files(__name__).iterdir()
        if entry.name.endswith(".yaml")
    )


def find_preset(name: str) -> str | None:
    """The canonical name of preset `name` (case-insensitive), or None."""
    by_lower = {n.lower(): n for n in preset_names()}
    return by_lower.get(name.strip().lower())


def unknown_preset_hint(name: str) -> str:
    """A did-you-mean and the list of presets for an unknown name."""
    names = preset_names()
    lower = {n.lower(): n for n in names}
    close = [lower[c] for c in difflib.get_close_matches(name.lower(), list(lower), n=3)]
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return hint + f"Presets: {', '.join(names)}."


def load_preset(name: str) -> Preset:
    """The preset called `name` (case-insensitive); unknown names raise a did-you-mean KvdError."""
    canonical = find_preset(name)
    if canonical is None:
        raise KvdError(f"unknown preset {name!r}", hint=unknown_preset_hint(name))
    data = yaml.safe_load(files(__name__).joinpath(f"{canonical}.yaml").read_text("utf-8"))
    return Preset(
        name=canonical,
        repo=str(data["repo"]),
        config=dict(data["config"]),
        tokenizer=TokenizerFacts(**data["tokenizer"]),
    )


def read_preset(name: str) -> ModelGeometry:
    """The geometry of a built-in preset (case-insensitive name; unknown -> did-you-mean)."""
    preset = load_preset(name)
    return geometry_from_dict(
        preset.config, name=preset.name, tokenizer=preset.tokenizer, where=f"preset {preset.name}"
    )
