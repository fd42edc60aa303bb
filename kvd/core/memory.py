"""Peak memory of this process: CUDA's allocated bytes, or the resident set on the CPU.

On Linux the CPU figures come from /proc/self/status (VmRSS now, VmHWM the peak), not from
getrusage: its ru_maxrss also holds the peak of the process this one was started from (a
`kvd ab` that built a 6.9 GB teacher cache before it started a run reported 6.9 GB for a run
that peaked at 1.9 GB) and cannot be reset. Elsewhere ru_maxrss is all there is: the peak then
covers the whole process, whatever was reset.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


def reset_peak(device: torch.device) -> float:
    """Start a new peak measurement (CUDA's peak statistics, or on Linux the resident set's
    high-water mark) and return the memory in use now (MiB; without /proc, the peak so far)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    if not _STATUS.is_file():
        return _rusage_peak_mb()
    Path("/proc/self/clear_refs").write_text("5")  # "5": VmHWM back to VmRSS
    return _status_mb("VmRSS")


def read_peak_mb(device: torch.device) -> float:
    """Peak since `reset_peak`, or since this process started (MiB): CUDA allocated bytes on
    `device`, else this process's own resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _status_mb("VmHWM") if _STATUS.is_file() else _rusage_peak_mb()


def _status_mb(key: str) -> float:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {key} in {_STATUS}")


def _rusage_peak_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, else kB
