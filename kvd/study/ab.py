"""`kvd ab EXPERIMENT`: a rigorous comparison grid from one base spec, then its report.

Every group trains with equal compute (the same steps, batch size, gradient accumulation and
data, hence the same tokens) on one content-hash split, verified from each run's split.json, for
every seed. Each run trains in a process of its own (`kvd train BASE --set ...`), so its peak
memory is its own. Runs go to RUNS/GROUP/seedN; a finished run (results.json) is never rerun, an
unfinished one is resumed, so the same command continues an interrupted experiment (SIGTERM or
SIGUSR1 to `kvd ab` reaches the run in training, which saves a checkpoint; exit 143). Afterwards
each run's student is evaluated on its whole validation split (`kvd eval`, with cloze accuracy),
optionally the teachers too, and the `kvd compare` report against the CE-only baseline is
written.

Offline teacher caches (`teacher_cache: true`) hold the teacher work of one seed's batches, so
they are per seed: only runs with the same seed, teachers and alignment share one. A cache is
built where at least two runs share it; other runs run their teachers live.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from rich.console import Console

from kvd.core.component import config_class
from kvd.core.diff import dotted_differences
from kvd.core.errors import KvdError, SpecError
from kvd.core.names import checked_name
from kvd.core.runtime import Preempted
from kvd.data import read_manifest
from kvd.eval.eval_texts import Part
from kvd.run.resume import HARMLESS_CHANGES
from kvd.run.rundir import code_version, holds_run
from kvd.spec.runspec import RunSpec, apply_overrides, parse_spec, pydantic_problems, read_yaml
from kvd.step.curriculum import logit_teachers, reads_kv, uses_teachers
from kvd.study.ab_groups import builtin_groups, expand_names, setting

BASELINE = "ce_only"


class HarnessTasks(BaseModel):
    """lm-evaluation-harness tasks every run's student is scored on (RUN/eval/lm_eval.json)."""

    model_config = ConfigDict(extra="forbid")
    tasks: list[str] = Field(min_length=1)
    include: str | None = None
    """A folder of local task YAML files, relative to the experiment file's folder."""
    limit: int | None = Field(None, ge=1)
    """Score the first N documents of each task (default: all)."""

    def include_dir(self, experiment: Path) -> Path | None:
        return experiment.parent / self.include if self.include else None

    def score(self, run_dir: Path, p: ExperimentPlan, device: str) -> None:
        """The harness's scores of the run's student, to RUN/eval/lm_eval.json."""
        from kvd.eval.harness import run_harness

        run_harness(
            str(run_dir),
            self.tasks,
            include=self.include_dir(p.path),
            limit=self.limit,
            base_dir=p.base_path.parent,
            device=device,
        )


class CustomGroup(BaseModel):
    """A group of your own: `--set` overrides of the base spec, applied after those of the
    built-in group `from` (e.g. `single_smollm2`) when it names one."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    set: list[str] = Field(min_length=1)
    from_: str | None = Field(None, alias="from")


class Experiment(BaseModel):
    """An experiment file. Paths: `base` and `report` relative to the experiment file's folder,
    `runs` relative to the working directory (like output.dir)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str = ""
    base: str
    seeds: list[int] = Field(min_length=1)
    steps: int | None = Field(None, ge=1)
    runs: str | None = None
    report: str | None = None
    set: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=lambda: [BASELINE, "single", "multi"])
    controls: list[str] = Field(default_factory=list)
    ablations: list[str] = Field(default_factory=list)
    custom: dict[str, CustomGroup] = Field(default_factory=dict)
    references: list[str] = Field(default_factory=list)
    """Groups to compare every other group against too, besides the CE-only baseline (e.g. the
    best single teacher): one more report each, in REPORT/vs_GROUP/."""
    tolerance: float = Field(0.0, ge=0)
    """A same-seed rerun (`kvd ab EXPERIMENT --rerun GROUP:SEED`) must reproduce a run's metrics
    within this absolute or relative difference (0: bit for bit)."""
    teacher_cache: bool = False
    evaluate: bool = True
    evaluate_teachers: bool = False
    eval_max_texts: int | None = Field(None, ge=2)
    eval_part: Part = "all"
    """Score the students on all of their validation texts, or on the `tune` or `test` half of
    its documents (RUN/eval/validation-PART.json): choose settings on one experiment with
    `tune`, then report the chosen groups with `test` (the same runs are reused)."""
    lm_eval: HarnessTasks | None = None

    @field_validator("name")
    @classmethod
    def _name_is_a_name(cls, name: str) -> str:
        return checked_name(name) if name else name

    @field_validator("custom")
    @classmethod
    def _group_names_are_names(cls, custom: dict[str, CustomGroup]) -> dict[str, CustomGroup]:
        for name in custom:  # each becomes a folder: RUNS/GROUP/seedN
            checked_name(name)
        return custom

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be distinct")
        return seeds


@dataclass
class PlannedRun:
    """One run: `kvd train BASE --set O1 --set O2 ...` with `overrides`, as data and spec."""

    group: str
    seed: int
    overrides: list[str]
    data: dict[str, Any]
    spec: RunSpec

    @property
    def dir(self) -> Path:
        return self.spec.output_dir()


@dataclass
class ExperimentPlan:
    experiment: Experiment
    path: Path
    base_path: Path
    groups: dict[str, list[str]]
    runs: list[PlannedRun]
    runs_dir: Path
    report_dir: Path

    @property
    def eval_name(self) -> str:
        """The name of each run's evaluation the report reads (RUN/eval/NAME.json)."""
        part = self.experiment.eval_part
        return "validation" if part == "all" else f"validation-{part}"


def read_experiment(path: Path) -> Experiment:
    try:
        exp = Experiment.model_validate(read_yaml(path))
    except ValidationError as exc:
        raise SpecError(str(path), pydantic_problems(exc, model=Experiment)) from None
    return exp.model_copy(update={"name": exp.name or path.stem})


def group_overrides(exp: Experiment, base: dict[str, Any], spec: RunSpec) -> dict[str, list[str]]:
    """Group name -> its overrides, the CE-only baseline first; unknown names are an error."""
    table = builtin_groups(spec)
    names = expand_names([BASELINE, *exp.groups, *exp.controls, *exp.ablations], spec)
    unknown = [n for n in names if n not in table and n not in exp.custom]
    if unknown:
        known = sorted(table) + sorted(exp.custom)
        raise KvdError(
            f"unknown group(s) {', '.join(map(repr, unknown))}",
            hint=f"known here: {', '.join(known)}, single, leave_one_out; or define it under "
            "custom: with its --set overrides",
        )
    missing = [r for r in exp.references if r not in [*names, *exp.custom]]
    if missing:
        raise KvdError(
            f"references {', '.join(map(repr, missing))} name no group of the experiment",
            hint="list the group under groups (or custom) too",
        )
    clash = sorted(set(exp.custom) & set(table))
    if clash:
        raise KvdError(f"custom group(s) {', '.join(clash)} reuse built-in names")
    for name, group in exp.custom.items():
        if group.from_ is not None and group.from_ not in table:
            raise KvdError(
                f"custom.{name}.from: {group.from_!r} is no built-in group of this base spec",
                hint=f"known here: {', '.join(sorted(table))}",
            )
    names += [n for n in exp.custom if n not in names]

    def overrides(name: str) -> list[str]:
        if name not in exp.custom:
            return table[name](base, spec)
        group = exp.custom[name]
        start = table[group.from_](base, spec) if group.from_ is not None else []
        return [*start, *group.set]

    return {n: overrides(n) for n in names}


def compute_budget(spec: RunSpec) -> dict[str, Any]:
    """What must be equal across groups: steps, batch, accumulation, token cap and data."""
    t = spec.training
    return {
        "training.max_steps": t.max_steps,
        "training.max_tokens": t.max_tokens,
        "training.batch_size": t.batch_size,
        "training.grad_accum": t.grad_accum,
        "data": spec.data.fingerprint(),
    }


def plan(path: Path, *, min_seeds: int = 3) -> ExperimentPlan:
    """Read the experiment, build and validate every run's spec, check equal compute."""
    exp = read_experiment(path)
    if len(exp.seeds) < min_seeds:
        raise KvdError(
            f"{path}: {len(exp.seeds)} seed(s); a comparison needs at least {min_seeds}",
            hint="list more seeds (or lower --min-seeds, e.g. for a smoke test)",
        )
    base_path = Path(os.path.normpath(path.parent / exp.base))
    common = list(exp.set) + ([f"training.max_steps={exp.steps}"] if exp.steps else [])
    raw = read_yaml(base_path)
    base = apply_overrides(copy.deepcopy(raw), common)
    base_spec = parse_spec(base, source=str(base_path), base_dir=base_path.parent)
    groups = group_overrides(exp, base, base_spec)
    # a seed varies the student's random init too (tiny and preset students have their own seed)
    seeds_init = "seed" in config_class(base_spec.student.component).model_fields
    runs_dir = Path(exp.runs or f"runs/ab/{exp.name}")
    runs = []
    for group, overrides in groups.items():
        for seed in exp.seeds:
            per_run = [
                setting("name", f"{exp.name}-{group}-seed{seed}"),
                setting("seed", seed),
                *([setting("student.seed", seed)] if seeds_init else []),
                setting("output.dir", str(runs_dir / group / f"seed{seed}")),
            ]
            full = [*common, *overrides, *per_run]
            data = apply_overrides(copy.deepcopy(raw), full)
            spec = _parse(data, path, group, seed, base_path)
            runs.append(PlannedRun(group, seed, full, data, spec))
    reference = compute_budget(runs[0].spec)
    for run in runs:
        budget = compute_budget(run.spec)
        differ = [k for k in reference if budget[k] != reference[k]]
        if differ:
            raise KvdError(
                f"group {run.group!r} changes {', '.join(differ)}: every group must train with "
                "equal compute on the same data",
                hint="remove those overrides from the group",
            )
    if exp.teacher_cache:
        share_caches(runs, runs_dir / "cache", path, base_path)
    report_dir = path.parent / (exp.report or exp.name)
    return ExperimentPlan(exp, path, base_path, groups, runs, runs_dir, report_dir)


def _parse(data: dict[str, Any], path: Path, group: str, seed: int, base_path: Path) -> RunSpec:
    source = f"{path}: group {group}, seed {seed}"
    return parse_spec(data, source=source, base_dir=base_path.parent)


def cache_key(spec: RunSpec) -> str | None:
    """Runs with the same key can share an offline teacher cache; None for a run that reads no
    teacher. The cache's own fingerprint is checked again when a run opens it."""
    if not uses_teachers(spec):
        return None
    stages = spec.training.stages
    fusions = [spec.fusion] + [st.fusion for st in stages if st.fusion is not None]
    stage_losses = [spec.losses] + [st.losses or spec.losses for st in stages]
    payload = {
        "teachers": [t.model_dump(mode="json", exclude={"weight"}) for t in spec.teachers],
        "student": spec.student.model_dump(mode="json"),
        "data": spec.data.model_dump(mode="json"),
        "alignment": spec.alignment.fingerprint(),
        "seed": spec.seed,
        "steps": [spec.training.max_steps, spec.training.batch_size, spec.training.grad_accum],
        "stages": [[st.start_step, st.teachers] for st in stages],
        "logits": logit_teachers(spec),
        "kv": [any(reads_kv(r.component) for r in ls) for ls in stage_losses],
        "teacher_ce": any(f.component.needs_teacher_ce for f in fusions),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def share_caches(runs: list[PlannedRun], root: Path, path: Path, base_path: Path) -> None:
    """Point the runs that share a cache key with another run at one cache folder."""
    keys = [cache_key(r.spec) for r in runs]
    for run, key in zip(runs, keys, strict=True):
        if key is not None and keys.count(key) > 1:
            extra = setting("training.teacher_cache", str(root / f"seed{run.seed}-{key}"))
            run.overrides.append(extra)
            run.data = apply_overrides(run.data, [extra])
            run.spec = _parse(run.data, path, run.group, run.seed, base_path)


def plan_lines(p: ExperimentPlan) -> list[str]:
    """The plan in words: per group the `kvd train` command of its first seed, then every run
    dir and whether it is new, partial or finished."""
    lines = []
    for name in p.groups:
        run = next(r for r in p.runs if r.group == name)
        args = " ".join(f"--set {shlex.quote(o)}" for o in run.overrides)
        lines.append(f"{name}: kvd train {shlex.quote(str(p.base_path))} {args}")
    for run in p.runs:
        done = (run.dir / "results.json").is_file()
        state = "finished" if done else "partial" if holds_run(run.dir) else "new"
        lines.append(f"  {run.dir} [{state}]")
    lines.append(f"{len(p.runs)} runs; report: {p.report_dir}")
    return lines


# --- running ---------------------------------------------------------------------------------


def check_same_spec(run: PlannedRun) -> None:
    """A run dir must hold the run the experiment plans (not one of an older experiment file);
    changes that leave the result alone (kvd.run.resume.HARMLESS_CHANGES: e.g. a teacher cache the
    run now shares with a group added later) are allowed."""
    saved = yaml.safe_load((run.dir / "spec.yaml").read_text(encoding="utf-8")) or {}
    changed = dotted_differences(saved, run.data)
    differ = sorted(k for k in changed if not k.startswith(HARMLESS_CHANGES))
    if differ:
        raise KvdError(
            f"{run.dir}: holds a run of another spec (differs in {', '.join(differ)}); the "
            "experiment file changed since it ran",
            hint="delete that run dir, or set another runs: folder in the experiment",
        )


def ensure_cache(run: PlannedRun, base_dir: Path, console: Console) -> None:
    """Build the run's offline teacher cache unless a complete one is there (a partial one, left
    by an interrupted build, is built again)."""
    from kvd.core.progress import Progress
    from kvd.core.runtime import setup_runtime
    from kvd.run.assemble import build_teacher_cache
    from kvd.step.teacher_cache import MANIFEST

    assert run.spec.training.teacher_cache is not None
    root = Path(run.spec.training.teacher_cache)
    if (root / MANIFEST).is_file():
        return
    if root.exists():
        shutil.rmtree(root)
    console.print(f"  building the teacher cache {root}", markup=False)
    runtime = setup_runtime(run.spec.training.device)
    build_teacher_cache(run.spec, runtime, base_dir, root, Progress(label="cache"))


def check_split(run: PlannedRun, reference: tuple[Path, str] | None) -> tuple[Path, str]:
    """The run's split digest, which must equal the first run's."""
    digest = read_manifest(run.dir / "split.json").digest
    if reference is not None and digest != reference[1]:
        raise KvdError(
            f"{run.dir}: its data split (split.json digest {digest[:12]}) differs from that of "
            f"{reference[0]} ({reference[1][:12]}); the groups must share one split",
            hint="the data changed between runs: rerun the affected groups on the same data",
        )
    return reference or (run.dir, digest)


def execute(p: ExperimentPlan, console: Console) -> Path:
    """Train (or resume) every planned run, evaluate, and write the report; returns report.md."""
    from kvd.eval.harness import DEFAULT_NAME as HARNESS_NAME
    from kvd.eval.harness import check_tasks, task_manager
    from kvd.eval.measure import EvalOptions, run_eval

    base_dir = p.base_path.parent
    options = EvalOptions(
        max_texts=p.experiment.eval_max_texts,
        base_dir=base_dir,
        device=p.runs[0].spec.training.device,
        part=p.experiment.eval_part,
    )
    evaluated = f"{p.eval_name}.json"
    harness = p.experiment.lm_eval
    if harness is not None:  # unknown task names stop the experiment before any training
        where = f"{p.path}: lm_eval.tasks:"
        check_tasks(harness.tasks, task_manager(harness.include_dir(p.path)), where)
    reference: tuple[Path, str] | None = None
    for i, run in enumerate(p.runs, 1):
        label = f"[{i}/{len(p.runs)}] {run.group} seed {run.seed} ({run.dir})"
        started = holds_run(run.dir)
        if started:
            check_same_spec(run)
        if (run.dir / "results.json").is_file():
            console.print(f"{label}: finished, not rerun", markup=False)
        else:
            console.print(f"{label}: {'resuming' if started else 'training'}", markup=False)
            if run.spec.training.teacher_cache:
                ensure_cache(run, base_dir, console)
            train_apart(p.base_path, run.overrides)
        reference = check_split(run, reference)
        if p.experiment.evaluate and not (run.dir / "eval" / evaluated).is_file():
            console.print(f"{label}: evaluating", markup=False)
            run_eval(str(run.dir), options=options)
        if harness is not None and not (run.dir / "eval" / f"{HARNESS_NAME}.json").is_file():
            console.print(f"{label}: lm-evaluation-harness", markup=False)
            harness.score(run.dir, p, options.device)
    teacher_files: list[Path] = []
    if p.experiment.evaluate_teachers:
        first = p.runs[0]
        for t in first.spec.teachers:
            out = p.runs_dir / "teachers" / f"{t.id}{p.eval_name.removeprefix('validation')}.json"
            if not out.is_file():
                console.print(f"evaluating teacher {t.id}", markup=False)
                run_eval(str(first.dir), teacher=t.id, out=out, options=options)
            teacher_files.append(out)
    return report(p, teacher_files, console)


def report(p: ExperimentPlan, teacher_files: list[Path], console: Console) -> Path:
    """The `kvd compare` report of every group against the CE-only baseline."""
    from kvd.study.compare import compare_groups
    from kvd.study.report import show, write_report
    from kvd.study.runs import Group, load_eval, load_run

    groups = [
        Group(name, [load_run(r.dir, p.eval_name) for r in p.runs if r.group == name])
        for name in p.groups
    ]
    groups += [Group(f"teacher {f.stem}", [load_eval(f)]) for f in teacher_files]
    result = compare_groups(groups)
    show(console, result)
    facts = describe(p)
    path = write_report(
        groups,
        result,
        p.report_dir,
        title=f"kvd ab: {p.experiment.name}",
        intro=intro(facts),
        extra={"experiment": facts},
    )
    console.print(f"report: {path}", markup=False)
    for ref in p.experiment.references:
        ordered = sorted(groups, key=lambda g: g.label != ref)  # the reference first
        other = write_report(
            ordered,
            compare_groups(ordered),
            p.report_dir / f"vs_{ref}",
            title=f"kvd ab: {p.experiment.name}, against {ref}",
            intro=intro(facts),
            extra={"experiment": facts},
        )
        console.print(f"report against {ref}: {other}", markup=False)
    return path


def _wait_forwarding(proc: subprocess.Popen[bytes], signals: tuple[signal.Signals, ...]) -> int:
    """Wait for `proc`, passing on each of `signals` this process receives meanwhile (a
    scheduler's SIGTERM reaches the training run, which saves a checkpoint and exits 143)."""
    previous = {s: signal.signal(s, lambda signum, _: proc.send_signal(signum)) for s in signals}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def train_apart(base: Path, overrides: list[str]) -> None:
    """`kvd train BASE --set O1 --set O2 ...` (the command `--dry-run` prints) in a process of
    its own, so that each run's peak memory is its own, whatever ran before it; it resumes an
    unfinished run by itself."""
    argv = [sys.executable, "-m", "kvd.cli", "train", str(base)]
    for override in overrides:
        argv += ["--set", override]
    code = _wait_forwarding(subprocess.Popen(argv), (signal.SIGTERM, signal.SIGUSR1))
    if code == Preempted.exit_code:
        raise Preempted(
            f"kvd train {base} was stopped by a signal and saved a checkpoint",
            hint="run the same kvd ab command again: the run resumes, finished runs are kept",
        )
    if code != 0:
        raise KvdError(
            f"kvd train {base} ({len(overrides)} overrides) exited with {code}; its messages "
            "are above",
            hint="fix the cause, then run the same kvd ab command again: finished runs are kept",
        )


def rerun(p: ExperimentPlan, which: str, console: Console) -> list[str]:
    """Train and evaluate run GROUP:SEED again in a new dir under RUNS/reruns/ and return where
    its metrics differ from the finished run's beyond the experiment's tolerance."""
    from kvd.eval.harness import DEFAULT_NAME as HARNESS_NAME
    from kvd.eval.measure import EvalOptions, run_eval
    from kvd.study.compare import differences
    from kvd.study.runs import load_run

    group, _, seed = which.partition(":")
    found = [r for r in p.runs if r.group == group and str(r.seed) == seed]
    if not found:
        known = ", ".join(f"{r.group}:{r.seed}" for r in p.runs)
        raise KvdError(f"--rerun {which}: no such run in {p.path}", hint=f"one of {known}")
    run = found[0]
    if not (run.dir / "results.json").is_file():
        raise KvdError(f"--rerun {which}: {run.dir} has not finished", hint=f"kvd ab {p.path}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = p.runs_dir / "reruns" / f"{group}-seed{seed}-{stamp}"
    console.print(f"rerunning {which} into {target}", markup=False)
    train_apart(p.base_path, [*run.overrides, setting("output.dir", str(target))])
    if (run.dir / "eval" / f"{p.eval_name}.json").is_file():
        options = EvalOptions(
            max_texts=p.experiment.eval_max_texts,
            base_dir=p.base_path.parent,
            device=run.spec.training.device,
            part=p.experiment.eval_part,
        )
        run_eval(str(target), options=options)
    harness = p.experiment.lm_eval
    if harness is not None and (run.dir / "eval" / f"{HARNESS_NAME}.json").is_file():
        harness.score(target, p, run.spec.training.device)
    was, now = (
        machine_label(json.loads((d / "environment.json").read_text(encoding="utf-8")))
        for d in (run.dir, target)
    )
    if was != now:
        console.print(
            f"note: {which} trained on {was}, this rerun on {now}: another kind of machine "
            "rounds differently, so the tolerance holds only on the run's own kind",
            markup=False,
        )
    return differences(
        [load_run(run.dir, p.eval_name), load_run(target, p.eval_name)], p.experiment.tolerance
    )


def describe(p: ExperimentPlan) -> dict[str, Any]:
    """The experiment's facts for the report: base, seeds, compute, groups, overrides, and the
    tokens each run trained on (per group, in seed order)."""
    first = p.runs[0].spec
    tokens: dict[str, list[int]] = {}
    for run in p.runs:
        results = json.loads((run.dir / "results.json").read_text(encoding="utf-8"))
        tokens.setdefault(run.group, []).append(int(results["tokens"]))
    return {
        "name": p.experiment.name,
        "file": str(p.path),
        "base": str(p.base_path),
        "seeds": p.experiment.seeds,
        "steps": first.training.max_steps,
        "batch_size": first.training.batch_size,
        "grad_accum": first.training.grad_accum,
        "seq_len": first.data.seq_len,
        "eval_part": p.experiment.eval_part,
        "split_digest": read_manifest(p.runs[0].dir / "split.json").digest,
        "groups": p.groups,
        "tokens": tokens,
        "equal_tokens": len({tuple(t) for t in tokens.values()}) == 1,
        "runs_dir": str(p.runs_dir),
        "code": runs_by(p, lambda env: version_label(env.get("code"))),
        "machines": runs_by(p, machine_label),
        "report_code": code_version(),
    }


def runs_by(p: ExperimentPlan, label: Callable[[dict[str, Any]], str]) -> dict[str, list[str]]:
    """The runs' dirs by `label` of their environment.json (code version, machine)."""
    out: dict[str, list[str]] = {}
    for run in p.runs:
        env = json.loads((run.dir / "environment.json").read_text(encoding="utf-8"))
        out.setdefault(label(env), []).append(str(run.dir))
    return out


def version_label(code: dict[str, Any] | None) -> str:
    """`<commit>` or `<commit> (dirty)`, `unknown` when not recorded (not a git checkout)."""
    if code is None:
        return "unknown"
    return f"{code['commit'][:12]}{' (dirty)' if code['dirty'] else ''}"


def machine_label(env: dict[str, Any]) -> str:
    """The CPU a run trained on, `MODEL (CAPABILITY)`, plus its GPUs if any; `unknown` for
    runs from before kvd recorded it."""
    cpu = env.get("cpu")
    if cpu is None:
        return "unknown"
    label = f"{cpu['model']} ({cpu['capability']})"
    gpus = [d for d in env.get("devices", []) if d != "cpu"]
    return f"{label} + {', '.join(gpus)}" if gpus else label


def code_line(facts: dict[str, Any]) -> str:
    """Which code the runs trained on and which wrote the report (evaluation included)."""
    versions = facts["code"]
    report = version_label(facts["report_code"])
    if len(versions) == 1:
        (label,) = versions
        return f"Code: every run trained on kvd `{label}`; this report was written by `{report}`."
    shown = "; ".join(f"`{v}`: {len(dirs)} runs" for v, dirs in versions.items())
    return (
        f"Code: **the runs trained on {len(versions)} versions of kvd** ({shown}; the run "
        f"dirs are listed in compare.json); this report was written by `{report}`."
    )


def machine_line(facts: dict[str, Any]) -> str:
    """Which machines the runs trained on: a same-seed rerun reproduces bit for bit only on
    the same kind (other kernels round differently)."""
    machines = facts["machines"]
    if list(machines) == ["unknown"]:
        return "Machine: not recorded (the runs trained before kvd recorded its CPU)."
    if len(machines) == 1:
        (label,) = machines
        return (
            f"Machine: every run trained on `{label}`; a same-seed rerun reproduces these "
            "numbers within the experiment's tolerance on that kind of machine only."
        )
    shown = "; ".join(f"`{m}`: {len(dirs)} runs" for m, dirs in machines.items())
    return (
        f"Machine: **the runs trained on more than one kind of machine, or some did not record "
        f"it** ({shown}): a same-seed rerun reproduces a run bit for bit only on its own kind."
    )


def scored_line(part: str) -> str:
    """Which held-out texts the metrics below are measured on."""
    if part == "all":
        return "Scored on the runs' validation texts (eval/validation.json)."
    use = "choose settings here" if part == "tune" else "report here, choose elsewhere"
    return (
        f"Scored on the **{part}** half of the validation documents only "
        f"(eval/validation-{part}.json; {use})."
    )


def intro(facts: dict[str, Any]) -> str:
    """The report's opening: the experiment, its compute, and each group's overrides."""
    same = (
        "the same for every group"
        if facts["equal_tokens"]
        else "**not the same for every group** (the runs trained on different token counts)"
    )
    lines = [
        f"Experiment `{facts['file']}` on base spec `{facts['base']}`: seeds "
        f"{', '.join(map(str, facts['seeds']))}; every group trains {facts['steps']} steps of "
        f"{facts['batch_size']} x {facts['grad_accum']} windows of at most {facts['seq_len']} "
        f"student tokens on one split (split.json digest `{facts['split_digest'][:16]}`, checked "
        f"for every run); tokens per run, seed by seed, are {same}. "
        f"Runs: `{facts['runs_dir']}/GROUP/seedN`.",
        "",
        scored_line(facts.get("eval_part", "all")),
        "",
        code_line(facts),
        "",
        machine_line(facts),
        "",
        "| group | `--set` overrides of the base spec | tokens per run (by seed) |",
        "|---|---|---|",
    ]
    for name, overrides in facts["groups"].items():
        shown = "<br>".join(f"`{o}`" for o in overrides) or "(none: the base spec)"
        shown = shown.replace("|", r"\|")
        counts = ", ".join(map(str, facts["tokens"].get(name, [])))
        lines.append(f"| {name} | {shown} | {counts} |")
    return "\n".join(lines)
