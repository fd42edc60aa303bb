"""The offline teacher cache: the parameter-free teacher work of every step, on disk.

`kvd cache-teachers SPEC` runs the teachers once over the batches a run will see and stores
each step's targets (aligned K/V of the mapped layers, masks, aligned logits and per-sequence
CE where a loss or fusion reads them) as one safetensors file per step. A run whose spec
matches the cache's fingerprint reads targets from it instead of running the teachers, and gets
the same losses. A manifest, written last, makes a cache complete.

Logits are stored compactly where that is exact: a teacher whose logits are its output head
applied to its last hidden states (checked on the first batch, kvd.modeling.head) has those hidden
states [B, Tt, d] and its token alignment stored instead of aligned logits [B, Ts, V], and its
head once in `heads.safetensors`; a cached step applies head and alignment. For SmolLM2 that is
576 values a token instead of 49152. Logits mapped onto the student's vocabulary
(alignment.vocab) are stored as their top k (kvd.align.vocab.TopK), with the mask of where
they are valid.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kvd.align.vocab import TopK
from kvd.core.diff import dotted_differences
from kvd.core.errors import KvdError
from kvd.core.types import TokenAlignment
from kvd.modeling.head import OutputHead
from kvd.step.targets import TeacherTargets

FORMAT = 2
MANIFEST = "manifest.json"
HEADS = "heads.safetensors"


def _step_file(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}.safetensors"


def pack(targets: dict[str, TeacherTargets], micro: int) -> dict[str, torch.Tensor]:
    """Targets of one micro-batch as flat named tensors (`micro/teacher/k/layer`, ...)."""
    out = {}
    for tid, t in targets.items():
        base = f"{micro}/{tid}"
        out[f"{base}/mask"] = t.mask
        for j, k in t.keys.items():
            out[f"{base}/k/{j}"] = k
            out[f"{base}/v/{j}"] = t.values[j]
        if t.top_k is not None:
            out[f"{base}/topk_values"] = t.top_k.values
            out[f"{base}/topk_index"] = t.top_k.index
            out[f"{base}/topk_size"] = torch.tensor(t.top_k.size)
        elif t.logits is not None:
            out[f"{base}/logits"] = t.logits
        if t.logit_mask is not None:
            out[f"{base}/logit_mask"] = t.logit_mask
        if t.hidden is not None and t.alignment is not None:
            out[f"{base}/hidden"] = t.hidden
            out[f"{base}/align_index"] = t.alignment.index
            out[f"{base}/align_weight"] = t.alignment.weight
        if t.ce is not None:
            out[f"{base}/ce"] = t.ce
    return {name: x.detach().contiguous().cpu() for name, x in out.items()}


def unpack(
    tensors: dict[str, torch.Tensor],
    micro: int,
    device: torch.device,
    heads: dict[str, OutputHead],
) -> dict[str, TeacherTargets]:
    """The inverse of `pack` for one micro-batch; stored hidden states become aligned logits
    through the teacher's head."""
    found: dict[str, dict[str, Any]] = {}
    for name, x in tensors.items():
        m, tid, *rest = name.split("/")
        if int(m) != micro:
            continue
        entry = found.setdefault(tid, {"k": {}, "v": {}})
        x = x.to(device)
        if rest[0] in ("k", "v"):
            entry[rest[0]][int(rest[1])] = x
        else:
            entry[rest[0]] = x
    out = {}
    for tid, e in found.items():
        t = TeacherTargets(
            e["k"], e["v"], e["mask"], e.get("logits"), e.get("ce"), logit_mask=e.get("logit_mask")
        )
        if "topk_values" in e:
            top = TopK(e["topk_values"], e["topk_index"], int(e["topk_size"]))
            t = replace(t, top_k=top)
        if "hidden" in e:
            alignment = TokenAlignment(e["align_index"], e["align_weight"], e["mask"])
            t = replace(t, hidden=e["hidden"], alignment=alignment, head=heads[tid])
        out[tid] = t
    return out


class TeacherCache:
    """A cache directory: `step-NNNNNNNN.safetensors` per step and `manifest.json` (last)."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self._heads: dict[str, OutputHead] | None = None

    @property
    def steps(self) -> int:
        return int(self.manifest["steps"])

    @property
    def plans(self) -> dict[str, list[list[list[float]]]]:
        """Each teacher's layer plan sources, as stored (CKA plans need no recomputation)."""
        return dict(self.manifest["plans"])

    @staticmethod
    def open(root: Path, fingerprint: dict[str, Any]) -> TeacherCache | None:
        """The complete cache at `root`, None when there is none; an incomplete one or one built
        for another spec is an error naming what differs."""
        path = root / MANIFEST
        if not path.exists():
            if root.exists() and any(root.glob("step-*.safetensors")):
                raise KvdError(
                    f"training.teacher_cache {root}: incomplete (no manifest; was the build "
                    "interrupted?)",
                    hint="rebuild it with `kvd cache-teachers SPEC` into an empty folder",
                )
            return None
        manifest = json.loads(path.read_text())
        diff = dotted_differences(manifest.get("fingerprint"), fingerprint)
        if diff:
            raise KvdError(
                f"training.teacher_cache {root}: built for a different run; differs in "
                + ", ".join(diff),
                hint="rebuild it with `kvd cache-teachers SPEC`, or point training.teacher_cache "
                "elsewhere",
            )
        return TeacherCache(root, manifest)

    def get(self, step: int, micro: int, device: torch.device) -> dict[str, TeacherTargets]:
        if step >= self.steps:
            raise KvdError(
                f"training.teacher_cache {self.root}: covers {self.steps} steps, the run is at "
                f"step {step + 1}",
                hint="rebuild the cache with the run's training.max_steps",
            )
        return unpack(load_file(_step_file(self.root, step)), micro, device, self.heads(device))

    def heads(self, device: torch.device) -> dict[str, OutputHead]:
        """The output heads of teachers whose logits are stored as hidden states (loaded once)."""
        if self._heads is None:
            caps = self.manifest.get("heads", {})
            tensors = load_file(self.root / HEADS) if caps else {}
            self._heads = {
                tid: OutputHead.from_tensors(tensors, tid, c["softcap"], device)
                for tid, c in caps.items()
            }
        return self._heads


def ensure_empty(root: Path) -> None:
    """A cache is only ever written into a new or empty folder."""
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise KvdError(
            f"training.teacher_cache {root}: not an empty folder; kvd never overwrites a cache",
            hint="delete it or choose another folder",
        )


class CacheWriter:
    """Writes a cache step by step; `finish` writes the manifest that completes it.

    Files are written on a background thread, so writing one step overlaps computing the next
    (the aligned logits of a step can be 100 MB); at most PENDING steps wait in memory. An error
    of the writer is raised by the next `put` or by `finish`."""

    PENDING = 2

    def __init__(self, root: Path, fingerprint: dict[str, Any]) -> None:
        ensure_empty(root)
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.fingerprint = fingerprint
        self.bytes = 0
        self._queue: queue.Queue[tuple[int, dict[str, torch.Tensor]] | None] = queue.Queue(
            maxsize=self.PENDING
        )
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write_all, name="kvd-cache", daemon=True)
        self._thread.start()

    def put(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        self._raise()
        self._queue.put((step, tensors))

    def _write_all(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain: the main thread raises it
            step, tensors = item
            try:
                final = _step_file(self.root, step)
                tmp = final.with_suffix(".tmp")
                save_file(tensors, tmp)
                os.replace(tmp, final)
                self.bytes += final.stat().st_size
            except BaseException as exc:
                self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def finish(
        self,
        steps: int,
        plans: dict[str, list[list[list[float]]]],
        heads: dict[str, OutputHead],
    ) -> TeacherCache:
        """Wait for the step files, write the heads of `heads` (teachers whose logits are
        stored as hidden states), then the manifest."""
        self._queue.put(None)
        self._thread.join()
        self._raise()
        if heads:
            tensors = {k: x.cpu() for tid, h in heads.items() for k, x in h.tensors(tid).items()}
            save_file(tensors, self.root / HEADS)
        manifest = {
            "format": FORMAT,
            "steps": steps,
            "plans": plans,
            "heads": {tid: {"softcap": h.softcap} for tid, h in heads.items()},
            "fingerprint": self.fingerprint,
        }
        tmp = self.root / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, self.root / MANIFEST)
        return TeacherCache(self.root, manifest)
