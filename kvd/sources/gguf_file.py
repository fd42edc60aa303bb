"""`source: gguf`: a .gguf file, converted once into a safetensors model dir in kvd's cache.

transformers dequantises a GGUF in 20-50 s; the converted copy loads in well under 2 s. The
copy lives in `<cache>/gguf/<sha256 of the file>/` and is written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kvd.core.component import ComponentConfig
from kvd.core.errors import KvdError
from kvd.core.files import atomic_path, exclusive
from kvd.sources.cache import cache_dir, sha256_file
from kvd.sources.hf import load_tokenizer_dir
from kvd.sources.paths import local_path
from kvd.spec.geometry import ModelGeometry
from kvd.spec.gguf_header import read_gguf
from kvd.spec.models import LoadedModel, ModelSource

MARKER = "kvd-gguf.json"
SHARD_SIZE = "256MB"


class GgufSource(ModelSource):
    """A GGUF file (llama.cpp format); geometry from its header, weights dequantised to float."""

    class Config(ComponentConfig):
        path: str
        """A .gguf file, relative to the spec file's folder; converted once into kvd's cache."""

    config: Config

    @property
    def path(self) -> Path:
        return local_path(self.config.path, self.base_dir)

    def describe(self) -> str:
        return str(self.path)

    def geometry(self) -> ModelGeometry:
        return read_gguf(self.path)

    def load(self, *, device: torch.device, dtype: torch.dtype) -> LoadedModel:
        return load_converted(self.path, device=device, dtype=dtype)

    def tokenizer(self) -> Any:
        return load_tokenizer_dir(converted_dir(self.path))

    def prepare(self) -> None:
        converted_dir(self.path)


def load_converted(path: Path, *, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """The GGUF's model from its converted copy (converting first if needed)."""
    from transformers import AutoModelForCausalLM

    geometry = read_gguf(path)
    model_dir = converted_dir(path)
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, local_files_only=True
    )
    return LoadedModel(model.to(device).eval(), load_tokenizer_dir(model_dir), geometry)


def converted_dir(path: Path) -> Path:
    """`<cache>/gguf/<sha256>/`: the GGUF as config.json + safetensors + tokenizer files."""
    read_gguf(path)  # a missing, foreign or truncated file fails here, naming it
    digest = sha256_file(path)
    target = cache_dir() / "gguf" / digest
    if (target / MARKER).exists():
        return target
    with exclusive(target, f"converting {path.name}"):
        if (target / MARKER).exists():  # converted while this process waited
            return target
        with atomic_path(target, directory=True) as work:
            write_converted(path, work)
            gguf_tokenizer(path).save_pretrained(str(work))
            marker = {"source": str(path), "sha256": digest}
            (work / MARKER).write_text(json.dumps(marker, indent=2))
    return target


def write_converted(path: Path, out: Path) -> None:
    """Write the GGUF's model into `out` as config.json + float32 safetensors shards.

    The weights are transformers' GGUF dequantisation (the same as
    `from_pretrained(dir, gguf_file=...)`, which needs `accelerate`), held once: the model is a
    meta-device skeleton that takes the dequantised tensors as its parameters, and shards of
    `SHARD_SIZE` bound the copy that writing makes. Qwen2.5-Coder-0.5B (2.5 GB in float32)
    peaks at 3.9 GB of RSS this way against 6.4 GB with a materialised model (measured).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(
        str(path), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
    )["tensors"]
    result = model.load_state_dict(
        {k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False, assign=True
    )
    del tensors  # the model's parameters are these tensors now
    tied = {"lm_head.weight"} if config.get_text_config().tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise KvdError(
            f"{path}: the GGUF's tensors do not fit a {config.model_type} model "
            f"(missing {sorted(set(result.missing_keys) - tied)[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]})"
        )
    model.tie_weights()
    model.save_pretrained(str(out), max_shard_size=SHARD_SIZE)


def gguf_tokenizer(path: Path) -> Any:
    """The tokenizer stored in the GGUF's metadata, as a fast tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
