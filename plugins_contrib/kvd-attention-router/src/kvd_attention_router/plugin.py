"""The kvd plugin module (entry point `attention_router` in group `kvd`)."""

from __future__ import annotations

from kvd.hookspecs import Register, hookimpl
from kvd_attention_router.fusion import TaskAttentionFusion


@hookimpl
def register_fusions(register: Register) -> None:
    register("task_attention", TaskAttentionFusion)
