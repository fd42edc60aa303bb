"""Text windows cut for the student, and seeded, resumable batches of them.

Models with different tokenizers read the same text, so windows are cut in text: each document
becomes one or more windows whose student tokenization (plus a BOS when the student adds one)
has at most `seq_len` tokens. Cuts fall at the end of a student token, so a window's leading
whitespace stays with the word it precedes, and a document's windows concatenate to its text.
A window never spans two documents, so its task label is exact.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvd.core.errors import KvdError
from kvd.data.base import Document


@dataclass(frozen=True)
class TextWindow:
    """A piece of one document that fits the student's context."""

    text: str
    task: str
    doc_id: str
    ends_document: bool = False
    """The document's last window (data.append_eos puts the EOS token after it)."""


def token_room(tokenizer: Any, seq_len: int, *, add_bos: bool) -> int:
    """Text tokens a window may hold: `seq_len`, less one for the BOS the student adds."""
    return seq_len - int(add_bos and tokenizer.bos_token_id is not None)


def count_tokens(tokenizer: Any, texts: list[str]) -> list[int]:
    """Student tokens of each text, without special tokens (one batched tokenizer call)."""
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def pack_documents(
    documents: Sequence[Document],
    tokenizer: Any,
    *,
    seq_len: int,
    add_bos: bool,
    min_tokens: int = 16,
    append_eos: bool = False,
) -> list[TextWindow]:
    """Cut every document into windows of at most `seq_len` student tokens (BOS included,
    and with `append_eos` room for an EOS token after each window).

    Each document is tokenised once (batched); a document that fits is one window; a longer one
    is cut at student token ends and each piece is re-tokenised alone and shrunk until it fits,
    since a piece can tokenise differently from the same span inside the whole. Windows with
    fewer than `min_tokens` tokens (a document's short tail, a short document) are dropped.
    """
    room = token_room(tokenizer, seq_len, add_bos=add_bos) - int(append_eos)
    if room < 1:
        raise KvdError(
            f"data.seq_len: {seq_len} leaves no room for text beside the BOS and EOS tokens"
        )
    if not documents:
        return []
    enc = tokenizer(
        [d.text for d in documents], add_special_tokens=False, return_offsets_mapping=True
    )
    windows: list[TextWindow] = []
    for doc, offsets in zip(documents, enc["offset_mapping"], strict=True):
        if len(offsets) <= room:
            spans = [(0, len(doc.text), len(offsets))]
        else:
            ends = np.maximum.accumulate(np.asarray(offsets, dtype=np.int64)[:, 1])
            spans = _cut(tokenizer, doc.text, ends, room)
        windows += [
            TextWindow(doc.text[a:b], doc.task, doc.doc_id, b == len(doc.text))
            for a, b, n in spans
            if n >= min_tokens
        ]
    return windows


def _cut(tokenizer: Any, text: str, ends: np.ndarray, room: int) -> list[tuple[int, int, int]]:
    """(start, stop, tokens) of consecutive pieces of `text`; `ends[i]`: where token i ends."""
    spans: list[tuple[int, int, int]] = []
    start = 0
    while start < len(text):
        first = int(np.searchsorted(ends, start, side="right"))  # first token ending after start
        last = first + room
        while True:
            stop = len(text) if last >= len(ends) else int(ends[last - 1])
            (count,) = count_tokens(tokenizer, [text[start:stop]])
            if count <= room:
                break
            last = min(last, len(ends)) - (count - room)
            if last <= first:
                raise KvdError(
                    f"data.seq_len: a window of {room} text token(s) cannot hold the text "
                    f"at {text[start : start + 20]!r}",
                    hint="raise seq_len",
                )
        spans.append((start, stop, count))
        start = stop
    return spans


@dataclass(frozen=True)
class Batch:
    """Texts of one batch with their task labels and document ids."""

    texts: list[str]
    tasks: list[str]
    doc_ids: list[str]
    ends: list[bool]

    @classmethod
    def of(cls, windows: Sequence[TextWindow]) -> Batch:
        return cls(
            [w.text for w in windows],
            [w.task for w in windows],
            [w.doc_id for w in windows],
            [w.ends_document for w in windows],
        )


@dataclass(frozen=True)
class DataState:
    """Where a batch stream stands: the epoch and the index of the next window in its order."""

    epoch: int = 0
    position: int = 0


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The window order of one epoch: a permutation of range(n) fixed by (seed, epoch)."""
    order = list(range(n))
    random.Random(f"kvd-data:{seed}:{epoch}").shuffle(order)
    return order


class BatchStream:
    """Endless training batches: each epoch a fresh seeded shuffle, the last partial batch dropped.

    `state` is where the next batch starts; a stream built from a saved state yields exactly the
    batches the original stream would have yielded next.
    """

    def __init__(
        self,
        windows: Sequence[TextWindow],
        batch_size: int,
        *,
        seed: int,
        state: DataState | None = None,
    ) -> None:
        if not 0 < batch_size <= len(windows):
            raise KvdError(
                f"training.batch_size: {batch_size} needs at least as many training windows, "
                f"and there are {len(windows)}",
                hint="lower batch_size or add text",
            )
        self.windows = windows
        self.batch_size = batch_size
        self.seed = seed
        self.state = state or DataState()
        self._order = epoch_order(len(windows), seed, self.state.epoch)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Batch:
        epoch, position = self.state.epoch, self.state.position
        if position + self.batch_size > len(self.windows):
            epoch, position = epoch + 1, 0
            self._order = epoch_order(len(self.windows), self.seed, epoch)
        picked = self._order[position : position + self.batch_size]
        self.state = DataState(epoch, position + self.batch_size)
        return Batch.of([self.windows[i] for i in picked])


def fixed_batches(windows: Sequence[TextWindow], batch_size: int) -> Iterator[Batch]:
    """Batches in window order, the last one possibly short (for validation)."""
    for start in range(0, len(windows), batch_size):
        yield Batch.of(windows[start : start + batch_size])
