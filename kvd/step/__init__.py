"""The two halves of one distillation step: the curriculum, teacher targets (live or cached,
owned by the teacher side) and the learned student side (`distill`)."""
