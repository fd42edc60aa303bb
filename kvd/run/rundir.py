"""The run directory: created once, never overwritten; resolved spec and environment inside."""

from __future__ import annotations

import fcntl
import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

import kvd
from kvd.core.errors import KvdError
from kvd.core.manager import get_plugins
from kvd.run.trackers import Tracker

RUN_MARKERS = ("spec.yaml", "metrics.jsonl", "checkpoints")
LOCK = ".kvd.lock"
"""The run dir's lock file (see RunLock); not part of the run."""


class RunLock:
    """An exclusive advisory lock (flock) on a run dir, held by the one process that writes it
    (rank 0) for as long as it runs. The kernel releases it when the process ends, however it
    ends, so the lock of a dead process never blocks a resume; the file keeps the last holder's
    pid and host for the message a second process gets."""

    def __init__(self, fd: int, run_dir: Path, created: Path | None, new_file: bool) -> None:
        self.fd, self.run_dir, self.created, self.new_file = fd, run_dir, created, new_file

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Lock `run_dir` (made when missing), or a KvdError naming the holder."""
        top = run_dir
        while not top.parent.exists() and top.parent != top:
            top = top.parent
        created = None if run_dir.exists() else top
        new_file = not (run_dir / LOCK).exists()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise KvdError(
                f"output.dir {run_dir}: cannot be written ({exc.strerror})",
                hint="pick a writable folder with --set output.dir=...",
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise KvdError(
                f"output.dir {run_dir}: in use by {holder} (one process writes a run at a time)",
                hint="wait until it ends (a requeued job: until the old one has drained), or "
                "pick another dir with --set output.dir=...",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        return cls(fd, run_dir, created, new_file)

    def release(self, *, keep: bool) -> None:
        """Unlock; unless `keep`, remove the lock file when acquire() made it and the folders
        acquire() made when nothing else was written into them (bad input leaves no trace)."""
        os.close(self.fd)
        if keep:
            return
        if self.new_file:
            (self.run_dir / LOCK).unlink(missing_ok=True)
        if self.created is None:
            return
        path = self.run_dir
        while True:
            try:
                path.rmdir()
            except OSError:  # not empty
                return
            if path == self.created:
                return
            path = path.parent


def holds_run(path: Path) -> bool:
    """Whether `path` already holds a kvd run."""
    return any((path / marker).exists() for marker in RUN_MARKERS)


def check_new_run_dir(path: Path) -> None:
    """Refuse an output dir that holds a run or any other file (checked before models load)."""
    if path.exists() and not path.is_dir():
        raise KvdError(f"output.dir {path}: exists and is not a directory")
    if path.exists() and holds_run(path):
        raise KvdError(
            f"output.dir {path}: already holds a run",
            hint="resume it with --resume, or pick another dir with --set output.dir=...",
        )
    if path.exists() and any(p.name != LOCK for p in path.iterdir()):
        raise KvdError(
            f"output.dir {path}: is not empty; kvd never writes into a folder with other files",
            hint="pick an empty or new folder with --set output.dir=...",
        )


def create_run_dir(path: Path) -> Path:
    """Make a new, empty run directory; refuse one that holds a run or any other file."""
    check_new_run_dir(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_spec(path: Path, spec_data: dict[str, Any], resolved: dict[str, Any]) -> None:
    """The spec as given (with --set overrides applied) and resolved with every default."""
    (path / "spec.yaml").write_text(yaml.safe_dump(spec_data, sort_keys=False), encoding="utf-8")
    (path / "spec.resolved.yaml").write_text(
        yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8"
    )


def environment() -> dict[str, Any]:
    """Versions, devices and plugins of this process (no machine paths)."""
    import transformers

    plugins = get_plugins()
    return {
        "kvd": kvd.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        or ["cpu"],
        "threads": torch.get_num_threads(),
        "cpu": {"model": cpu_model(), "capability": torch.backends.cpu.get_cpu_capability()},
        "plugins": {name: f"{i.package} {i.version}" for name, i in sorted(plugins.info.items())},
        "code": code_version(),
    }


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows. Runs on another
    CPU kind compute the same math with other kernels: floating point differs at the last bits,
    so a bit-level reproduction holds only on the same kind (with the same capability)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def code_version() -> dict[str, Any] | None:
    """The git commit kvd's source is loaded from and whether tracked files differ from it
    ({"commit": sha, "dirty": bool}); None when kvd does not run from a git checkout."""
    root = Path(kvd.__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return None
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def write_environment(path: Path) -> None:
    (path / "environment.json").write_text(json.dumps(environment(), indent=2), encoding="utf-8")


class MetricsLog:
    """Append-only JSON lines, flushed after every record so a killed run keeps its history;
    a record's numbers also go to each of `trackers` (kvd.run.trackers) when it has a step."""

    def __init__(self, path: Path, trackers: Sequence[Tracker] = ()) -> None:
        self.path = path
        self._file = path.open("a", encoding="utf-8")
        self.trackers = list(trackers)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        step = record.get("step")
        if self.trackers and isinstance(step, int):
            numbers = {
                key: float(value)
                for key, value in record.items()
                if isinstance(value, int | float) and not isinstance(value, bool) and key != "step"
            }
            for tracker in self.trackers:
                tracker.log(numbers, step)

    def close(self) -> None:
        self._file.close()
        for tracker in self.trackers:
            tracker.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every complete record of a metrics.jsonl file. A last line without its newline is a
    record still being written (a live run) or torn by a kill, and is left out."""
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of steps up to `step` (a resumed run logs the later ones again)."""
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if int(r.get("step", 0)) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)
