"""Cross-tokenizer logits: the next-token alignment (both tokenisations end at the same
character) and the first-token vocabulary map onto the student's vocabulary."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings

from kvd.align.tokens import next_token_alignment
from kvd.align.vocab import FLOOR, FirstTokenVocab, TopK, VocabMap, first_token_index
from kvd.data.tokenize import tokenize
from kvd.losses.logits import LogitKDLoss
from kvd.losses.rowwise import CHUNK_ELEMENTS
from tests.test_align_tokens import (
    BOS,
    MAX_LENGTH,
    OFFLINE,
    PAIRS,
    RANDOM_TEXTS,
    TEXTS,
    assert_identity,
    check_alignment,
    tokenized_pair,
)


def assert_same_end(al: Any, student: Any, teacher: Any) -> None:
    """Every aligned pair ends at the same character, the teacher token having seen no text
    beyond it; every student token with such a teacher token is aligned."""
    check_alignment(al, student, teacher)
    if teacher.input_ids.shape[1] == 0:
        assert not al.mask.any()
        return
    s_end = student.offsets[..., 1]
    t_end = teacher.offsets[..., 1].gather(1, al.index[..., 0])
    assert (t_end[al.mask] == s_end[al.mask]).all()
    t_text = teacher.attention_mask & (teacher.offsets[..., 0] >= 0)
    horizon = torch.where(t_text, teacher.offsets[..., 1], -1).cummax(1).values
    assert (horizon.gather(1, al.index[..., 0])[al.mask] == s_end[al.mask]).all()
    s_text = student.attention_mask & (student.offsets[..., 0] >= 0)
    for b in range(s_end.shape[0]):
        ends = set(teacher.offsets[b, t_text[b], 1].tolist())
        for i in range(s_end.shape[1]):
            # a student token whose end no teacher token shares is never aligned
            if s_text[b, i] and int(s_end[b, i]) not in ends:
                assert not al.mask[b, i]


@pytest.mark.parametrize("tok", OFFLINE)
@pytest.mark.parametrize("bos", [False, True])
def test_same_tokenizer_is_identity(
    offline_tokenizers: dict[str, Any], tok: str, bos: bool
) -> None:
    batch = tokenize(offline_tokenizers[tok], TEXTS, add_bos=bos)
    assert_identity(next_token_alignment(batch, batch), batch)


@settings(max_examples=300, deadline=None)
@given(
    texts=RANDOM_TEXTS,
    pair=PAIRS,
    bos=BOS,
    max_length=MAX_LENGTH,
)
def test_pairs_end_together_and_are_causal(
    offline_tokenizers: dict[str, Any],
    texts: list[str],
    pair: tuple[str, str],
    bos: tuple[bool, bool],
    max_length: int | None,
) -> None:
    student, teacher = tokenized_pair(offline_tokenizers, texts, pair, bos, max_length)
    assert_same_end(next_token_alignment(student, teacher), student, teacher)


def test_map_adds_the_mass_of_teacher_tokens_with_one_student_token() -> None:
    logits = torch.tensor([[[0.0, 1.0, 2.0, 3.0]]])
    p = logits.softmax(-1)[0, 0]
    vocab = VocabMap(torch.tensor([1, 1, -1, 0]), size=3, k=3)  # teacher 2 maps to nothing
    out = vocab.apply(logits)[0, 0].exp()
    kept = p[0] + p[1] + p[3]
    torch.testing.assert_close(out[0], p[3] / kept)
    torch.testing.assert_close(out[1], (p[0] + p[1]) / kept)
    assert out[2] == pytest.approx(FLOOR)  # no teacher token starts with student token 2
    assert out.sum() == pytest.approx(1.0)


def test_map_sums_each_student_token_in_teacher_id_order() -> None:
    """`apply` scatters the teacher's probabilities in place and gives bit for bit the
    index_select + index_add sum it replaced (each student token's terms added in the order of
    the teacher ids), so runs before and after it train alike."""
    torch.manual_seed(0)
    index = torch.randint(-1, 300, (1000,))  # about 1 teacher id in 300 maps to nothing
    logits = (torch.randn(3, 5, 1000) * 4).bfloat16()
    probs = logits.float().softmax(-1)
    source = (index >= 0).nonzero().squeeze(1)
    want = probs.new_zeros(3, 5, 300).index_add_(-1, index[source], probs[..., source])
    want = (want / want.sum(-1, keepdim=True)).clamp_min(FLOOR).log()
    assert torch.equal(VocabMap(index, size=300, k=8).apply(logits), want)


def test_identity_map_is_log_softmax() -> None:
    logits = torch.randn(2, 5, 11)
    vocab = VocabMap(torch.arange(11), size=11, k=11)
    torch.testing.assert_close(vocab.apply(logits), logits.log_softmax(-1))


def test_top_k_keeps_the_most_likely_and_spreads_the_rest() -> None:
    logits = torch.randn(3, 4, 20) * 3
    vocab = VocabMap(torch.arange(20), size=20, k=5)
    full = vocab.apply(logits)
    top = vocab.top_k(logits)
    dense = top.dense()
    assert top.values.shape == (3, 4, 5)
    kept = full.topk(5, dim=-1)
    torch.testing.assert_close(dense.gather(-1, kept.indices), kept.values)
    torch.testing.assert_close(dense.exp().sum(-1), torch.ones(3, 4))
    rest = dense.exp().sort(dim=-1).values[..., :15]
    torch.testing.assert_close(rest, rest[..., :1].expand_as(rest))  # spread evenly
    whole = TopK(full, torch.arange(20).expand(3, 4, 20), 20)
    torch.testing.assert_close(whole.dense(), full)  # k = Vs keeps the distribution


def test_first_token_of_each_teacher_token(offline_tokenizers: dict[str, Any]) -> None:
    teacher, student = offline_tokenizers["piece_bpe"], offline_tokenizers["byte_bpe"]
    index = first_token_index(teacher, student, len(teacher) + 3, len(student))
    assert index.shape == (len(teacher) + 3,)
    assert (index[len(teacher) :] == -1).all()  # rows of the logits past the tokenizer
    assert (index[teacher.all_special_ids] == -1).all()
    for tid in range(len(teacher)):
        text = teacher.decode([tid])
        if index[tid] >= 0:
            assert student(text, add_special_tokens=False)["input_ids"][0] == index[tid]
        elif tid not in teacher.all_special_ids:
            assert "\ufffd" in text or not text
    assert (index >= 0).float().mean() > 0.9


def test_one_tokenizer_needs_no_map(offline_tokenizers: dict[str, Any]) -> None:
    tok = offline_tokenizers["byte_bpe"]
    aligner = FirstTokenVocab(FirstTokenVocab.Config())
    assert aligner.map(tok, tok, len(tok), len(tok)) is None
    other = offline_tokenizers["piece_bpe"]
    assert aligner.map(other, tok, len(other), len(tok)) is not None


@pytest.mark.real_teachers
def test_real_tokenizers_map_words_to_words(real_tokenizers: dict[str, Any]) -> None:
    smollm2, gemma3 = real_tokenizers["smollm2"], real_tokenizers["gemma3"]
    vocab = FirstTokenVocab(FirstTokenVocab.Config()).map(gemma3, smollm2, 262144, 49152)
    assert vocab is not None and vocab.coverage > 0.9
    for word in [" import", " the", "def", " return"]:
        t_id = gemma3(word, add_special_tokens=False)["input_ids"]
        s_id = smollm2(word, add_special_tokens=False)["input_ids"]
        assert len(t_id) == len(s_id) == 1 and int(vocab.index[t_id[0]]) == s_id[0]


def test_top_k_of_chosen_rows_in_chunks_equals_apply_then_topk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """top_k over chosen rows, a few rows at a time (3 here), gives bit for bit what `apply`
    and topk give on those rows gathered at once."""
    monkeypatch.setitem(CHUNK_ELEMENTS, "cpu", 3 * 20)
    logits = (torch.randn(2, 7, 20) * 3).bfloat16()
    index = torch.arange(20) % 12
    index[::5] = -1
    vocab = VocabMap(index, size=12, k=4)
    rows = torch.tensor([[0, 2, 2, 6, 5], [7, 8, 13, 9, 10]])
    top = vocab.top_k(logits, rows)
    want = vocab.apply(logits.reshape(-1, 20)[rows]).topk(4, dim=-1)
    assert top.values.shape == (2, 5, 4) and top.values.dtype == torch.float32
    assert torch.equal(top.values, want.values) and torch.equal(top.index, want.indices)
    whole = vocab.top_k(logits)
    assert torch.equal(whole.values, vocab.apply(logits).topk(4, dim=-1).values)


def test_top_k_rows_are_its_dense_rows() -> None:
    """TopK read as row-wise loss targets (kvd.losses.rowwise.Rows): any slice of the flattened
    rows is, bit for bit, those rows of `dense()`, and `shape` is the dense shape."""
    logits = torch.randn(2, 5, 30) * 3
    top = VocabMap(torch.arange(30) % 17, size=17, k=4).top_k(logits)
    dense = top.dense()
    assert top.shape == dense.shape == (2, 5, 17)
    for rows in (slice(0, 10), slice(3, 7), slice(9, 10)):
        assert torch.equal(top[rows], dense.reshape(10, 17)[rows])
    kd = LogitKDLoss(LogitKDLoss.Config(temperature=2.0))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    student = torch.randn(2, 5, 17, requires_grad=True)
    from_rows = kd(student, top, mask)
    (grad_rows,) = torch.autograd.grad(from_rows, student)
    from_dense = kd(student, dense, mask)
    (grad_dense,) = torch.autograd.grad(from_dense, student)
    assert torch.equal(from_rows, from_dense) and torch.equal(grad_rows, grad_dense)


def test_top_k_maps_only_the_kept_rows_and_the_loss_is_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With `keep`, the kept rows are bit for bit those of the whole top k (mapped in chunks
    of other rows), the others the uniform distribution; logit_kd masked by `keep` gives the
    same loss and gradient from either, so padding and unaligned positions cost no mapping."""
    monkeypatch.setitem(CHUNK_ELEMENTS, "cpu", 3 * 40)
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 40) * 3
    index = torch.arange(40) % 17
    index[::9] = -1  # teacher ids that map to nothing
    vocab = VocabMap(index, size=17, k=4)
    keep = torch.rand(2, 6) < 0.6
    keep[0, 0], keep[1, 5] = True, False
    whole, part = vocab.top_k(logits), vocab.top_k(logits, keep=keep)
    assert torch.equal(part.values[keep], whole.values[keep])
    assert torch.equal(part.index[keep], whole.index[keep])
    torch.testing.assert_close(
        part.dense()[~keep].exp(), torch.full((int((~keep).sum()), 17), 1 / 17)
    )
    kd = LogitKDLoss(LogitKDLoss.Config(temperature=2.0))
    student = torch.randn(2, 6, 17, requires_grad=True)
    losses = [kd(student, top, keep) for top in (whole, part)]
    grads = [torch.autograd.grad(loss, student)[0] for loss in losses]
    assert torch.equal(losses[0], losses[1]) and torch.equal(grads[0], grads[1])
