"""`kvd eval`: the texts scored, the cloze task, the measurement of one model, and
lm-evaluation-harness through it."""
