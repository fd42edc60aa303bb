"""Built-in RoPE aligners, registered through the same hook as a third-party plugin's."""

from __future__ import annotations

from kvd.hookspecs import Register, hookimpl


@hookimpl
def register_aligners(register: Register) -> None:
    del register
