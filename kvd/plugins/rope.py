"""Built-in RoPE aligners, registered through the same hook as a third-party plugin's."""

from __future__ import annotations

from kvd.align.rope import KeepRotated, Unrotate
from kvd.core.hookspecs import Register, hookimpl


@hookimpl
def register_aligners(register: Register) -> None:
    register("unrotate", Unrotate)
    register("none", KeepRotated)
