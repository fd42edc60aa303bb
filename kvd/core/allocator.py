"""Use mimalloc instead of glibc's malloc for CPU runs (measured, see benchmarks/).

With glibc a training step spends much of its time in the kernel returning large tensor buffers
to the OS and faulting them back; a caching allocator that keeps its pages avoids it (a SmolLM2 +
Gemma-3 step 3.1 s -> 1.7 s on 2 cores). The library ships on PyPI (`cmeel-mimalloc`); the `kvd`
command re-executes itself once with it preloaded. KVD_ALLOCATOR=system keeps glibc.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

import kvd

ENV = "KVD_ALLOCATOR"
DIST = "cmeel-mimalloc"


def mimalloc_library() -> Path | None:
    """Path of libmimalloc.so from the installed distribution, or None."""
    try:
        dist = metadata.distribution(DIST)
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if file.name == "libmimalloc.so":
            path = Path(str(dist.locate_file(file)))
            return path if path.exists() else None
    return None


def preload_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with mimalloc added to LD_PRELOAD when it is available, wanted and on Linux."""
    if env.get(ENV, "mimalloc") == "system" or not sys.platform.startswith("linux"):
        return env
    lib = mimalloc_library()
    preload = env.get("LD_PRELOAD", "")
    if lib is None or str(lib) in preload.split(":"):
        return env
    # mimalloc returns freed pages to the OS after 10 ms by default; a step then faults its
    # [B, T, vocab] buffers back in every time (steps of 1.7-3.2 s instead of a steady 1.66 s,
    # SmolLM2 + Gemma-3, measured). A training process lives at its peak anyway: keep the pages.
    return dict(
        env,
        LD_PRELOAD=f"{lib}:{preload}" if preload else str(lib),
        MIMALLOC_PURGE_DELAY=env.get("MIMALLOC_PURGE_DELAY", "-1"),
    )


def reexec_with_mimalloc(argv: list[str], module: str = "kvd.cli") -> None:
    """Replace this process by `python -m MODULE ARGV` with mimalloc preloaded, when
    `preload_env` adds it; otherwise return and change nothing.

    The new process imports the kvd this one runs, wherever it is started: `-P` keeps the
    working directory off the import path (a folder named kvd/ there, as in the parent of a
    clone, would shadow it) and the folder holding this kvd goes first on PYTHONPATH."""
    env = preload_env(dict(os.environ))
    if env.get("LD_PRELOAD") != os.environ.get("LD_PRELOAD"):
        root = str(Path(kvd.__file__).resolve().parent.parent)
        old = env.get("PYTHONPATH")
        env["PYTHONPATH"] = f"{root}{os.pathsep}{old}" if old else root
        os.execve(sys.executable, [sys.executable, "-P", "-m", module, *argv], env)
