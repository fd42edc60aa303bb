"""Run under `torchrun --nproc_per_node 2 -m tests.dist_shard_peak OUT`: the no_grad forward of
a tiny llama with a large vocabulary, untied and tied, whole, sharded by shard_frozen and sharded
as it was before (embeddings and head in the root group, gathered for the whole forward); writes
OUT/rank{R}.json with each forward's tensor peak (MiB, torch.profiler), whether its logits equal
the whole model's, and the whole embeddings' and head's MiB (tests/test_distributed.py reads
it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.memory_plan import tensor_peak_mb
from kvd.modeling.sharding import decoder_layers, process_mesh, shard_frozen

MiB = 1 << 20


def model(tied: bool) -> Any:
    """The same random weights on every rank: vocabulary 32768, hidden 64 (fp32: 8 MiB of
    embeddings, 8 more for an untied head), two decoder layers of 0.1 MiB."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32768,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


def shard_root(m: Any, mesh: Any) -> None:
    """The grouping shard_frozen replaced: decoder layers, then everything else in the root."""
    for layer in decoder_layers(m):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(m, mesh=mesh, reshard_after_forward=True)


def forward(m: Any, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Logits [1, T, V] of ids [1, T] and the forward's tensor peak (MiB)."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        logits = m(ids, use_cache=False).logits
    return logits, tensor_peak_mb(prof)


def main(out: str) -> None:
    dist.init_process_group("gloo")
    mesh = process_mesh("cpu", dist.get_world_size())
    ids = torch.arange(8).unsqueeze(0) * 97 % 32768
    report: dict[str, Any] = {}
    for tied in (False, True):
        name = "tied" if tied else "untied"
        whole = model(tied)
        report[f"{name}/embeddings_mib"] = whole.get_input_embeddings().weight.nbytes / MiB
        report[f"{name}/head_mib"] = 0.0 if tied else whole.lm_head.weight.nbytes / MiB
        want, report[f"{name}/whole"] = forward(whole, ids)
        for grouping, shard in (("new", shard_frozen), ("old", shard_root)):
            sharded = model(tied)
            shard(sharded, mesh)
            forward(sharded, ids)  # FSDP's lazy init on the first call
            got, report[f"{name}/{grouping}"] = forward(sharded, ids)
            report[f"{name}/{grouping}_equal"] = torch.equal(got, want)
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
