"""The named groups of `kvd ab`, each a list of `--set` overrides of the base spec.

Every group is what `kvd train BASE --set ...` would run, so any run of an experiment can be
reproduced by hand. Names (the base spec's teacher ids fill in `<id>`):

- groups: `ce_only` (the base's CE terms only: the baseline), `single_<id>` (that teacher
  alone; `single` = one group per teacher), `multi` (the base spec as it is), `multi_fixed`,
  `multi_mean`, `multi_similarity`, `multi_learnable`, `multi_task_conditional` (that fusion);
- controls: `random_teacher` (every teacher's weights re-initialised at random),
  `shuffled_alignment` (the `shuffled` token aligner: teacher KV at permuted positions);
- ablations: `k_only`, `v_only` (KV losses on one part; K+V is `multi`), `layers_shallow`,
  `layers_middle`, `layers_deep`, `layers_all` (distilled student layers), `tokens_hard`,
  `tokens_soft` (token aligner), `layer_map_uniform`, `layer_map_cka`, `leave_out_<id>` (every
  teacher but one; `leave_one_out` = one group per teacher).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import yaml

from kvd.core.component import config_class
from kvd.core.errors import KvdError
from kvd.spec.runspec import RunSpec

FUSIONS = ("fixed", "mean", "similarity", "learnable", "task_conditional")
LAYER_SELECTIONS = ("shallow", "middle", "deep", "all")
TOKEN_OPTIONS = ("fallback", "max_candidates")

Overrides = Callable[[dict[str, Any], RunSpec], list[str]]
"""(base spec data, parsed base spec) -> the group's `--set` overrides."""


def setting(key: str, value: Any) -> str:
    """One `--set KEY=VALUE` override; the value in YAML flow style on one line."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=2**31 - 1).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def ce_only(base: dict[str, Any], spec: RunSpec) -> list[str]:
    losses = [x for x in base.get("losses", []) if x.get("name") == "ce"] or [{"name": "ce"}]
    out = [setting("losses", losses)]
    if base.get("training", {}).get("stages"):
        out.append(setting("training.stages", []))
    return out


def keep_teachers(base: dict[str, Any], spec: RunSpec, keep: list[str]) -> list[str]:
    """Only the teachers `keep` (ids made explicit), losses and stages restricted to them; a
    loss left with no teacher is dropped."""
    teachers = []
    for raw, ref in zip(base["teachers"], spec.teachers, strict=True):
        if ref.id in keep:
            teachers.append(copy.deepcopy(raw) | {"id": ref.id})

    def restrict(losses: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for loss in losses:
            if loss.get("teachers") is None:
                out.append(loss)
            elif kept := [t for t in loss["teachers"] if t in keep]:
                out.append(loss | {"teachers": kept})
        return out

    out = [setting("teachers", teachers)]
    if "losses" in base:
        out.append(setting("losses", restrict(base["losses"])))
    stages = base.get("training", {}).get("stages")
    if stages:
        fixed = []
        for stage in stages:
            stage = dict(stage)
            if stage.get("teachers") is not None:
                stage["teachers"] = [t for t in stage["teachers"] if t in keep]
            if stage.get("losses") is not None:
                stage["losses"] = restrict(stage["losses"])
            fixed.append(stage)
        out.append(setting("training.stages", fixed))
    return out


def one_kv_part(part: str) -> Overrides:
    def overrides(base: dict[str, Any], spec: RunSpec) -> list[str]:
        kv = [
            i
            for i, ref in enumerate(spec.losses)
            if "parts" in config_class(ref.component).model_fields
        ]
        if not kv:
            raise KvdError(f"group {part}_only: the base spec has no KV loss (kv_mse, ...)")
        if "losses" in base:
            return [setting(f"losses.{i}.parts", part) for i in kv]
        losses = [r.model_dump(mode="json", exclude_defaults=True) for r in spec.losses]
        return [
            setting("losses", [x | {"parts": part} if i in kv else x for i, x in enumerate(losses)])
        ]

    return overrides


def token_aligner(name: str) -> Overrides:
    def overrides(base: dict[str, Any], spec: RunSpec) -> list[str]:
        current = spec.alignment.tokens.options()
        options = {k: v for k, v in current.items() if k in TOKEN_OPTIONS}
        if name == "hard":
            options.pop("max_candidates", None)
        return [setting("alignment.tokens", {"name": name} | options)]

    return overrides


def layer_map(name: str) -> Overrides:
    def overrides(base: dict[str, Any], spec: RunSpec) -> list[str]:
        selection = spec.alignment.layers.options().get("student_layers", "all")
        return [setting("alignment.layers", {"name": name, "student_layers": selection})]

    return overrides


def fusion(name: str) -> Overrides:
    return lambda base, spec: [setting("fusion", {"name": name})]


def layers(selection: str) -> Overrides:
    def overrides(base: dict[str, Any], spec: RunSpec) -> list[str]:
        ref = spec.alignment.layers
        mapping = {"name": ref.name, **ref.options(), "student_layers": selection}
        return [setting("alignment.layers", mapping)]

    return overrides


def teachers_but(drop: str | None, only: str | None = None) -> Overrides:
    def overrides(base: dict[str, Any], spec: RunSpec) -> list[str]:
        ids = [t.id for t in spec.teachers]
        return keep_teachers(base, spec, [only] if only else [i for i in ids if i != drop])

    return overrides


def random_teachers(base: dict[str, Any], spec: RunSpec) -> list[str]:
    return [setting(f"teachers.{i}.reinit", True) for i in range(len(spec.teachers))]


def builtin_groups(spec: RunSpec) -> dict[str, Overrides]:
    """Every built-in group name of this base spec -> its overrides."""
    table: dict[str, Overrides] = {
        "ce_only": ce_only,
        "multi": lambda base, spec: [],
        "random_teacher": random_teachers,
        "shuffled_alignment": token_aligner("shuffled"),
        "k_only": one_kv_part("k"),
        "v_only": one_kv_part("v"),
        "tokens_hard": token_aligner("hard"),
        "tokens_soft": token_aligner("soft"),
        "layer_map_uniform": layer_map("uniform"),
        "layer_map_cka": layer_map("cka"),
    }
    table |= {f"multi_{f}": fusion(f) for f in FUSIONS}
    table |= {f"layers_{s}": layers(s) for s in LAYER_SELECTIONS}
    ids = [t.id for t in spec.teachers]
    table |= {f"single_{t}": teachers_but(None, only=t) for t in ids}
    if len(ids) > 1:
        table |= {f"leave_out_{t}": teachers_but(t) for t in ids}
    return table


def expand_names(names: list[str], spec: RunSpec) -> list[str]:
    """`single` and `leave_one_out` -> one name per teacher; each name once, in order."""
    ids = [t.id for t in spec.teachers]
    out: list[str] = []
    for name in names:
        if name == "single":
            expanded = [f"single_{t}" for t in ids]
        elif name == "leave_one_out":
            expanded = [f"leave_out_{t}" for t in ids] if len(ids) > 1 else []
        else:
            expanded = [name]
        out += [n for n in expanded if n not in out]
    return out
