"""Document-level train/validation split by content hash, and its manifest.

A document goes to validation iff the number read from the sha256 of its normalised text is below
`val_fraction`, so the split needs no seed, does not depend on order, and identical texts (after
normalisation) always land on the same side: duplicates cannot leak from train into validation.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from kvd.core.errors import KvdError
from kvd.data.base import Document


class DataLeakageError(KvdError):
    """The same content hash is on both sides of a split."""


def normalize(text: str) -> str:
    """NFC, whitespace runs collapsed to one space, ends stripped: what the hash sees."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def content_hash(text: str) -> str:
    """sha256 hex digest of the normalised text."""
    return hashlib.sha256(normalize(text).encode("utf-8")).hexdigest()


def goes_to_validation(digest: str, val_fraction: float) -> bool:
    """True iff the first 64 bits of the hash, read as a fraction of 2**64, are below the cut."""
    return int(digest[:16], 16) / 2**64 < val_fraction


class SplitManifest(BaseModel):
    """The sorted, distinct content hashes on each side of a split, and a digest of both lists."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    val_fraction: float
    train: tuple[str, ...]
    validation: tuple[str, ...]
    digest: str

    @classmethod
    def of(
        cls, train: Iterable[str], validation: Iterable[str], val_fraction: float
    ) -> SplitManifest:
        sides = tuple(sorted(set(train))), tuple(sorted(set(validation)))
        return cls(
            val_fraction=val_fraction, train=sides[0], validation=sides[1], digest=_digest(*sides)
        )


def _digest(train: tuple[str, ...], validation: tuple[str, ...]) -> str:
    payload = json.dumps({"train": train, "validation": validation}, separators=(",", ":"))
    return hashlib.sha256(payload.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class Split:
    """Documents on each side (in input order) and the manifest that records the split."""

    train: list[Document]
    validation: list[Document]
    manifest: SplitManifest


def split_documents(documents: Iterable[Document], val_fraction: float) -> Split:
    """Split documents by content hash (see the module docstring)."""
    sides: dict[bool, list[tuple[str, Document]]] = {False: [], True: []}
    for doc in documents:
        digest = content_hash(doc.text)
        sides[goes_to_validation(digest, val_fraction)].append((digest, doc))
    manifest = SplitManifest.of(
        (h for h, _ in sides[False]), (h for h, _ in sides[True]), val_fraction
    )
    return Split([d for _, d in sides[False]], [d for _, d in sides[True]], manifest)


def check_leakage(manifest: SplitManifest) -> None:
    """Raise DataLeakageError if any content hash is on both sides."""
    shared = sorted(set(manifest.train) & set(manifest.validation))
    if shared:
        raise DataLeakageError(
            f"{len(shared)} document(s) are in both train and validation "
            f"(content hashes {', '.join(h[:12] for h in shared[:3])}"
            f"{', ...' if len(shared) > 3 else ''})",
            hint="split by content hash with kvd.data.split_documents",
        )


def write_manifest(manifest: SplitManifest, path: Path) -> None:
    """Write the manifest as indented JSON."""
    path.write_text(manifest.model_dump_json(indent=1) + "\n", encoding="utf-8")


def read_manifest(path: Path) -> SplitManifest:
    """Read a manifest; a missing, malformed or edited file (digest mismatch) is a KvdError."""
    try:
        manifest = SplitManifest.model_validate_json(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise KvdError(f"{path}: cannot read the split manifest ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise KvdError(f"{path}: not a split manifest (not UTF-8 text)") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise KvdError(f"{path}: not a split manifest ({where}: {first['msg']})") from None
    if manifest.digest != _digest(manifest.train, manifest.validation):
        raise KvdError(f"{path}: the split manifest's digest does not match its hashes (edited?)")
    return manifest
