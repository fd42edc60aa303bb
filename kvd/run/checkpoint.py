"""Atomic checkpoints: written under a temporary name, fsynced, a sha256 manifest written last,
then renamed into place. A checkpoint without a valid manifest is never loaded.

Two formats for the tensors, one for everything else (state.json, rng.pt, manifest.json):
whole tensors (model.safetensors, optimizer.pt; one process or ddp) or, for a sharded (fsdp)
run, torch.distributed.checkpoint's files (`.metadata` and one `__R_0.distcp` per rank), which
any number of processes can load (kvd.run.parallel.load_sharded)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kvd.core.errors import KvdError

MANIFEST = "manifest.json"
PREFIX = "step-"
DCP_METADATA = ".metadata"
"""The index file torch.distributed.checkpoint writes beside the ranks' `__R_0.distcp` files."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint on disk and the step it was taken after."""

    path: Path
    step: int


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """Every RNG this process uses: python, numpy, torch CPU and CUDA."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def staging(root: Path, step: int) -> tuple[Path, Path]:
    """(temporary folder, final path) of the step-`step` checkpoint: the temporary one created
    empty. Rank 0 calls it; a sharded save's ranks write into the temporary folder after it."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp, final


def write_whole(folder: Path, model: dict[str, torch.Tensor], optimizer: dict[str, Any]) -> None:
    """Whole-tensor weights (safetensors, tied tensors once) and optimizer state (torch)."""
    tensors, aliases = _untie(model)
    save_file(tensors, folder / "model.safetensors", metadata={"aliases": json.dumps(aliases)})
    torch.save(optimizer, folder / "optimizer.pt")


def finish(
    tmp: Path, final: Path, *, state: dict[str, Any], rng: list[dict[str, Any]]
) -> CheckpointInfo:
    """Complete a checkpoint whose tensors are in `tmp`: every rank's RNG states (torch,
    loadable with weights_only=True), state.json, then manifest.json with the sha256 of every
    file, and the rename into place."""
    step = int(final.name[len(PREFIX) :])
    torch.save([_rng_to_saveable(r) for r in rng], tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    files = sorted(p.name for p in tmp.iterdir())
    for name in files:
        _fsync(tmp / name)
    manifest = {"step": step, "files": {name: _sha256(tmp / name) for name in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _fsync(tmp / MANIFEST)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync(final.parent)
    return CheckpointInfo(final, step)


def _untie(model: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state dict with each tied tensor (one storage under several names, e.g. a student's
    input and output embeddings) stored once: (tensors to write, alias name -> stored name).
    Stored tensors are compact CPU copies (safetensors writes no shared storage)."""
    stored: dict[tuple[Any, ...], str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, x in model.items():
        key = (x.device, x.untyped_storage().data_ptr(), x.storage_offset(), x.shape, x.stride())
        if key in stored:
            aliases[name] = stored[key]
            continue
        stored[key] = name
        tensors[name] = x.detach().cpu().clone()
    return tensors, aliases


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The inverse of `_untie` on a written file: every name, aliases sharing their tensor."""
    tensors = load_file(path)
    with safe_open(str(path), "pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    return tensors | {alias: tensors[name] for alias, name in aliases.items()}


def _rng_to_saveable(rng: dict[str, Any]) -> dict[str, Any]:
    """numpy's state tuple holds an ndarray; store its parts as tensors for weights_only loads."""
    name, keys, pos, has_gauss, cached = rng["numpy"]
    out = dict(rng)
    out["numpy"] = [name, torch.from_numpy(np.asarray(keys).copy()), pos, has_gauss, cached]
    out["python"] = [rng["python"][0], list(rng["python"][1]), rng["python"][2]]
    return out


def _rng_from_saved(saved: dict[str, Any]) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = saved["numpy"]
    out = dict(saved)
    out["numpy"] = (name, keys.numpy(), pos, has_gauss, cached)
    version, internal, gauss = saved["python"]
    out["python"] = (version, tuple(internal), gauss)
    return out


def verify(path: Path) -> str | None:
    """None when `path` is a complete checkpoint, else why it is not."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        return "no manifest (incomplete write)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return "unreadable manifest"
    for name, digest in files.items():
        if not (path / name).exists():
            return f"missing {name}"
        if _sha256(path / name) != digest:
            return f"{name} does not match its sha256"
    return None


def list_checkpoints(root: Path) -> tuple[list[CheckpointInfo], list[tuple[Path, str]]]:
    """Valid checkpoints by step, and the invalid ones with the reason."""
    valid, invalid = [], []
    if not root.exists():
        return [], []
    for path in sorted(root.glob(f"{PREFIX}*")):
        problem = verify(path)
        if problem is None:
            valid.append(CheckpointInfo(path, int(path.name[len(PREFIX) :])))
        else:
            invalid.append((path, problem))
    return valid, invalid


def _safe_load(path: Path) -> Any:
    """torch.load restricted to tensors and plain containers; anything else is refused."""
    try:
        return torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KvdError(
            f"{path}: refused to load: not a plain tensor file ({first})",
            hint="kvd loads checkpoints with weights_only=True and never runs pickled code; "
            "use a checkpoint written by kvd",
        ) from None


def is_sharded_checkpoint(path: Path) -> bool:
    """A checkpoint in torch.distributed.checkpoint's format (one file per rank, `.metadata`),
    as sharded (fsdp) runs write; else whole tensors (`write_whole`)."""
    return (path / DCP_METADATA).is_file()


def load_run_state(path: Path) -> dict[str, Any]:
    """The run state (state.json) and per-rank RNG states of a verified checkpoint."""
    return {
        "rng": [_rng_from_saved(r) for r in _safe_load(path / "rng.pt")],
        "state": json.loads((path / "state.json").read_text()),
    }


def written_by(path: Path) -> tuple[int, int | None]:
    """(processes, per-process batch size) of the job that wrote the checkpoint at `path`;
    the batch size is None in checkpoints from before kvd recorded it."""
    state = json.loads((path / "state.json").read_text())
    return int(state.get("world", 1)), state.get("batch_size")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Weights, optimizer state, run state and per-rank RNG of a verified whole-tensor
    checkpoint."""
    return {
        "model": _load_weights(path / "model.safetensors"),
        "optimizer": _safe_load(path / "optimizer.pt"),
        **load_run_state(path),
    }


def prune(root: Path, keep: int, protect: set[Path]) -> None:
    """Delete all but the newest `keep` valid checkpoints, never one in `protect` (the best)."""
    valid, _ = list_checkpoints(root)
    for info in valid[:-keep]:
        if info.path not in protect:
            shutil.rmtree(info.path)
