"""Typed registries of components by kind, filled by plugin hooks, looked up by name."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from kvd.core.errors import DuplicateComponentError, UnknownComponentError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered component and where it came from."""

    name: str
    obj: T
    plugin: str
    package: str
    version: str

    @property
    def summary(self) -> str:
        """First paragraph of the component's docstring, on one line."""
        doc = (getattr(self.obj, "__doc__", None) or "").strip()
        return " ".join(doc.split("\n\n")[0].split())


class Registry(Generic[T]):
    """Components of one kind (`teachers`, `fusions`, ...) by unique name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def add(self, name: str, obj: T, *, plugin: str, package: str, version: str) -> None:
        """Register `obj` under `name`; a name taken by another plugin is an error naming both."""
        if name in self._entries:
            first = self._entries[name]
            raise DuplicateComponentError(
                f"{self.kind} component {name!r} is registered twice: by plugin {first.plugin!r} "
                f"({first.package} {first.version}) and by plugin {plugin!r} ({package} {version})",
                hint="uninstall one of the two packages, or limit plugins with KVD_LOAD_PLUGINS",
            )
        self._entries[name] = Entry(name, obj, plugin, package, version)

    def entry(self, name: str) -> Entry[T]:
        """The entry for `name`, or an error listing close matches and every known name."""
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownComponentError(self.unknown_message(name)) from None

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)
        msg = f"unknown {self.kind} component {name!r}"
        if close:
            msg += f"; did you mean {' or '.join(repr(c) for c in close)}?"
        else:
            msg += "."
        msg += f" Known: {', '.join(self.names()) or '(none)'}."
        msg += " A component from another package appears once that package is installed"
        msg += " (see `kvd plugins`)."
        return msg

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._entries)
