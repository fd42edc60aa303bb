"""kvd-attention-router: the `task_attention` fusion, a task-conditional attention router."""

from kvd_attention_router.fusion import TaskAttentionFusion

__all__ = ["TaskAttentionFusion"]
