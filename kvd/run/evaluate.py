"""Language-model metrics that compare models with different tokenizers: bits per byte first."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kvd.data.tokenize import tokenize
from kvd.modeling.nll import next_token_nll


@dataclass
class LMMetrics:
    """Validation metrics of one model on one set of texts.

    bits_per_byte: summed NLL (bits) over the UTF-8 bytes of the predicted tokens' text;
    perplexity: exp(mean NLL per predicted token) (tokenizer-dependent);
    accuracy: next-token top-1 accuracy; nll: per-sequence summed NLL in nats.
    """

    bits_per_byte: float
    perplexity: float
    accuracy: float
    tokens: int
    bytes: int
    nll: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def span_bytes(text: str, offsets: torch.Tensor) -> torch.Tensor:
    """UTF-8 byte length of each token's character span; offsets [T, 2] -> [T] long."""
    prefix = [0]
    for ch in text:
        prefix.append(prefix[-1] + len(ch.encode("utf-8")))
    cum = torch.tensor(prefix, dtype=torch.long)
    start = offsets[:, 0].clamp(min=0)
    end = offsets[:, 1].clamp(min=0)
    return torch.where(offsets[:, 0] >= 0, cum[end] - cum[start], torch.zeros_like(start))


@torch.no_grad()
def evaluate_lm(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    *,
    batch_size: int,
    max_length: int,
    add_bos: bool,
    device: torch.device,
) -> LMMetrics:
    """Bits per byte, perplexity and accuracy of `model` on `texts` (each scored on its own)."""
    was_training = model.training
    model.eval()
    total_nll = 0.0
    total_tokens = 0
    total_bytes = 0
    correct = 0
    per_seq: list[float] = []
    for first in range(0, len(texts), batch_size):
        chunk = texts[first : first + batch_size]
        batch = tokenize(tokenizer, chunk, max_length=max_length, add_bos=add_bos)
        ids = batch.input_ids.to(device)
        mask = batch.attention_mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask.long()).logits.float()
        target = ids[:, 1:]
        valid = mask[:, 1:] & mask[:, :-1]
        nll = next_token_nll(logits, ids, valid)
        per_seq += nll.sum(dim=1).tolist()
        total_nll += float(nll.sum())
        total_tokens += int(valid.sum())
        correct += int(((logits[:, :-1].argmax(-1) == target) & valid).sum())
        for b, text in enumerate(chunk):
            counted = span_bytes(text, batch.offsets[b, 1:])[valid[b].cpu()]
            total_bytes += int(counted.sum())
    model.train(was_training)
    tokens = max(total_tokens, 1)
    return LMMetrics(
        bits_per_byte=total_nll / math.log(2) / max(total_bytes, 1),
        perplexity=math.exp(total_nll / tokens),
        accuracy=correct / tokens,
        tokens=total_tokens,
        bytes=total_bytes,
        nll=per_seq,
    )
