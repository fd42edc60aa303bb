"""Time resampling: the safe global map (`resample`) and the segment-aware one."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvd.align.base import TokenAligner
from kvd.align.time import ResampleAligner, SegmentResampleAligner, linear_index
from kvd.core.types import TokenBatch
from kvd.data.tokenize import tokenize
from tests.test_align_tokens import (
    BOS,
    MAX_LENGTH,
    OFFLINE,
    PAIRS,
    RANDOM_TEXTS,
    TEXTS,
    assert_causal,
    assert_identity,
    batch,
    check_alignment,
    text_mask,
    tokenized_pair,
)


def build(name: str, **options: object) -> TokenAligner:
    """The aligner `name` of this module with `options`."""
    cls = type(ALIGNERS[name])
    return cls(cls.Config.model_validate(options))


ALIGNERS: dict[str, TokenAligner] = {
    "resample": ResampleAligner(ResampleAligner.Config()),
    "segment_resample": SegmentResampleAligner(SegmentResampleAligner.Config()),
}


def long(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def test_linear_index_causal_floor() -> None:
    index, valid = linear_index(torch.arange(4), long(4), long(2), causal=True)
    assert index.tolist() == [0, 0, 0, 1] and valid.tolist() == [False, True, True, True]
    index, valid = linear_index(torch.arange(2), long(2), long(4), causal=True)
    assert index.tolist() == [1, 3] and valid.all()  # the last teacher token of each share
    index, valid = linear_index(torch.arange(3), long(3), long(3), causal=True)
    assert index.tolist() == [0, 1, 2] and valid.all()


def test_linear_index_endpoints() -> None:
    index, valid = linear_index(torch.arange(5), long(5), long(3), causal=False)
    assert index.tolist() == [0, 1, 1, 2, 2] and valid.all()  # halves round up
    index, _ = linear_index(torch.arange(2), long(2), long(7), causal=False)
    assert index.tolist() == [0, 6]
    index, valid = linear_index(long(0), long(1), long(7), causal=False)
    assert index.item() == 6 and valid.item()  # one student token reads the last teacher token


@pytest.mark.parametrize("causal", [True, False])
def test_linear_index_degenerate_lengths(causal: bool) -> None:
    rank = torch.arange(-1, 3)
    for n_src, n_dst in [(0, 0), (0, 3), (3, 0), (1, 1), (2, 1)]:
        index, valid = linear_index(rank, long(n_src), long(n_dst), causal=causal)
        assert index.dtype == torch.long
        assert ((index >= 0) & (index <= max(n_dst - 1, 0))).all()
        assert not valid[(rank < 0) | (rank >= n_src)].any()
        if n_dst == 0:
            assert not valid.any()


PAD, SPECIAL, TEXT = 0, 1, 2


def _from_kinds(kinds: list[list[int]], width: int) -> TokenBatch:
    """Text tokens (char span = their rank), specials and padding, as drawn per position."""
    kind = torch.tensor(kinds, dtype=torch.long).reshape(len(kinds), width)
    text = kind == TEXT
    rank = text.long().cumsum(1) - 1
    offsets = torch.stack([rank, rank + 1], dim=-1).masked_fill(~text[..., None], -1)
    return TokenBatch(torch.zeros_like(rank), kind != PAD, offsets)


@st.composite
def kinds(draw: st.DrawFn) -> tuple[TokenBatch, TokenBatch]:
    """A student and a teacher batch of 1-4 rows, 0-12 positions each, padding anywhere."""
    rows = draw(st.integers(1, 4))
    sides = []
    for width in (draw(st.integers(0, 12)), draw(st.integers(0, 12))):
        row = st.lists(st.sampled_from([TEXT, TEXT, SPECIAL, PAD]), min_size=width, max_size=width)
        sides.append(_from_kinds(draw(st.lists(row, min_size=rows, max_size=rows)), width))
    return sides[0], sides[1]


def _expected(student: TokenBatch, teacher: TokenBatch, causal: bool) -> list[list[int | None]]:
    """Reference resample map with Python integers: teacher position or None per student one."""
    out: list[list[int | None]] = []
    for s_row, t_row in zip(text_mask(student).tolist(), text_mask(teacher).tolist(), strict=True):
        t_pos = [j for j, keep in enumerate(t_row) if keep]
        ls, lt = sum(s_row), len(t_pos)
        row: list[int | None] = []
        for r in (sum(s_row[:i]) if keep else None for i, keep in enumerate(s_row)):
            if r is None or lt == 0:
                row.append(None)
            elif causal:
                q = (r + 1) * lt // ls - 1
                row.append(t_pos[q] if q >= 0 else None)
            else:
                row.append(t_pos[int(r * (lt - 1) / (ls - 1) + 0.5) if ls > 1 else lt - 1])
        out.append(row)
    return out


@settings(max_examples=300, deadline=None)
@given(pair=kinds(), causal=st.booleans())
def test_resample_matches_reference_and_stays_in_bounds(
    pair: tuple[TokenBatch, TokenBatch], causal: bool
) -> None:
    student, teacher = pair
    al = ResampleAligner(ResampleAligner.Config(causal=causal)).align(student, teacher)
    check_alignment(al, student, teacher)
    got = [
        [int(i) if m else None for i, m in zip(idx, row, strict=True)]
        for idx, row in zip(al.index[..., 0].tolist(), al.mask.tolist(), strict=True)
    ]
    assert got == _expected(student, teacher, causal)
    b, h, d = student.input_ids.shape[0], 2, 3
    out = al.gather(torch.randn(b, h, teacher.input_ids.shape[1], d))
    assert out.shape == (b, h, student.input_ids.shape[1], d)


@pytest.mark.parametrize("causal", [True, False])
def test_resample_edge_cases(causal: bool) -> None:
    aligner = ResampleAligner(ResampleAligner.Config(causal=causal))
    one, three = batch([[(0, 1)]]), batch([[(0, 1), (1, 2), (2, 3)]])
    empty_rows = batch([[], []])  # T = 0
    padded = batch([[(0, 1), (1, 2)], []])  # the second row is all padding
    for student, teacher in [
        (one, one),
        (one, three),
        (three, one),
        (empty_rows, empty_rows),
        (padded, batch([[(0, 1)], [(0, 1)]])),
        (batch([[(0, 1)], [(0, 1)]]), padded),
    ]:
        al = aligner.align(student, teacher)
        check_alignment(al, student, teacher)
        assert al.index.dtype == torch.long
    assert aligner.align(one, one).index.tolist() == [[[0]]]
    assert aligner.align(one, three).index.tolist() == [[[2]]]  # Tt > Ts: the last one
    al = aligner.align(three, one)  # Tt < Ts
    expected = [False, False, True] if causal else [True, True, True]
    assert al.mask[0].tolist() == expected and (al.index == 0).all()
    al = aligner.align(padded, batch([[(0, 1)], [(0, 1)]]))
    assert not al.mask[1].any()
    al = aligner.align(batch([[(0, 1)], [(0, 1)]]), padded)
    assert al.mask.tolist() == [[True], [False]]


@pytest.mark.parametrize("name", ALIGNERS)
@pytest.mark.parametrize("tok", OFFLINE)
@pytest.mark.parametrize("causal", [True, False])
def test_same_tokenizer_is_identity(
    offline_tokenizers: dict[str, Any], name: str, tok: str, causal: bool
) -> None:
    b = tokenize(offline_tokenizers[tok], TEXTS, add_bos=True)
    assert_identity(build(name, causal=causal).align(b, b), b)


@pytest.mark.parametrize("name", ALIGNERS)
def test_bos_on_one_side_only(offline_tokenizers: dict[str, Any], name: str) -> None:
    tok = offline_tokenizers["piece_bpe"]
    with_bos, without = tokenize(tok, TEXTS, add_bos=True), tokenize(tok, TEXTS)
    assert_identity(ALIGNERS[name].align(with_bos, without), with_bos, shift=-1)
    assert_identity(ALIGNERS[name].align(without, with_bos), without, shift=1)


def test_segments_are_cut_at_common_boundaries() -> None:
    # "a hello world": student a | " hel" "lo" | " wor" "ld" ; teacher a | " hello" | " world"
    student = batch([[(-1, -1), (0, 1), (1, 5), (5, 7), (7, 11), (11, 13)]])
    teacher = batch([[(0, 1), (1, 7), (7, 13)]])
    al = ALIGNERS["segment_resample"].align(student, teacher)
    assert_causal(al, student, teacher)
    assert al.mask[0].tolist() == [False, True, True, True, True, True]
    # the first token of a two-to-one segment reads the previous segment's last teacher token
    assert al.index[0, 1:, 0].tolist() == [0, 0, 1, 1, 2]
    loose = SegmentResampleAligner(SegmentResampleAligner.Config(causal=False))
    al = loose.align(student, teacher)
    assert al.index[0, 1:, 0].tolist() == [0, 1, 1, 2, 2]
    global_ = ALIGNERS["resample"].align(student, teacher)  # 5 tokens onto 3, ignoring text
    assert global_.index[0, 1:, 0].tolist() == [0, 0, 0, 1, 2]
    assert global_.mask[0].tolist() == [False, False, True, True, True, True]


def test_segment_map_is_capped_at_the_last_causal_teacher_token() -> None:
    student, teacher = batch([[(0, 1), (1, 5)]]), batch([[(0, 4), (4, 5)]])  # h|ello vs hell|o
    al = ALIGNERS["segment_resample"].align(student, teacher)
    assert_causal(al, student, teacher)
    assert al.mask[0].tolist() == [False, True] and al.index[0, 1, 0].item() == 1
    loose = build("segment_resample", causal=False).align(student, teacher)
    assert loose.index[0, :, 0].tolist() == [0, 1]  # "h" <- "hell": not causal, by request


def test_segment_beyond_a_truncated_teacher_is_masked() -> None:
    student = batch([[(0, 1), (1, 3), (3, 5), (5, 7)]])
    teacher = batch([[(0, 1), (1, 3)]])
    for causal in (True, False):
        aligner = SegmentResampleAligner(SegmentResampleAligner.Config(causal=causal))
        al = aligner.align(student, teacher)
        check_alignment(al, student, teacher)
        assert al.mask[0].tolist() == [True, True, False, False]


@settings(max_examples=300, deadline=None)
@given(
    texts=RANDOM_TEXTS,
    pair=PAIRS,
    bos=BOS,
    max_length=MAX_LENGTH,
    causal=st.booleans(),
)
def test_segment_resample_is_causal(
    offline_tokenizers: dict[str, Any],
    texts: list[str],
    pair: tuple[str, str],
    bos: tuple[bool, bool],
    max_length: int | None,
    causal: bool,
) -> None:
    student, teacher = tokenized_pair(offline_tokenizers, texts, pair, bos, max_length)
    aligner = SegmentResampleAligner(SegmentResampleAligner.Config(causal=causal))
    al = aligner.align(student, teacher)
    if causal:
        assert_causal(al, student, teacher)
    else:
        check_alignment(al, student, teacher)


@pytest.mark.real_teachers
def test_real_tokenizers(real_tokenizers: dict[str, Any]) -> None:
    from pydoc_data.topics import topics

    texts = [topics[k][:1500] for k in ("assignment", "lambda", "with")]
    texts.append("Naïve café, 中文字符, emoji 😀👍🏽 — done.")
    segment = ALIGNERS["segment_resample"]
    for s_name, t_name in [("smollm2", "gemma3"), ("gemma3", "smollm2")]:
        student = tokenize(real_tokenizers[s_name], texts, add_bos=True, max_length=256)
        teacher = tokenize(real_tokenizers[t_name], texts, max_length=256)
        al = segment.align(student, teacher)
        assert_causal(al, student, teacher)
        assert al.mask.sum() > 0.5 * text_mask(student).sum()
        check_alignment(ALIGNERS["resample"].align(student, teacher), student, teacher)
    for tok in real_tokenizers.values():
        same = tokenize(tok, texts, add_bos=True, max_length=256)
        for aligner in ALIGNERS.values():
            assert_identity(aligner.align(same, same), same)
