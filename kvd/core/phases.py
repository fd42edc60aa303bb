"""Named phases of a training step, for profilers: `with phase("teacher/forward"): ...` marks a
range `kvd/teacher/forward` that torch.profiler attributes time to (Nsight Systems too, inside
torch.autograd.profiler.emit_nvtx()); benchmarks/phases.py prints the step's breakdown by them.
Without a profiler running, a range costs about a microsecond.

The phases of one step, nested as they run:

    step/batch        the student batch (tokenised texts)
    step/teachers     teacher/tokenize, teacher/forward, teacher/unrotate, teacher/align
                      (token alignment, layer plan, vocabulary map); or the cache's read
    step/student      student/forward, loss/logits (the row-wise CE and logit KD group),
                      loss/NAME (other losses; a fused KV loss holds project and fuse)
    step/backward
    step/clip         the gradients' norm and clipping
    step/guard        the NaN guard's host read (with several ranks: their all-reduce)
    step/optimizer    update, weight check, zero_grad
    step/log          the step record's one read from the device
"""

from __future__ import annotations

from torch.profiler import record_function

PREFIX = "kvd/"


def phase(name: str) -> record_function:
    """A profiler range named `kvd/<name>` (a context manager)."""
    return record_function(PREFIX + name)
