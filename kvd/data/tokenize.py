"""Tokenising one batch of texts for one model, with character offsets for alignment."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kvd.core.errors import KvdError
from kvd.core.types import TokenBatch


def tokenize(
    tokenizer: Any,
    texts: list[str],
    *,
    max_length: int | None = None,
    add_bos: bool = False,
    eos: Sequence[bool] = (),
) -> TokenBatch:
    """`texts` -> a right-padded TokenBatch.

    With `add_bos` the tokenizer's BOS token is put first (offsets (-1, -1): it covers no text);
    the rows flagged in `eos` end with its EOS token (the same). Special tokens and padding get
    offsets (-1, -1); `max_length` truncates on the right, leaving room for the BOS and EOS.
    """
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    ends = list(eos) or [False] * len(texts)
    if any(ends) and tokenizer.eos_token_id is None:
        raise KvdError("data.append_eos: the student's tokenizer has no EOS token")
    room = None if max_length is None else max_length - len(bos) - int(any(ends))
    enc = tokenizer(
        texts,
        add_special_tokens=False,
        return_offsets_mapping=True,
        truncation=room is not None,
        max_length=room,
    )
    tail = [tokenizer.eos_token_id]
    rows = [bos + list(ids) + tail * e for ids, e in zip(enc["input_ids"], ends, strict=True)]
    spans = [
        [(-1, -1)] * len(bos) + [tuple(s) for s in offs] + [(-1, -1)] * e
        for offs, e in zip(enc["offset_mapping"], ends, strict=True)
    ]
    width = max((len(r) for r in rows), default=0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    offsets = torch.full((len(rows), width, 2), -1, dtype=torch.long)
    for b, (row, span) in enumerate(zip(rows, spans, strict=True)):
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, : len(row)] = True
        if span:
            offsets[b, : len(span)] = torch.tensor(span, dtype=torch.long)
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids or [-1], dtype=torch.long))
    offsets[special | ~mask] = -1
    return TokenBatch(input_ids=ids, attention_mask=mask, offsets=offsets)
