"""Vocabulary alignment: a teacher's next-token distribution carried onto the student's vocabulary.

A teacher with another tokenizer predicts other tokens, so its logits cannot be compared with the
student's token by token. `first_token` maps every teacher token to the first student token of
the same text (teacher " import" -> the student's " import"; teacher " importlib" -> the
student's " import" if the student splits it " import" + "lib"), and gives the student, at each
position where both tokenisations end at the same character (kvd.align.tokens.
next_token_alignment), the teacher's probability of each student token starting there, kept to
the `top_k` most likely (the rest share the remaining mass evenly):

    p_s(a) = sum of p_t(t) over teacher tokens t whose text starts with student token a
             (renormalised over the mapped teacher tokens).

This keeps token identity, unlike ULD, which compares sorted probabilities. It is approximate
where the student would tokenise the continuation differently from the teacher token's text
alone (a teacher token that is a prefix of a longer student token). Teacher tokens whose text is
not whole characters (byte-level pieces of one UTF-8 character) and special tokens map to
nothing; their mass is left out. With the student's own vocabulary the map is None: the logits
are used as they are, at the token aligner's positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor

from kvd.align.base import Aligner
from kvd.core.component import ComponentConfig
from kvd.losses.rowwise import chunk_rows

FLOOR = 1e-30
"""Probability given to a student token that no teacher token maps to (log = -69): finite, so
a temperature-scaled softmax of the mapped log-probabilities stays defined."""


@dataclass(frozen=True)
class TopK:
    """A distribution over Vs tokens kept to its k most likely: values [..., k] their
    log-probabilities, index [..., k] long their ids; the other Vs - k tokens share the rest of
    the mass evenly."""

    values: Tensor
    index: Tensor
    size: int

    @property
    def shape(self) -> torch.Size:
        """The dense distribution's shape, [..., Vs]."""
        return torch.Size((*self.values.shape[:-1], self.size))

    def __getitem__(self, rows: slice) -> Tensor:
        """Rows of the flattened leading dims, dense: [n, Vs] (the row-wise losses read a
        chunk at a time, kvd.losses.rowwise.Rows, so the whole [..., Vs] is never made)."""
        k = self.values.shape[-1]
        flat = TopK(self.values.reshape(-1, k)[rows], self.index.reshape(-1, k)[rows], self.size)
        return flat.dense()

    def dense(self) -> Tensor:
        """[..., Vs] log-probabilities (float32)."""
        k = self.values.shape[-1]
        values = self.values.float()
        rest = (1 - values.exp().sum(dim=-1, keepdim=True)).clamp_min(FLOOR)
        fill = (rest / max(self.size - k, 1)).clamp_min(FLOOR).log()
        out = fill.expand(*values.shape[:-1], self.size).clone()
        return out.scatter_(-1, self.index.long(), values)


@dataclass(frozen=True)
class VocabMap:
    """index [Vt] long: the student token each teacher token maps to, -1 for none; size: Vs;
    k: the student tokens kept per position (`top_k`)."""

    index: Tensor
    size: int
    k: int

    def apply(self, logits: Tensor) -> Tensor:
        """Teacher logits [..., Vt] -> log-probabilities [..., Vs] over the student's vocabulary
        (float32): softmax, the mass of each teacher token added to its student token,
        renormalised over the mapped mass, log with FLOOR. One scatter_add reads the teacher's
        probabilities in place (unmapped ids go to a spare column Vs, dropped), in the order of
        the teacher ids, as index_select + index_add did, without their [..., Vt] copy."""
        probs = torch.softmax(logits.float(), dim=-1)
        target = self._targets.to(logits.device).expand_as(probs)
        out = probs.new_zeros(*probs.shape[:-1], self.size + 1).scatter_add_(-1, target, probs)
        out = out[..., : self.size].contiguous()
        out /= out.sum(dim=-1, keepdim=True).clamp_min(FLOOR)
        return out.clamp_min_(FLOOR).log_()

    @cached_property
    def _targets(self) -> Tensor:
        """[Vt] long: each teacher id's column in `apply`'s sum, Vs (the spare) for none."""
        return torch.where(self.index >= 0, self.index, self.size)

    def top_k(self, logits: Tensor, rows: Tensor | None = None, keep: Tensor | None = None) -> TopK:
        """Teacher logits [..., Vt] -> the k most likely student tokens of `apply` [..., k];
        rows [...] long: only those rows of logits.reshape(-1, Vt), and the result has their
        shape; keep (the result's leading shape) bool: only those rows are mapped, the others
        (padding, positions no loss reads) hold the uniform distribution (a host tensor: no
        device read). Computed a few rows at a time: `apply`'s float32 temporaries are
        [rows, Vt] each, which for 8 x 128 positions of a 151,936-token teacher were 0.6 GB
        apiece at once."""
        flat = logits.reshape(-1, logits.shape[-1])
        shape = (*(logits.shape[:-1] if rows is None else rows.shape), min(self.k, self.size))
        order = torch.arange(len(flat), device=flat.device) if rows is None else rows.reshape(-1)
        k = shape[-1]
        values = flat.new_full((len(order), k), -math.log(self.size), dtype=torch.float32)
        index = torch.arange(k, device=flat.device).repeat(len(order), 1)
        picked = torch.arange(len(order)) if keep is None else keep.reshape(-1).nonzero()[:, 0]
        picked = picked.to(flat.device)
        step = chunk_rows(flat.device, flat.shape[-1])
        for first in range(0, len(picked), step):
            at = picked[first : first + step]
            top = self.apply(flat.index_select(0, order[at])).topk(k, dim=-1)
            values[at], index[at] = top.values, top.indices
        return TopK(values.view(shape), index.view(shape), self.size)

    @property
    def coverage(self) -> float:
        """The fraction of teacher token ids that map to a student token."""
        return float((self.index >= 0).float().mean())


class VocabAligner(Aligner):
    """Maps a teacher's vocabulary onto the student's (`alignment.vocab`)."""

    stage: ClassVar[str] = "vocab"

    def map(
        self, teacher_tokenizer: Any, student_tokenizer: Any, teacher_vocab: int, student_vocab: int
    ) -> VocabMap | None:
        """The map of a teacher's logits [.., teacher_vocab] onto the student's [.., student_vocab];
        None to keep the teacher's own vocabulary."""
        raise NotImplementedError


class OwnVocab(VocabAligner):
    """Teacher logits stay in the teacher's vocabulary (`logit_kd` then needs the student's
    vocabulary; `uld` takes any)."""

    def map(
        self, teacher_tokenizer: Any, student_tokenizer: Any, teacher_vocab: int, student_vocab: int
    ) -> VocabMap | None:
        return None


class FirstTokenVocab(VocabAligner):
    """Each teacher token goes to the first student token of its text (module docstring); a
    teacher with the student's vocabulary keeps its logits as they are."""

    class Config(ComponentConfig):
        top_k: int = Field(128, ge=1)
        """Student tokens kept per position (the most likely; the others share the rest of the
        mass evenly): what the offline cache stores instead of a full distribution."""

    config: Config

    def map(
        self, teacher_tokenizer: Any, student_tokenizer: Any, teacher_vocab: int, student_vocab: int
    ) -> VocabMap | None:
        if teacher_vocab == student_vocab and same_vocabulary(teacher_tokenizer, student_tokenizer):
            return None
        return VocabMap(
            first_token_index(teacher_tokenizer, student_tokenizer, teacher_vocab, student_vocab),
            student_vocab,
            self.config.top_k,
        )


def same_vocabulary(a: Any, b: Any) -> bool:
    """Whether two tokenizers give every token string the same id."""
    return bool(a.get_vocab() == b.get_vocab())


def first_token_index(
    teacher_tokenizer: Any, student_tokenizer: Any, teacher_vocab: int, student_vocab: int
) -> Tensor:
    """[teacher_vocab] long: for each teacher id, the first student id of its decoded text; -1
    for special tokens, ids past the tokenizer, text that is not whole characters (U+FFFD), and
    where that first student id is the student's unknown token or past student_vocab."""
    n = min(len(teacher_tokenizer), teacher_vocab)
    texts = teacher_tokenizer.batch_decode([[i] for i in range(n)])
    special = set(teacher_tokenizer.all_special_ids or [])
    ids = [i for i, s in enumerate(texts) if s and "\ufffd" not in s and i not in special]
    firsts = student_tokenizer([texts[i] for i in ids], add_special_tokens=False)["input_ids"]
    unknown = student_tokenizer.unk_token_id
    index = torch.full((teacher_vocab,), -1, dtype=torch.long)
    for i, first in zip(ids, firsts, strict=True):
        if first and first[0] < student_vocab and first[0] != unknown:
            index[i] = first[0]
    return index
