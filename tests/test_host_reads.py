"""A kvd step reads values from the device only where it must: on a GPU each read of a device
scalar (.item(), float(), bool(), .tolist(), nonzero()) waits for the queue to drain. Counted
on CPU with the dispatch mode of benchmarks/gpu_smoke.py (on CUDA that script also asks
torch.cuda.set_sync_debug_mode); a new read in kvd's hot path fails here until it is either
removed or added below with its reason."""

from __future__ import annotations

from collections import Counter

from benchmarks.gpu_smoke import ScalarReads
from benchmarks.harness import build_trainer, kvd_step
from benchmarks.setups import smoke

STEPS = 2
ALLOWED = {
    # (reads per step at most, why)
    "kvd/run/train.py:train_step": (2, "the NaN guard before the update; the host mask's tokens"),
    "kvd/run/train.py:_check_weights": (1, "a non-finite weight stops the run before a save"),
    "kvd/core/types.py:keeps_rows": (None, "reads the alignment's host copy (TokenAlignment.to)"),
    "kvd/losses/rowwise.py:softmax_lse": (None, "CPU only; elsewhere lse_by_rows reads nothing"),
}


def test_a_step_reads_device_values_only_where_it_must() -> None:
    trainer = build_trainer(smoke())
    kvd_step(trainer)  # warm-up: optimizer state, cached maps
    reads = ScalarReads(trainer.rt.device)
    with reads:
        for _ in range(STEPS):
            kvd_step(trainer)
    ours = Counter({k: n for k, n in reads.reads.items() if k.startswith("kvd/")})
    assert set(ours) <= set(ALLOWED), f"new reads in kvd's step: {set(ours) - set(ALLOWED)}"
    for where, (most, why) in ALLOWED.items():
        if most is not None:
            assert ours[where] <= most * STEPS, f"{where}: {ours[where]} reads ({why})"
    assert ours["kvd/run/train.py:train_step"] >= STEPS  # the counter sees the guard's read
