"""PNG plots of `kvd compare` (matplotlib's Agg canvas): training loss curves, the KV loss with
validation bits per byte on a second y-axis, and routing weights by layer and by task."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kvd.core.manager import registry
from kvd.step.curriculum import reads_kv
from kvd.study.runs import Group


def new_figure(width: float, height: float) -> Figure:
    """A figure drawn by the Agg canvas (no pyplot, no global backend)."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def file_label(label: str) -> str:
    return re.sub(r"[^\w.-]+", "_", label).strip("_") or "group"


Curve = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def curve(group: Group, pick: Callable[[dict[str, Any]], float | None]) -> Curve | None:
    """Steps where every run has a value (`pick(record)` not None), and the mean, min and max
    of the values over the runs."""
    series = [
        {r["step"]: v for r in m.records if (v := pick(r)) is not None} for m in group.members
    ]
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    if not steps:
        return None
    table = np.array([[s[step] for step in steps] for s in series], dtype=float)
    return np.array(steps), table.mean(0), table.min(0), table.max(0)


def field(key: str) -> Callable[[dict[str, Any]], float | None]:
    """Picks `key` from a record (None where it is missing)."""
    return lambda record: record.get(key)


def kv_keys(group: Group) -> list[str]:
    """`loss/<term>` keys of KV loss terms (`kv_mse`, or `kv_mse1` when a name is used twice)."""
    losses = registry("losses")
    keys = {k for m in group.members for r in m.records for k in r if k.count("/") == 1}
    out = []
    for key in sorted(k for k in keys if k.startswith("loss/")):
        name = key.removeprefix("loss/")
        name = name if name in losses else name.rstrip("0123456789")
        if name in losses and reads_kv(losses.get(name)):
            out.append(key)
    return out


def kv_loss(group: Group) -> Curve | None:
    """The summed KV loss terms over steps (mean, min, max over runs)."""
    keys = kv_keys(group)
    if not keys:
        return None
    return curve(group, lambda r: sum(r[k] for k in keys) if all(k in r for k in keys) else None)


def loss_curves(groups: list[Group], path: Path) -> Path:
    """Total training loss, and CE alone (the term every group shares), over steps."""
    fig = new_figure(12, 5)
    for ax, key, title in zip(
        fig.subplots(1, 2),
        ("loss/total", "loss/ce"),
        ("total training loss", "training CE (comparable across groups)"),
        strict=True,
    ):
        for g in groups:
            c = curve(g, field(key))
            if c is not None:
                (line,) = ax.plot(c[0], c[1], label=f"{g.label} (n={len(g.members)})")
                ax.fill_between(c[0], c[2], c[3], color=line.get_color(), alpha=0.2)
        ax.set_title(f"{title}; band: min-max over seeds", fontsize="medium")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("weighted sum of the terms" if key == "loss/total" else "nats per token")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def kv_and_validation(groups: list[Group], path: Path) -> Path:
    """KV loss (solid, left axis) and validation bits per byte (dashed, right axis)."""
    fig = new_figure(8, 5)
    left = fig.subplots()
    right = left.twinx()
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, g in enumerate(groups):
        color = colors[i % len(colors)]
        kv = kv_loss(g)
        if kv is not None:
            left.plot(kv[0], kv[1], color=color, label=f"{g.label} KV loss")
        val = curve(g, field("val/bits_per_byte"))
        if val is not None:
            right.plot(val[0], val[1], "--o", color=color, ms=3, label=f"{g.label} val bits/byte")
    left.set_xlabel("optimizer step")
    left.set_ylabel("KV loss terms, summed (solid; guarded MSE: 1 = the target mean)")
    right.set_ylabel("validation bits per byte (dashed)")
    handles = left.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    left.legend(handles[0] + more[0], handles[1] + more[1], fontsize="small")
    left.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def routing(group: Group, prefix: str) -> tuple[list[str], list[str], np.ndarray] | None:
    """Mean routing weight over steps and runs: row names, teacher ids, [rows, teachers]."""
    pattern = re.compile(rf"^route/{prefix}(.+)/([^/]+)$")
    sums: dict[tuple[str, str], list[float]] = {}
    for m in group.members:
        for r in m.records:
            for key, value in r.items():
                match = pattern.match(key)
                if match:
                    sums.setdefault((match.group(1), match.group(2)), []).append(value)
    if len({k[1] for k in sums}) < 2:
        return None  # nothing is routed with one teacher
    if all(max(v) - min(v) < 1e-6 for v in sums.values()):
        return None  # weights fixed by construction (fixed, mean): the spec already says them
    rows = sorted({k[0] for k in sums}, key=lambda x: (len(x), x))
    teachers = sorted({k[1] for k in sums})
    grid = np.array([[np.mean(sums.get((r, t), [np.nan])) for t in teachers] for r in rows])
    return rows, teachers, grid


def routing_heatmaps(group: Group, path: Path) -> Path | None:
    """Routing weights by student layer and by task, each teacher a column; None when no
    weight varies over steps and seeds."""
    parts = [(t, routing(group, p)) for t, p in (("by layer", "L"), ("by task", "task/"))]
    shown = [(t, r) for t, r in parts if r is not None]
    if not shown:
        return None
    fig = new_figure(5 * len(shown), 4)
    axes = fig.subplots(1, len(shown), squeeze=False)
    for ax, (title, (rows, teachers, grid)) in zip(axes[0], shown, strict=True):
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(teachers)), teachers)
        ax.set_yticks(range(len(rows)), [f"L{r}" if title == "by layer" else r for r in rows])
        for (y, x), v in np.ndenumerate(grid):
            ax.text(x, y, f"{v:.2f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_title(f"{group.label}: routing {title}")
        ax.set_xlabel("teacher")
        ax.set_ylabel("student layer" if title == "by layer" else "task")
        fig.colorbar(image, ax=ax, label="mean routing weight (over steps, positions, seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_plots(groups: list[Group], out: Path) -> list[Path]:
    """Every plot into `out`; returns the files written."""
    written = [
        loss_curves(groups, out / "loss_curves.png"),
        kv_and_validation(groups, out / "kv_loss_and_validation.png"),
    ]
    for g in groups:
        heat = routing_heatmaps(g, out / f"routing_{file_label(g.label)}.png")
        if heat is not None:
            written.append(heat)
    for stale in set(out.glob("routing_*.png")) - set(written):
        stale.unlink()  # a heatmap of an earlier report of this folder
    return written
