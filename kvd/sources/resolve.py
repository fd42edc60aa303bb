"""A model named on the command line: a preset, an HF dir, a .gguf file or `pypi:PACKAGE`."""

from __future__ import annotations

from pathlib import Path

from kvd.errors import KvdError
from kvd.models import ModelSource
from kvd.presets import find_preset, unknown_preset_hint
from kvd.sources.gguf_file import GgufSource
from kvd.sources.hf import HfSource
from kvd.sources.paths import local_path
from kvd.sources.preset import PresetSource
from kvd.sources.pypi import PypiSource


def resolve_model(text: str, base_dir: Path = Path(".")) -> ModelSource:
    """`pypi:NAME` (`pypi:PART1,PART2,...` for a GGUF split over distributions), `preset:NAME`,
    a path (.gguf file or HF dir) or a preset name.

    An existing path wins over a preset of the same name; anything else is a KvdError that names
    the input and suggests close preset names.
    """
    kind, sep, rest = text.partition(":")
    if sep and kind == "pypi" and "," in rest:
        parts = rest.split(",")
        return PypiSource(PypiSource.Config(parts=parts), base_dir=base_dir)
    if sep and kind == "pypi":
        return PypiSource(PypiSource.Config(package=rest), base_dir=base_dir)
    if sep and kind == "preset":
        return PresetSource(PresetSource.Config(preset=_preset(rest)), base_dir=base_dir)
    path = local_path(text, base_dir)
    if path.is_dir():
        return HfSource(HfSource.Config(path=text), base_dir=base_dir)
    if path.suffix == ".gguf" or path.is_file():
        return GgufSource(GgufSource.Config(path=text), base_dir=base_dir)
    if find_preset(text) is not None:
        return PresetSource(PresetSource.Config(preset=text), base_dir=base_dir)
    raise KvdError(
        f"{text}: no such file or directory, and not a preset name",
        hint=unknown_preset_hint(text) + " Or give an HF model dir, a .gguf file or pypi:PACKAGE.",
    )


def _preset(name: str) -> str:
    canonical = find_preset(name)
    if canonical is None:
        raise KvdError(f"unknown preset {name!r}", hint=unknown_preset_hint(name))
    return canonical
