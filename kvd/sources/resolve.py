"""A model named on the command line: a preset, an HF dir, a .gguf file or `pypi:PACKAGE`,
resolved to the registered model source of that kind."""

from __future__ import annotations

from pathlib import Path

from kvd.core.component import config_class
from kvd.core.errors import KvdError
from kvd.core.manager import component
from kvd.sources.paths import local_path
from kvd.spec.models import ModelSource
from kvd.spec.presets import find_preset, unknown_preset_hint


def _source(name: str, base_dir: Path, **options: object) -> ModelSource:
    """The registered model source `name` (kvd.plugins.models) with these Config options."""
    cls = component("models", name, ModelSource)
    return cls(config_class(cls)(**options), base_dir=base_dir)


def resolve_model(text: str, base_dir: Path = Path(".")) -> ModelSource:
    """`pypi:NAME` (`pypi:PART1,PART2,...` for a GGUF split over distributions), `preset:NAME`,
    a path (.gguf file or HF dir) or a preset name.

    An existing path wins over a preset of the same name; anything else is a KvdError that names
    the input and suggests close preset names.
    """
    kind, sep, rest = text.partition(":")
    if sep and kind == "pypi" and "," in rest:
        return _source("pypi", base_dir, parts=rest.split(","))
    if sep and kind == "pypi":
        return _source("pypi", base_dir, package=rest)
    if sep and kind == "preset":
        return _source("preset", base_dir, preset=_preset(rest))
    path = local_path(text, base_dir)
    if path.is_dir():
        return _source("hf", base_dir, path=text)
    if path.suffix == ".gguf" or path.is_file():
        return _source("gguf", base_dir, path=text)
    if find_preset(text) is not None:
        return _source("preset", base_dir, preset=text)
    raise KvdError(
        f"{text}: no such file or directory, and not a preset name",
        hint=unknown_preset_hint(text) + " Or give an HF model dir, a .gguf file or pypi:PACKAGE.",
    )


def _preset(name: str) -> str:
    canonical = find_preset(name)
    if canonical is None:
        raise KvdError(f"unknown preset {name!r}", hint=unknown_preset_hint(name))
    return canonical
