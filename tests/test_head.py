"""The output head as data (kvd.modeling.head): the logits of real transformers models from their
last hidden states, soft-capping included."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from kvd.modeling.capture import capture_kv
from kvd.modeling.head import HeadRows, OutputHead

SIZES = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


@pytest.mark.parametrize(
    "config",
    [
        lambda: tf.LlamaConfig(**SIZES),
        lambda: tf.Qwen2Config(**SIZES),  # q/k/v biases, untied head
        lambda: tf.Gemma2Config(**SIZES, head_dim=8, final_logit_softcapping=3.0),
    ],
    ids=["llama", "qwen2", "gemma2-softcap"],
)
def test_head_reproduces_the_models_logits(config: object) -> None:
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config(), dtype=torch.bfloat16).eval()  # type: ignore[operator]
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.no_grad():
        both = capture_kv(model, ids, mask, layers=[], logits=True, hidden=True)
        alone = capture_kv(model, ids, mask, layers=[], logits=False, hidden=True)
    head = OutputHead.of(model)
    assert head is not None and both.hidden is not None and both.logits is not None
    assert alone.logits is None and alone.hidden is not None
    assert torch.equal(alone.hidden, both.hidden)
    assert torch.equal(head(both.hidden), both.logits)
    assert (head.softcap is not None) == (model.config.model_type == "gemma2")
    if head.softcap is not None:  # the cap is part of the function: without it, other logits
        uncapped = OutputHead(head.weight, head.bias, None)
        assert not torch.equal(uncapped(both.hidden), both.logits)
    again = OutputHead.from_tensors(head.tensors("t"), "t", head.softcap, torch.device("cpu"))
    assert torch.equal(again(both.hidden), both.logits)


def test_head_rows_are_the_logits_rows_outside_autocast() -> None:
    """HeadRows makes rows a..b of the flattened logits on demand, the same values as the whole
    head's, in the teacher's dtype even inside the student's bf16 autocast region."""
    torch.manual_seed(0)
    head = OutputHead(torch.randn(50, 16), None, None)  # a float32 teacher
    hidden = torch.randn(3, 7, 16)
    rows = HeadRows(hidden, head)
    assert rows.shape == (3, 7, 50)
    whole = head(hidden).reshape(21, 50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = [rows[a : a + 5] for a in range(0, 21, 5)]
    assert all(g.dtype == torch.float32 for g in got)
    torch.testing.assert_close(torch.cat(got), whole, rtol=1e-6, atol=1e-6)


def test_head_rows_run_the_head_on_blocks_of_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small increasing slices (a row-wise loss's chunks) are served from blocks of
    BLOCK_ELEMENTS // V rows, one head call per block; a slice not inside the last block (behind
    it, crossing its end, or longer than it) makes a new block from its first row. Every slice
    holds the whole head's rows."""
    from kvd.modeling import head as module

    monkeypatch.setattr(module, "BLOCK_ELEMENTS", 50 * 8)  # blocks of 8 rows of V = 50
    torch.manual_seed(0)
    head = OutputHead(torch.randn(50, 16), torch.randn(50), None)
    hidden = torch.randn(3, 7, 16)
    whole = head(hidden).reshape(21, 50)
    calls: list[int] = []
    call = OutputHead.__call__
    monkeypatch.setattr(
        OutputHead, "__call__", lambda self, h: calls.append(len(h)) or call(self, h)
    )
    rows = HeadRows(hidden, head)
    got = [rows[a : min(a + 3, 21)] for a in range(0, 21, 3)]
    torch.testing.assert_close(torch.cat(got), whole, rtol=1e-6, atol=1e-6)
    assert calls == [8, 8, 8, 3]  # blocks from rows 0, 6, 12, 18 (7 slices, 4 calls)
    calls.clear()
    torch.testing.assert_close(rows[2:4], whole[2:4])  # behind the last block
    torch.testing.assert_close(rows[0:20], whole[0:20])  # longer than a block
    assert calls == [8, 20]
