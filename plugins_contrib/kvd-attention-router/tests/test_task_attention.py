"""Tests of the task_attention fusion against the installed kvd (`pip install -e .` first).

The fixtures `kvd_plugins` and `kv_bundle` come from kvd's pytest plugin (`kvd.testing`).
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kvd.cli.app import main
from kvd.errors import PlanError
from kvd.manager import Plugins
from kvd.testing import KVFactory, check_component, tiny_lm_config

SIZES = {"n_teachers": 3, "n_layers": 2, "kv_dim": 8, "n_tasks": 2}


def build(plugins: Plugins, **options: Any) -> Any:
    cls = plugins.registry("fusions").get("task_attention")
    return cls(cls.Config(**options), **SIZES)


def test_registered_through_the_entry_point(kvd_plugins: Plugins) -> None:
    entry = kvd_plugins.registry("fusions").entry("task_attention")
    assert (entry.plugin, entry.package) == ("attention_router", "kvd-attention-router")
    assert entry.version == metadata.version("kvd-attention-router")


@pytest.mark.parametrize(
    "options",
    [{}, {"hidden": 4, "entropy_weight": 0.1, "entropy_target": "specialized"}],
    ids=["defaults", "entropy"],
)
def test_keeps_the_fusion_contract(kvd_plugins: Plugins, options: dict[str, Any]) -> None:
    report = check_component("fusions", "task_attention", plugins=kvd_plugins, **options)
    assert report.skipped == [
        "without task labels: task_attention fusion needs task labels, but the data declares "
        "no tasks"
    ]


def test_starts_uniform_over_the_valid_teachers(kvd_plugins: Plugins, kv_bundle: KVFactory) -> None:
    inp = kv_bundle.fusion_input(teachers=3, head_dim=8)
    weights = build(kvd_plugins)(inp).weights  # [B, T, N]
    valid = inp.valid
    expected = valid / valid.sum(-1, keepdim=True).clamp_min(1)
    torch.testing.assert_close(weights, expected)


def test_learns_a_teacher_per_task(kvd_plugins: Plugins, kv_bundle: KVFactory) -> None:
    """Rewarding teacher 0 for task 0 and teacher 1 for task 1 moves the routing there, at
    every position and for KV the router has not seen."""
    fusion = build(kvd_plugins)
    optimizer = torch.optim.Adam(fusion.parameters(), lr=0.05)
    task = torch.tensor([0, 1])
    for step in range(40):
        inp = kv_bundle.fusion_input(teachers=3, head_dim=8, layer=step % 2, seed=step)
        inp.task = task
        weights = fusion(inp).weights
        loss = -(weights[0, :, 0].mean() + weights[1, :, 1].mean())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    inp = kv_bundle.fusion_input(teachers=3, head_dim=8, seed=1000)
    inp.task = task
    weights = fusion(inp).weights.detach()
    assert (weights[0, :-1, 0] > 0.8).all() and (weights[1, :-1, 1] > 0.8).all()


@pytest.mark.parametrize(("target", "sign"), [("diverse", -1.0), ("specialized", 1.0)])
def test_entropy_regulariser(
    kvd_plugins: Plugins, kv_bundle: KVFactory, target: str, sign: float
) -> None:
    inp = kv_bundle.fusion_input(teachers=3, head_dim=8)
    out = build(kvd_plugins, entropy_weight=0.5, entropy_target=target)(inp)
    # uniform start: log 3 nats where 3 teachers are valid, log 2 where 2, none at padding
    valid = inp.valid.sum(-1)
    entropy = valid[valid > 0].float().log().mean()
    torch.testing.assert_close(out.aux_loss, sign * 0.5 * entropy)


def test_needs_task_labels(kvd_plugins: Plugins) -> None:
    cls = kvd_plugins.registry("fusions").get("task_attention")
    with pytest.raises(PlanError, match="needs task labels"):
        cls(cls.Config(), **{**SIZES, "n_tasks": 0})


def test_short_kvd_train(tmp_path: Path, kvd_plugins: Plugins) -> None:
    """Two heterogeneous tiny teachers routed by task in a 3-step `kvd train`."""
    spec = {
        "teachers": [
            {"id": "llama", "source": "tiny", "seed": 1, "config": tiny_lm_config(layers=3)},
            {
                "id": "qwen",
                "source": "tiny",
                "seed": 2,
                "config": tiny_lm_config("qwen2", heads=6, kv_heads=1, head_dim=16),
            },
        ],
        "student": {"source": "tiny", "seed": 3, "config": tiny_lm_config(head_dim=4)},
        "data": {"name": "stdlib", "seq_len": 32, "tasks": ["reference", "module_doc"]},
        "fusion": {"name": "task_attention", "hidden": 8, "entropy_weight": 0.01},
        "losses": [{"name": "kv_mse"}, {"name": "ce"}],
        "training": {"max_steps": 3, "batch_size": 2, "warmup_steps": 1},
        "evaluation": {"every": 3, "batches": 1},
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["validate", str(path)]) == 0
    assert main(["train", str(path)]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    routes = {k: v for r in records for k, v in r.items() if k.startswith("route/L0/")}
    assert set(routes) == {"route/L0/llama", "route/L0/qwen"}
    assert (tmp_path / "run" / "results.json").exists()
