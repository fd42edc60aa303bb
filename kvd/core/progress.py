"""Training progress: a rich bar on a terminal, plain lines in batch logs (SLURM, CI)."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


class Progress:
    """`start(total, done)`, `update(step, record)`, `stop()`; silent when not enabled."""

    def __init__(self, *, enabled: bool = True, every: int = 10, label: str = "train") -> None:
        self.enabled = enabled
        self.every = every
        self.label = label
        self.console = Console(stderr=True, highlight=False)
        self.live = enabled and sys.stderr.isatty()
        self._bar: RichProgress | None = None
        self._task: Any = None
        self._started = 0.0

    def start(self, total: int, done: int) -> None:
        self._started = time.perf_counter()
        if self.live:
            self._bar = RichProgress(
                TextColumn(f"[bold]{self.label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=total, completed=done, info="")

    def shows(self, step: int) -> bool:
        """Whether `update(step, ...)` puts the record's numbers on screen."""
        return self.enabled and (self._bar is not None or step % self.every == 0)

    def update(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        info = ""
        if "loss/total" in record:
            info = f"loss {record['loss/total']:.4f}"
        if "cache_mb" in record:
            info = f"{record['cache_mb']:.0f} MB written"
        if "val/bits_per_byte" in record:
            info += f"  val bpb {record['val/bits_per_byte']:.4f}"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif step % self.every == 0 or "val/bits_per_byte" in record:
            elapsed = time.perf_counter() - self._started
            tps = record.get("tokens_per_s", 0.0)
            print(
                f"[{self.label}] step {step}  {info}  {tps:.0f} tok/s  {elapsed:.0f}s", flush=True
            )

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
