"""A multiple-choice cloze task built from held-out text, scored by log-likelihood per byte.

Each text is cut at the whitespace nearest its middle: the first part is the context, the rest
(starting with that whitespace) the true continuation. The distractors of an item are the
continuations of `choices - 1` other texts, drawn with `random.Random(seed)`, and the answer's
position among the choices is drawn too, so the task depends only on the texts and the seed.
A model picks the choice with the highest log-likelihood per UTF-8 byte of the continuation
given the context (per byte, so choices of different lengths and models with different
tokenizers are scored alike).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from kvd.data.tokenize import tokenize
from kvd.modeling.nll import next_token_nll


@dataclass(frozen=True)
class ClozeItem:
    """A context, its candidate continuations, and the index of the true one."""

    context: str
    choices: tuple[str, ...]
    answer: int


def cut(text: str) -> tuple[str, str] | None:
    """(context, continuation) split at the whitespace nearest the middle; None when the text
    has no inner whitespace."""
    middle = len(text) // 2
    spaces = [i for i, ch in enumerate(text) if ch.isspace() and 0 < i < len(text) - 1]
    if not spaces:
        return None
    at = min(spaces, key=lambda i: (abs(i - middle), i))
    context, continuation = text[:at], text[at:]
    if not context.strip() or not continuation.strip():
        return None
    return context, continuation


def build_items(texts: list[str], *, choices: int, seed: int) -> list[ClozeItem]:
    """One item per text that can be cut (texts are used in order); needs `choices` <= the number
    of such texts."""
    parts = [p for p in map(cut, texts) if p is not None]
    if choices < 2 or len(parts) < choices:
        return []
    rng = random.Random(seed)
    items = []
    for i, (context, continuation) in enumerate(parts):
        others = rng.sample([j for j in range(len(parts)) if j != i], choices - 1)
        options = [parts[j][1] for j in others]
        answer = rng.randrange(choices)
        options.insert(answer, continuation)
        items.append(ClozeItem(context, tuple(options), answer))
    return items


@torch.no_grad()
def continuation_scores(
    model: Any,
    tokenizer: Any,
    pairs: list[tuple[str, str]],
    *,
    batch_size: int,
    max_length: int,
    add_bos: bool,
    device: torch.device,
) -> list[float]:
    """Log-likelihood (nats) per UTF-8 byte of each continuation given its context.

    Every token that ends inside the continuation counts (a token straddling the cut included),
    divided by the continuation's byte length."""
    scores: list[float] = []
    for first in range(0, len(pairs), batch_size):
        chunk = pairs[first : first + batch_size]
        batch = tokenize(
            tokenizer, [c + x for c, x in chunk], max_length=max_length, add_bos=add_bos
        )
        ids = batch.input_ids.to(device)
        mask = batch.attention_mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask.long()).logits.float()
        starts = torch.tensor([len(c) for c, _ in chunk], device=device)
        ends = batch.offsets[:, 1:, 1].to(device)
        counted = mask[:, 1:] & mask[:, :-1] & (ends > starts[:, None])
        logp = -next_token_nll(logits, ids, counted)
        totals = (logp * counted).sum(dim=1).tolist()
        scores += [
            t / max(len(x.encode("utf-8")), 1) for t, (_, x) in zip(totals, chunk, strict=True)
        ]
    return scores


def cloze_correct(
    model: Any,
    tokenizer: Any,
    items: list[ClozeItem],
    *,
    batch_size: int,
    max_length: int,
    add_bos: bool,
    device: torch.device,
) -> list[bool]:
    """Whether the model ranks each item's true continuation first (ties go to the first)."""
    pairs = [(item.context, choice) for item in items for choice in item.choices]
    scores = continuation_scores(
        model,
        tokenizer,
        pairs,
        batch_size=batch_size,
        max_length=max_length,
        add_bos=add_bos,
        device=device,
    )
    out, at = [], 0
    for item in items:
        row = scores[at : at + len(item.choices)]
        out.append(max(range(len(row)), key=row.__getitem__) == item.answer)
        at += len(item.choices)
    return out
