"""kvd.core.memory: a process's CPU peak is its own and can be reset (Linux)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kvd.core.memory import read_peak_mb, reset_peak

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").is_file(), reason="the resident set is read from /proc (Linux)"
)
CPU = torch.device("cpu")
BIG_MB = 600


def test_a_child_of_a_big_process_reports_its_own_peak() -> None:
    # `kvd ab` builds a teacher cache in its own process, then starts each run as a child:
    # getrusage's ru_maxrss in the child starts at the parent's peak, the child's own is lower
    parent = textwrap.dedent(
        f"""
        import subprocess, sys
        held = b"x" * ({BIG_MB} << 20)  # touched pages: resident
        child = (
            "import resource, torch; from kvd.core.memory import read_peak_mb; "
            "print(read_peak_mb(torch.device('cpu')), "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
        )
        print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                             check=True).stdout)
        """
    )
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    own, rusage = map(float, out.stdout.split())
    assert rusage >= BIG_MB  # the inherited figure the old measurement reported
    assert own < BIG_MB - 100  # importing torch and kvd takes far less
    assert own > 10


def test_reset_forgets_the_peak_of_memory_since_freed() -> None:
    held = b"x" * (BIG_MB << 20)
    before = read_peak_mb(CPU)
    del held
    now = reset_peak(CPU)
    assert before >= BIG_MB
    assert now < before - BIG_MB / 2  # freed pages left the resident set
    after = read_peak_mb(CPU)
    assert now <= after < before - BIG_MB / 2
