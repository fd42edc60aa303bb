"""`kvd train SPEC`: run (or resume) a distillation; optionally a CE-only baseline beside it."""

from __future__ import annotations

import copy
from pathlib import Path

import typer
from rich.table import Table

from kvd.cli.errors import stdout
from kvd.cli.options import set_option
from kvd.run.train import TrainResult, train
from kvd.spec.runspec import apply_overrides, load_spec, parse_spec, read_yaml


def _results_table(results: list[tuple[str, TrainResult]]) -> Table:
    table = Table(title="validation (same held-out text, bits per byte compare across tokenizers)")
    for col in ("run", "steps", "bits/byte", "perplexity", "next-token acc", "dir"):
        table.add_column(col)
    for label, r in results:
        v = r.validation
        table.add_row(
            label,
            str(r.steps),
            f"{v.bits_per_byte:.4f}",
            f"{v.perplexity:.1f}",
            f"{v.accuracy:.3f}",
            str(r.run_dir),
        )
    return table


def train_command(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="A YAML run spec."),
    overrides: list[str] = set_option(),
    resume: bool = typer.Option(
        False, "--resume", help="Resume the run in output.dir from its newest valid checkpoint."
    ),
    resume_from: Path | None = typer.Option(
        None, "--resume-from", help="Resume from this checkpoint directory."
    ),
    baseline: bool = typer.Option(
        False,
        "--baseline",
        help="Also train a CE-only student the same way (same data, steps, seed) and compare.",
    ),
) -> None:
    """Distil the spec's teachers into its student; works under torchrun as well."""
    spec = load_spec(spec_path, overrides)
    data = apply_overrides(read_yaml(spec_path), overrides)
    base_dir = spec_path.parent
    resume_arg: bool | Path = resume_from if resume_from is not None else resume
    result = train(spec, data, base_dir=base_dir, resume=resume_arg)
    results = [(spec.name, result)]
    if baseline:
        twin = copy.deepcopy(data)
        twin["name"] = f"{spec.name}-ce-baseline"
        twin["losses"] = [{"name": "ce"}]
        twin.get("training", {}).pop("stages", None)
        twin.setdefault("output", {})["dir"] = str(spec.output_dir()) + "-ce-baseline"
        twin_spec = parse_spec(twin, source=f"{spec_path} (CE-only baseline)", base_dir=base_dir)
        results.append(("CE-only baseline", train(twin_spec, twin, base_dir=base_dir)))
    stdout().print(_results_table(results))
    if baseline:
        kd, ce = results[0][1].validation.bits_per_byte, results[1][1].validation.bits_per_byte
        change = 100 * (kd - ce) / ce
        stdout().print(
            f"distilled vs CE-only: {change:+.1f}% bits per byte "
            f"({'better' if change < 0 else 'not better'}); one seed, no significance test"
        )
        stdout().print(
            "next: `kvd eval RUN_DIR` scores a run (cloze accuracy, speed), `kvd compare A B` "
            "compares runs, `kvd ab EXPERIMENT.yaml` repeats runs over seeds with significance "
            "tests (experiments/multi_teacher_round11_confirm.yaml: the quickstart's recipe "
            "against SmolLM2 alone); see docs/index.md"
        )


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
