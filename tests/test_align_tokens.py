"""Tokenizer alignment by character offsets: `soft` and `hard`, causal safety above all."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvd.align.base import TokenAligner
from kvd.align.tokens import HardTokenAligner, SoftTokenAligner
from kvd.core.types import TokenAlignment, TokenBatch
from kvd.data.tokenize import tokenize

TEXTS = ["Hello  wörld, café 中文字 😀👍🏽 end.", "def f():\n\treturn 1", "x", ""]
OFFLINE = ["byte_bpe", "piece_bpe", "chars", "words"]


def text_mask(batch: TokenBatch) -> torch.Tensor:
    """[B, T] bool: real tokens that cover text."""
    return batch.attention_mask & (batch.offsets[..., 0] >= 0)


def batch(spans: list[list[tuple[int, int]]]) -> TokenBatch:
    """A right-padded TokenBatch with the given character spans ((-1, -1) = special)."""
    width = max(len(row) for row in spans)
    offsets = torch.full((len(spans), width, 2), -1, dtype=torch.long)
    mask = torch.zeros(len(spans), width, dtype=torch.bool)
    for b, row in enumerate(spans):
        if row:
            offsets[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = True
    return TokenBatch(torch.zeros(len(spans), width, dtype=torch.long), mask, offsets)


def check_alignment(al: TokenAlignment, student: TokenBatch, teacher: TokenBatch) -> None:
    """Shapes, dtypes, bounds and weights of any alignment of `student` to `teacher`."""
    b, ts = student.input_ids.shape
    tt = teacher.input_ids.shape[1]
    assert al.index.dtype == torch.long and al.index.shape[:2] == (b, ts)
    assert al.index.device == student.offsets.device
    assert al.weight.shape == al.index.shape and al.mask.shape == (b, ts)
    assert ((al.index >= 0) & (al.index < max(tt, 1))).all()
    assert (al.weight >= 0).all()
    assert not (al.mask & ~text_mask(student)).any(), "a non-text student position is aligned"
    total = al.weight.sum(-1)
    assert torch.allclose(total[al.mask], torch.ones(()), atol=1e-5)
    assert (total[~al.mask] == 0).all(), "a masked position carries weight"
    if tt:
        used = al.weight > 0
        picked = torch.gather(text_mask(teacher), 1, al.index.flatten(1)).view_as(al.index)
        assert picked[used].all(), "a teacher position without text is read"


def assert_causal(al: TokenAlignment, student: TokenBatch, teacher: TokenBatch) -> None:
    """Every teacher token read ends at or before the student token it serves."""
    check_alignment(al, student, teacher)
    if teacher.input_ids.shape[1] == 0:
        return
    t_end = torch.gather(teacher.offsets[..., 1], 1, al.index.flatten(1)).view_as(al.index)
    s_end = student.offsets[..., 1, None].expand_as(t_end)
    used = al.weight > 0
    assert (t_end[used] <= s_end[used]).all(), "a student position reads text it has not seen"


def assert_identity(al: TokenAlignment, student: TokenBatch, shift: int = 0) -> None:
    """Every text position i reads teacher position i + shift alone; the rest is masked."""
    text = text_mask(student)
    assert torch.equal(al.mask, text)
    pos = torch.arange(student.input_ids.shape[1]).expand_as(text) + shift
    assert torch.equal(al.index[..., 0][text], pos[text])
    assert (al.weight[..., 0][text] == 1).all()
    assert (al.weight[..., 1:] == 0).all()


def build(name: str, **options: object) -> TokenAligner:
    """The aligner `name` of this module with `options`."""
    cls = type(ALIGNERS[name])
    return cls(cls.Config.model_validate(options))


ALIGNERS: dict[str, TokenAligner] = {
    "soft": SoftTokenAligner(SoftTokenAligner.Config()),
    "hard": HardTokenAligner(HardTokenAligner.Config()),
}


@pytest.mark.parametrize("name", ALIGNERS)
@pytest.mark.parametrize("tok", OFFLINE)
@pytest.mark.parametrize("bos", [False, True])
def test_same_tokenizer_is_identity(
    offline_tokenizers: dict[str, Any], name: str, tok: str, bos: bool
) -> None:
    b = tokenize(offline_tokenizers[tok], TEXTS, add_bos=bos)
    al = ALIGNERS[name].align(b, b)
    check_alignment(al, b, b)
    assert_identity(al, b)


@pytest.mark.parametrize("name", ALIGNERS)
def test_bos_on_one_side_only(offline_tokenizers: dict[str, Any], name: str) -> None:
    tok = offline_tokenizers["byte_bpe"]
    with_bos, without = tokenize(tok, TEXTS, add_bos=True), tokenize(tok, TEXTS)
    assert_identity(ALIGNERS[name].align(with_bos, without), with_bos, shift=-1)
    assert_identity(ALIGNERS[name].align(without, with_bos), without, shift=1)


def test_soft_weights_by_iou_and_bounds_candidates() -> None:
    student = batch([[(0, 5)]])  # "hello" as one word
    teacher = batch([[(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]])  # one char each
    wide = SoftTokenAligner(SoftTokenAligner.Config(max_candidates=8)).align(student, teacher)
    assert wide.index.shape == (1, 1, 8)
    assert torch.allclose(wide.weight[0, 0, :5], torch.full((5,), 0.2))
    assert sorted(wide.index[0, 0, :5].tolist()) == [0, 1, 2, 3, 4]
    assert (wide.weight[0, 0, 5:] == 0).all() and (wide.index[0, 0, 5:] == 0).all()
    narrow = SoftTokenAligner(SoftTokenAligner.Config(max_candidates=2)).align(student, teacher)
    assert narrow.index[0, 0].tolist() == [4, 3]  # equal IoU: the latest tokens win
    assert narrow.weight[0, 0].tolist() == [0.5, 0.5]
    soft = SoftTokenAligner(SoftTokenAligner.Config())
    he_llo = batch([[(0, 2), (2, 5)]])
    al = soft.align(student, he_llo)  # IoU 2/5 and 3/5
    assert al.index[0, 0, :2].tolist() == [1, 0]
    assert torch.allclose(al.weight[0, 0, :2], torch.tensor([0.6, 0.4]))
    hel_lo = batch([[(0, 3), (3, 5)]])
    al = soft.align(hel_lo, he_llo)  # "hel" <- "he" ("llo" ends later), "lo" <- "llo"
    assert_causal(al, hel_lo, he_llo)
    assert al.index[0, :, 0].tolist() == [0, 1] and (al.weight[0, :, 0] == 1).all()


@pytest.mark.parametrize("name", ALIGNERS)
def test_fallback_reads_the_last_causal_token_or_masks(name: str) -> None:
    student = batch([[(-1, -1), (0, 1), (1, 5), (5, 7)]])  # BOS "a" " hel" "lo"
    teacher = batch([[(0, 1), (1, 7)]])  # "a" " hello": nothing causal overlaps " hel"
    al = build(name, fallback="last_causal").align(student, teacher)
    assert_causal(al, student, teacher)
    assert al.mask[0].tolist() == [False, True, True, True]
    assert al.index[0, :, 0].tolist() == [0, 0, 0, 1]
    al = build(name, fallback="mask").align(student, teacher)
    assert al.mask[0].tolist() == [False, True, False, True]


@pytest.mark.parametrize("name", ALIGNERS)
def test_nothing_causal_or_truncated_teacher_is_masked(name: str) -> None:
    al = ALIGNERS[name].align(batch([[(0, 3), (3, 5)]]), batch([[(0, 5)]]))  # "hel" before "hello"
    assert al.mask[0].tolist() == [False, True]
    student = batch([[(0, 1), (1, 5), (5, 7), (7, 9)]])
    teacher = batch([[(0, 1), (1, 4)]])  # truncated inside the student's second token
    al = ALIGNERS[name].align(student, teacher)
    assert_causal(al, student, teacher)
    assert al.mask[0].tolist() == [True, True, False, False]  # overlap kept, beyond it masked


@pytest.mark.parametrize("name", ALIGNERS)
def test_pieces_of_one_character_match_from_its_end(
    offline_tokenizers: dict[str, Any], name: str
) -> None:
    pieces = tokenize(offline_tokenizers["byte_bpe"], ["a👍🏽"])  # a, 3 + 3 byte pieces
    whole = tokenize(offline_tokenizers["chars"], ["a👍🏽"])  # a, one grapheme (1, 3)
    assert whole.offsets[0].tolist() == [[0, 1], [1, 3]]
    al = ALIGNERS[name].align(pieces, whole)
    assert_causal(al, pieces, whole)
    # only the final piece has seen the whole grapheme; the others read "a"
    assert al.index[0, :, 0].tolist() == [0] * (pieces.input_ids.shape[1] - 1) + [1]
    al = ALIGNERS[name].align(whole, pieces)
    assert_causal(al, whole, pieces)
    assert al.index[0, 1, 0].item() == pieces.input_ids.shape[1] - 1  # the whole reads the last


@pytest.mark.parametrize("name", ALIGNERS)
def test_empty_sides(name: str) -> None:
    empty = TokenBatch(
        torch.zeros(2, 0, dtype=torch.long),
        torch.zeros(2, 0, dtype=torch.bool),
        torch.zeros(2, 0, 2, dtype=torch.long),
    )
    some = batch([[(0, 1)], []])
    for student, teacher in [(some, empty), (empty, some), (empty, empty)]:
        al = ALIGNERS[name].align(student, teacher)
        check_alignment(al, student, teacher)
        assert not al.mask.any()


def test_gather_of_identity_returns_the_teacher(offline_tokenizers: dict[str, Any]) -> None:
    b = tokenize(offline_tokenizers["piece_bpe"], TEXTS)
    x = torch.randn(b.input_ids.shape[0], 2, b.input_ids.shape[1], 3)
    out = ALIGNERS["soft"].align(b, b).gather(x)
    keep = text_mask(b)[:, None, :, None].expand_as(x)
    assert torch.equal(out[keep], x[keep])
    assert out.data_ptr() == x.data_ptr()  # a view: same-tokenizer logits are not copied


@pytest.mark.parametrize("pair", [("piece_bpe", "piece_bpe"), ("byte_bpe", "words")])
def test_gather_equals_the_dense_map(offline_tokenizers: dict[str, Any], pair: Any) -> None:
    """The identity shortcut (same tokenizer) and the matmul give what the map says."""
    s = tokenize(offline_tokenizers[pair[0]], TEXTS)
    t = tokenize(offline_tokenizers[pair[1]], TEXTS)
    x = torch.randn(t.input_ids.shape[0], 2, t.input_ids.shape[1], 5)
    al = ALIGNERS["soft"].align(s, t)
    dense = torch.einsum("bst,bhtd->bhsd", al.matrix(x.shape[2]), x)
    rows = al.mask[:, None, :, None].expand_as(dense)  # the rows that hold targets
    torch.testing.assert_close(al.gather(x)[rows], dense[rows])


ALPHABET = [
    *"abc xyz.,\n\t",
    *["é", "e\u0301", "中", "文", "😀", "👍🏽", "  "],
    *["the", " quick", "brow", "n", " fox", "jumps", " over", "lazy", " dog", "return", " x"],
]
"""Pieces of random texts: characters and words the offline tokenizers merge differently."""
RANDOM_TEXTS = st.lists(st.lists(st.sampled_from(ALPHABET), max_size=24).map("".join), max_size=3)
PAIRS = st.tuples(st.sampled_from(OFFLINE), st.sampled_from(OFFLINE))
BOS = st.tuples(st.booleans(), st.booleans())
MAX_LENGTH = st.none() | st.integers(1, 30)
"""Hypothesis strategies of the property tests: texts, (student, teacher) tokenizers, whether
each adds BOS, the student's truncation."""


def tokenized_pair(
    tokenizers: dict[str, Any],
    texts: list[str],
    pair: tuple[str, str],
    bos: tuple[bool, bool],
    max_length: int | None,
) -> tuple[TokenBatch, TokenBatch]:
    """The (student, teacher) batches of a property test's draw."""
    texts = texts or [""]
    student = tokenize(tokenizers[pair[0]], texts, add_bos=bos[0], max_length=max_length)
    teacher = tokenize(tokenizers[pair[1]], texts, add_bos=bos[1])
    return student, teacher


@settings(max_examples=400, deadline=None)
@given(
    texts=RANDOM_TEXTS,
    pair=PAIRS,
    bos=BOS,
    max_length=MAX_LENGTH,
    name=st.sampled_from(list(ALIGNERS)),
    fallback=st.sampled_from(["last_causal", "mask"]),
)
def test_never_reads_text_the_student_has_not_seen(
    offline_tokenizers: dict[str, Any],
    texts: list[str],
    pair: tuple[str, str],
    bos: tuple[bool, bool],
    max_length: int | None,
    name: str,
    fallback: str,
) -> None:
    student, teacher = tokenized_pair(offline_tokenizers, texts, pair, bos, max_length)
    assert_causal(build(name, fallback=fallback).align(student, teacher), student, teacher)


@pytest.mark.real_teachers
@pytest.mark.parametrize("name", ALIGNERS)
def test_real_tokenizers_are_causal(real_tokenizers: dict[str, Any], name: str) -> None:
    from pydoc_data.topics import topics

    texts = [topics[k][:1500] for k in ("assignment", "lambda", "with")]
    texts.append("Naïve café, 中文字符, emoji 😀👍🏽 — done.")
    for s_name, t_name in [("smollm2", "gemma3"), ("gemma3", "smollm2")]:
        student = tokenize(real_tokenizers[s_name], texts, add_bos=True, max_length=256)
        teacher = tokenize(real_tokenizers[t_name], texts, max_length=256)
        al = ALIGNERS[name].align(student, teacher)
        assert_causal(al, student, teacher)
        assert al.mask.sum() > 0.5 * text_mask(student).sum()
    for tok in real_tokenizers.values():
        same = tokenize(tok, texts, add_bos=True, max_length=256)
        assert_identity(ALIGNERS[name].align(same, same), same)


def dense_keeps_rows(m: torch.Tensor) -> bool:
    """The definition: m [B, Ts, Tt] is the identity on some rows and zero elsewhere."""
    ts, tt = m.shape[1:]
    if ts > tt:
        return False
    diag = m.diagonal(dim1=1, dim2=2)
    if not ((diag == 0) | (diag == 1)).all() or m[:, :, ts:].any():
        return False
    return torch.equal(m[:, :, :ts], torch.diag_embed(diag))


@settings(max_examples=200, deadline=None)
@given(
    ts=st.integers(1, 6),
    tt=st.integers(1, 8),
    k=st.integers(1, 3),
    kind=st.sampled_from(["identity", "shifted", "soft"]),
    seed=st.integers(0, 10_000),
)
def test_keeps_rows_matches_the_dense_map(ts: int, tt: int, k: int, kind: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(2, ts, generator=g) > 0.3
    own = torch.arange(ts).expand(2, ts)
    if kind == "identity":  # a shared tokenizer: own position or nothing
        index = own[..., None].expand(2, ts, k).clone()
        weight = torch.zeros(2, ts, k)
        weight[..., 0] = keep.float()
    elif kind == "shifted":
        index = (own + 1)[..., None].expand(2, ts, k).clone()
        weight = torch.zeros(2, ts, k)
        weight[..., 0] = keep.float()
    else:
        index = torch.randint(0, tt, (2, ts, k), generator=g)
        weight = torch.rand(2, ts, k, generator=g)
        weight = weight / weight.sum(-1, keepdim=True) * keep[..., None]
    a = TokenAlignment(index, weight, keep)
    assert a.keeps_rows(tt) == dense_keeps_rows(a.matrix(tt))


@pytest.mark.parametrize("shared", [True, False])
def test_gather_on_the_device_reads_nothing_from_it(shared: bool) -> None:
    # on the meta device every read of a value raises: gather decides from the host copy
    ts, tt = 5, 5 if shared else 7
    own = torch.arange(ts).expand(2, ts)
    index = (own if shared else own.clamp(max=tt - 1) + 1)[..., None]
    a = TokenAlignment(index, torch.ones(2, ts, 1), torch.ones(2, ts, dtype=torch.bool))
    meta = torch.device("meta")
    x = torch.empty(2, 3, tt, 4, device=meta)
    out = a.to(meta).gather(x)
    assert out.shape == (2, 3, ts, 4) and out.device == meta
    host = a.gather(torch.randn(2, 3, tt, 4))
    assert host.shape == (2, 3, ts, 4)
