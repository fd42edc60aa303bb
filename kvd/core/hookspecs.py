"""Plugin hooks of kvd. Every hook only registers components; nothing at train time calls pluggy.

A plugin is a module (or object) with functions marked `@hookimpl` whose names match the hooks
below. Each hook receives one argument, `register`, a callable `register(name, obj)` that adds
`obj` under `name` to that kind's registry. Third-party packages expose their plugin module
through the `kvd` entry-point group:

    [project.entry-points.kvd]
    my_plugin = "my_package.kvd_plugin"
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "kvd"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[str, Any], None]


@hookspec
def register_models(register: Register) -> None:
    """Register model sources: where a teacher or the student comes from.

    `register(name, cls)` where `cls` subclasses `kvd.models.ModelSource`, has a nested pydantic
    `Config` (the YAML options next to `source:`) and can report its geometry without weights.
    """


@hookspec
def register_aligners(register: Register) -> None:
    """Register parameter-free aligners (tokens, time, layers, rope).

    `register(name, cls)` where `cls` subclasses `kvd.align.base.Aligner`; its `stage` class
    attribute says which slot of `alignment:` in the spec it fills.
    """


@hookspec
def register_projectors(register: Register) -> None:
    """Register learned KV projectors (teacher geometry -> student geometry, or the reverse).

    `register(name, cls)` where `cls` is a `torch.nn.Module` built as `cls(config, source=...,
    target=...)` from its nested `Config` and two `kvd.types.KVShape`; it maps [B, Hs, T, Ds] of
    the source geometry to [B, Ht, T, Dt] of the target (either side may be the teacher).
    """


@hookspec
def register_fusions(register: Register) -> None:
    """Register fusion strategies that combine several teachers' aligned KV into one target.

    `register(name, cls)` where `cls` subclasses `kvd.fusion.Fusion` (an `nn.Module`), built as
    `cls(config, n_teachers=..., n_layers=..., kv_dim=..., n_tasks=..., teacher_weights=...)`;
    `forward(FusionInput) -> FusionOutput` gives routing weights over teachers per position and
    an auxiliary (entropy) loss. Class attributes `routes_on_features` and `needs_teacher_ce`
    tell the trainer what the fusion reads.
    """


@hookspec
def register_losses(register: Register) -> None:
    """Register losses (KV, relation, logits, CE).

    `register(name, cls)` where `cls` subclasses `kvd.losses.Loss` (an `nn.Module`) built as
    `cls(config)`; its class attribute `inputs` ("kv", "kv_raw", "logits" or "ce") tells the
    trainer which tensors its forward takes.
    """


@hookspec
def register_datasets(register: Register) -> None:
    """Register text sources for training and evaluation.

    `register(name, cls)` where `cls` subclasses `kvd.data.TextSource` and yields documents.
    """


@hookspec
def register_commands(register: Register) -> None:
    """Register extra CLI commands.

    `register(name, fn)` where `fn` is a function Typer can turn into a command; it appears as
    `kvd NAME`.
    """


KINDS: dict[str, str] = {
    "models": "register_models",
    "aligners": "register_aligners",
    "projectors": "register_projectors",
    "fusions": "register_fusions",
    "losses": "register_losses",
    "datasets": "register_datasets",
    "commands": "register_commands",
}
"""Registry kind -> the hook that fills it."""
