"""The kvd plugin module (entry point `run_teacher` in group `kvd`)."""

from __future__ import annotations

from kvd.hookspecs import Register, hookimpl
from kvd_run_teacher.source import KvdRunSource


@hookimpl
def register_models(register: Register) -> None:
    register("kvd_run", KvdRunSource)
