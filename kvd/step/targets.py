"""The teachers' half of a step: parameter-free targets at student positions (cacheable).

Per teacher: tokenise the batch texts, one no-grad forward capturing K/V of the teacher layers
the layer plan reads, keys to the rope aligner's space, layers blended by the plan, positions
mapped to the student's by the token aligner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvd.align.base import LayerPlan, TokenAligner
from kvd.align.rope import RopeAligner
from kvd.align.tokens import next_token_alignment
from kvd.align.vocab import TopK, VocabMap
from kvd.core.phases import phase
from kvd.core.types import TokenAlignment, TokenBatch
from kvd.data.tokenize import tokenize
from kvd.modeling.capture import capture_kv
from kvd.modeling.head import HeadRows, OutputHead
from kvd.modeling.nll import next_token_nll
from kvd.spec.models import LoadedModel


@dataclass
class TeacherRuntime:
    """A loaded teacher, its spec id and weight, and its layer plan onto the student."""

    id: str
    weight: float
    loaded: LoadedModel | None  # None when targets come from the offline teacher cache
    plan: LayerPlan
    add_bos: bool
    max_length: int | None = None
    vocab: VocabMap | None = None
    """Its logits onto the student's vocabulary (alignment.vocab), None to keep its own."""


@dataclass
class TeacherTargets:
    """One teacher's targets for one batch, at student positions.

    keys[j], values[j]: [B, Ht, Ts, Dt] for each student layer j the plan distils (keys in the
    rope aligner's space); mask: [B, Ts] bool, True where the student token is real and has a
    causally valid teacher token; logits: [B, Ts, Vt] aligned teacher logits or None;
    ce: [B] the teacher's mean next-token NLL per sequence on its own tokens, or None.
    The logits can instead be given by hidden [B, Tt, d] (the teacher's last hidden states at
    its own positions), the alignment that maps them and the teacher's head: the aligned logits
    are `alignment.gather(head(hidden))` (`dense_logits`; `logit_rows` for the row-wise losses).
    A teacher whose logits are mapped onto the student's vocabulary (TeacherRuntime.vocab) gives
    them as `top_k` alone (what the cache stores; `dense_logits()` is `top_k.dense()`, and the
    row-wise losses read it a chunk of rows at a time), valid where logit_mask [B, Ts] is True:
    where both tokenisations end at the same character.
    """

    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    mask: torch.Tensor
    logits: torch.Tensor | None = None
    ce: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    hidden: torch.Tensor | None = None
    alignment: TokenAlignment | None = None
    top_k: TopK | None = None
    logit_mask: torch.Tensor | None = None
    head: OutputHead | None = None
    _dense: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def logit_valid(self) -> torch.Tensor:
        """[B, Ts] bool: where the logit losses may read `logits`."""
        return self.mask if self.logit_mask is None else self.logit_mask

    @property
    def has_logits(self) -> bool:
        """Whether these targets give the teacher's logits (whole or as hidden states)."""
        return self.logits is not None or self.top_k is not None or self._hidden_form is not None

    @property
    def _hidden_form(self) -> tuple[torch.Tensor, TokenAlignment, OutputHead] | None:
        if self.hidden is None or self.alignment is None or self.head is None:
            return None
        return self.hidden, self.alignment, self.head

    def dense_logits(self) -> torch.Tensor | None:
        """The aligned logits [B, Ts, V]: `logits`, or computed from the hidden states by the
        teacher's head exactly as `teacher_targets` aligns the teacher's own logits."""
        if self.logits is not None:
            return self.logits
        if self._dense is None:  # made once: a loss that is not row-wise may ask again
            if self.top_k is not None:
                self._dense = self.top_k.dense()
            elif (form := self._hidden_form) is not None:
                hidden, alignment, head = form
                with torch.autocast(hidden.device.type, enabled=False):
                    self._dense = alignment.gather(head(hidden).unsqueeze(1)).squeeze(1)
        return self._dense

    def logit_rows(self) -> torch.Tensor | HeadRows | TopK | None:
        """The aligned logits for the row-wise losses: where the alignment only selects rows (a
        teacher with the student's tokenizer), made from the hidden states a chunk of rows at a
        time (HeadRows [B, Ts, V], the same values: the head works row by row); a mapped
        teacher's `top_k`, made dense a chunk of rows at a time; else `dense_logits()`."""
        if self.logits is None and self.top_k is not None:
            return self.top_k
        form = self._hidden_form
        if self.logits is None and form is not None:
            hidden, alignment, head = form
            if alignment.selects_rows(hidden.shape[1]):
                return HeadRows(alignment.gather(hidden.unsqueeze(1)).squeeze(1), head)
        return self.dense_logits()


@dataclass(frozen=True)
class MappedRows:
    """Where a mapped teacher's logits are read (host tensors): index [B, Ts] long, the flat
    teacher position b * Tt + t each student position reads (`next_token_alignment`); keep
    [B, Ts] bool, the positions a logit loss reads (both tokenisations end there, not padding);
    flat [N] long, index[keep] (row-major): the teacher positions the LM head runs on; local
    [B, Ts] long, each kept position's row in the head's [N, Vt] output (0 elsewhere)."""

    index: torch.Tensor
    keep: torch.Tensor
    flat: torch.Tensor
    local: torch.Tensor

    @staticmethod
    def of(student: TokenBatch, teacher: TokenBatch) -> MappedRows:
        nt = next_token_alignment(student, teacher)
        b, tt = teacher.input_ids.shape
        index = nt.index[..., 0] + torch.arange(b)[:, None] * tt
        keep = nt.mask & student.attention_mask.bool()
        flat = index[keep]
        local = torch.zeros_like(index)
        local[keep] = torch.arange(len(flat))
        return MappedRows(index, keep, flat, local)


def sequence_ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL per row: logits [B, T, V], ids [B, T], mask [B, T] -> [B]."""
    valid = mask[:, 1:] & mask[:, :-1]
    return next_token_nll(logits, ids, valid).sum(1) / valid.sum(1).clamp_min(1)


@torch.no_grad()
def teacher_targets(
    teacher: TeacherRuntime,
    texts: list[str],
    student: TokenBatch,
    *,
    token_aligner: TokenAligner,
    rope: RopeAligner,
    want_logits: bool,
    want_ce: bool,
    device: torch.device,
    head: OutputHead | None = None,
    want_kv: bool = True,
) -> TeacherTargets:
    """Targets of `teacher` for `texts`, whose student tokenisation is `student` (on CPU).
    want_kv=False (no loss reads K/V) records, un-rotates and aligns none. head (the teacher's,
    checked to give its logits): give wanted logits as hidden states, their alignment and this
    head (the compact form; see TeacherTargets), the LM head skipped unless CE needs it. A
    teacher with a vocabulary map gives its logits at `next_token_alignment`'s positions,
    mapped onto the student's vocabulary and kept to the map's top k; its LM head runs only on
    the positions a logit loss reads (MappedRows), unless CE needs all of them."""
    if teacher.loaded is None:
        raise RuntimeError(f"teacher {teacher.id!r} is not loaded (targets come from the cache)")
    with phase("teacher/tokenize"):
        batch = tokenize(
            teacher.loaded.tokenizer, texts, max_length=teacher.max_length, add_bos=teacher.add_bos
        )
    ids = batch.input_ids.to(device)
    mask = batch.attention_mask.to(device)
    model = teacher.loaded.model
    mapped = want_logits and teacher.vocab is not None
    as_hidden = want_logits and head is not None and not mapped
    read = MappedRows.of(student, batch) if mapped else None
    narrow = read is not None and not want_ce  # the LM head only on the rows the map reads
    with phase("teacher/forward"):
        cap = capture_kv(
            model,
            ids,
            mask,
            layers=teacher.plan.teacher_layers if want_kv else [],
            logits=want_ce or (want_logits and not as_hidden),
            rows=read.flat.to(device) if read is not None and narrow else None,
            hidden=as_hidden,
        )
    with phase("teacher/unrotate"):
        kv = rope.apply(cap.kv, model)
    with phase("teacher/align"):
        found = token_aligner.align(student, batch)
        alignment = found.to(device)
        keys = dict(zip(kv.layers, kv.keys, strict=True))
        values = dict(zip(kv.layers, kv.values, strict=True))
        out_k: dict[int, torch.Tensor] = {}
        out_v: dict[int, torch.Tensor] = {}
        if want_kv:
            for j, (k, v) in enumerate(
                zip(teacher.plan.apply(keys), teacher.plan.apply(values), strict=True)
            ):
                if k is not None and v is not None:
                    out_k[j] = alignment.gather(k)
                    out_v[j] = alignment.gather(v)
        logits = None
        if want_logits and not as_hidden and not mapped and cap.logits is not None:
            logits = alignment.gather(cap.logits.unsqueeze(1)).squeeze(1)
        ce = sequence_ce(cap.logits, ids, mask) if want_ce and cap.logits is not None else None
        real = student.attention_mask.to(device)
        valid = alignment.mask.to(device) & real
        if mapped:
            assert cap.logits is not None and teacher.vocab is not None and read is not None
            rows = read.local if narrow else read.index  # into [N, Vt], or [B * Tt, Vt]
            top = teacher.vocab.top_k(cap.logits, rows.to(device), read.keep)  # [B, Ts, k]
            logit_mask = read.keep.to(device)
            return TeacherTargets(out_k, out_v, valid, None, ce, top_k=top, logit_mask=logit_mask)
        if not as_hidden:  # cap.hidden is None too
            return TeacherTargets(out_k, out_v, valid, logits, ce)
        return TeacherTargets(
            out_k, out_v, valid, logits, ce, hidden=cap.hidden, alignment=alignment, head=head
        )
