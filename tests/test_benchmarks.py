"""Every benchmark script runs end to end at CI size and writes its section of the results."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run_smoke(script: str, results: Path, **extra_env: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **extra_env)
    out = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{script}", "--smoke", "--results", str(results)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return results.read_text()


def section(text: str, key: str) -> str:
    match = re.search(f"<!-- bench:{key} -->(.*)<!-- /bench:{key} -->", text, re.S)
    assert match, f"no {key} section in:\n{text}"
    return match.group(1)


def rows(body: str) -> list[list[str]]:
    lines = [ln for ln in body.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]


def number(cell: str) -> float:
    return float(cell.replace("*", "").split()[0].rstrip("%"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "key", "ratio_columns"),
    [
        ("step_overhead", "step_overhead", [6, 7, 8, 10, 12, 17, 19, 20]),
        ("teacher_cache", "teacher_cache", [3, 7]),
        ("flops", "flops", [5]),
        ("scaling", "scaling", [8]),
        ("memory_plan", "memory_plan", [4, 5, 7, 8]),
        ("gpu_smoke", "gpu_smoke", [3, 5, 6, 7]),
        ("phases", "phases", [1]),
        ("whole_run", "whole_run", [5]),
        ("peers", "peers", [1, 3]),
        ("compile", "compile", [1, 2]),
    ],
)
def test_benchmark_smoke(script: str, key: str, ratio_columns: list[int], tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# kept\n\n<!-- bench:other -->\nuntouched\n<!-- /bench:other -->\n")
    body = section(run_smoke(script, results), key)
    assert "torch" in body and "date:" in body  # the machine and versions head each section
    table = rows(body)
    assert table, body
    for row in table:
        for col in ratio_columns:
            assert number(row[col]) > 0, row
    if script == "step_overhead":  # the HF and packed bares' columns, where ratio_columns reads
        assert (
            "| HF bare step s | ratio vs HF bare | packed bare step s | ratio vs packed bare |"
            in body
        )
    text = results.read_text()
    assert "untouched" in text and text.startswith("# kept")  # other sections are kept
    if script == "phases":  # the top-level phases account for the whole step
        shares = [number(row[2]) for row in table if not row[0].startswith("&nbsp;")]
        assert {row[0] for row in table} >= {"step/teachers", "step/student", "step/backward"}
        assert 85 <= sum(shares) <= 101, table


@pytest.mark.slow
def test_step_overhead_under_glibc_has_its_own_section(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text(
        "# kept\n\n<!-- bench:step_overhead -->\nmimalloc's\n<!-- /bench:step_overhead -->\n"
    )
    body = section(
        run_smoke("step_overhead", results, KVD_ALLOCATOR="system"), "step_overhead_glibc"
    )
    assert "allocator: system" in body and rows(body)
    assert "mimalloc's" in results.read_text()  # the mimalloc section is kept beside it


def test_tensor_peak_counts_what_is_held_at_once() -> None:
    """The tensor peak is the most memory live together above the start, from the allocation
    records in order: 4 MB freed before 8 MB is taken peaks at 8 MB (plus the tiny result),
    4 MB kept while 8 MB is taken at 12 MB."""
    import torch

    from benchmarks.harness import tensor_peak_mb

    def apart() -> None:
        a = torch.ones(1_000_000)  # 4 MB
        del a
        b = torch.ones(2_000_000)  # 8 MB
        del b

    def together() -> torch.Tensor:
        a = torch.ones(1_000_000)
        b = torch.ones(2_000_000)
        return a[:1] + b[:1]

    mb = 1e6 / 2**20
    assert 8 * mb <= tensor_peak_mb(apart) < 8.01 * mb
    assert 12 * mb <= tensor_peak_mb(together) < 12.01 * mb


def test_write_section_replaces_only_its_own_section(tmp_path: Path) -> None:
    from benchmarks.harness import write_section

    path = tmp_path / "RESULTS.md"
    write_section(path, "a", "A", "first")
    write_section(path, "b", "B", "other")
    write_section(path, "a", "A", "second")
    text = path.read_text()
    assert text.startswith("# kvd benchmark results")
    assert text.count("<!-- bench:a -->") == 1 and "second" in text and "first" not in text
    assert "other" in text and text.index("bench:a") < text.index("bench:b")


def test_the_packed_bare_trains_on_exactly_the_padded_batchs_real_tokens_and_ce() -> None:
    from benchmarks.harness import BareBatch, pack
    from kvd.data.tokenize import tokenize
    from kvd.modeling.nll import IGNORE
    from kvd.testing.factories import tiny_causal_lm

    student = tiny_causal_lm()
    model = student.model
    assert model.config._attn_implementation == "sdpa"
    texts = ["the first and longest text", "short", "a middle one"]
    batch = tokenize(student.tokenizer, texts, add_bos=True)
    mask = batch.attention_mask
    assert not mask.all()  # padding for the packing to drop
    packed = pack(batch)
    lengths = mask.sum(1).tolist()
    assert packed.input_ids.shape == (1, sum(lengths))
    assert BareBatch([], batch, packed).tokens == int(mask.sum())
    for row, n, ids, pos, labels in zip(
        batch.input_ids,
        lengths,
        packed.input_ids[0].split(lengths),
        packed.position_ids[0].split(lengths),
        packed.labels[0].split(lengths),
        strict=True,
    ):
        assert torch.equal(ids, row[:n]) and torch.equal(pos, torch.arange(n))
        assert labels[0] == IGNORE and torch.equal(labels[1:], ids[1:])  # no target across texts

    with torch.no_grad():
        labels = batch.input_ids.masked_fill(~mask, IGNORE)
        padded = model(input_ids=batch.input_ids, attention_mask=mask, labels=labels)
        flat = model(**packed.inputs(torch.device("cpu")))
        unmasked = model(input_ids=packed.input_ids, use_cache=False).logits  # texts see others
    assert torch.isfinite(flat.loss)
    torch.testing.assert_close(flat.loss, padded.loss)
    torch.testing.assert_close(flat.logits[0], padded.logits[mask])
    assert not torch.allclose(unmasked[0], padded.logits[mask], atol=1e-3)


def test_the_bare_teacher_forward_runs_the_head_on_real_tokens_only() -> None:
    """The bare side's teacher forward: the LM head on the real tokens when its logits are
    read (the same logits as the plain forward's there), on the last position when not."""
    from benchmarks.harness import teacher_forward
    from kvd.data.tokenize import tokenize
    from kvd.testing.factories import tiny_causal_lm

    teacher = tiny_causal_lm()
    batch = tokenize(teacher.tokenizer, ["the first and longest text", "short"], add_bos=True)
    mask = batch.attention_mask.bool()
    assert not mask.all()
    seen: list[torch.Tensor] = []
    hook = teacher.model.get_output_embeddings().register_forward_hook(
        lambda _m, _a, out: seen.append(out)
    )
    rows = mask.reshape(-1).nonzero()[:, 0]
    teacher_forward(teacher.model, batch.input_ids, mask, rows)
    teacher_forward(teacher.model, batch.input_ids, mask, None)
    with torch.no_grad():
        plain = teacher.model(input_ids=batch.input_ids, attention_mask=mask).logits
    hook.remove()
    assert seen[0].shape[:-1] == (int(mask.sum()),) and seen[1].shape[:-1] == (2, 1)
    torch.testing.assert_close(seen[0], plain[mask])
