"""Built-in model sources, registered through the same hook as a third-party plugin's."""

from __future__ import annotations

from kvd.core.hookspecs import Register, hookimpl
from kvd.sources.gguf_file import GgufSource
from kvd.sources.hf import HfSource
from kvd.sources.preset import PresetSource
from kvd.sources.pypi import PypiSource
from kvd.sources.tiny import TinySource


@hookimpl
def register_models(register: Register) -> None:
    register("hf", HfSource)
    register("gguf", GgufSource)
    register("pypi", PypiSource)
    register("preset", PresetSource)
    register("tiny", TinySource)
