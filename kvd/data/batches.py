"""The training batches of one rank: its share of each global batch, tokenized for the student."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvd.core.runtime import Runtime
from kvd.core.types import TokenBatch
from kvd.data.packing import BatchStream, DataState, TextWindow
from kvd.data.tokenize import tokenize


class StudentBatches:
    """Every rank draws the same global batch of `batch_size * world` windows from one seeded
    stream and keeps the rows `rank::world`; `state` is where the stream stands (checkpoints)."""

    def __init__(
        self,
        windows: Sequence[TextWindow],
        tokenizer: Any,
        runtime: Runtime,
        *,
        batch_size: int,
        seq_len: int,
        add_bos: bool,
        seed: int,
        append_eos: bool = False,
    ) -> None:
        self.windows = windows
        self.tokenizer = tokenizer
        self.rt = runtime
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.add_bos = add_bos
        self.seed = seed
        self.append_eos = append_eos
        self.stream = BatchStream(windows, batch_size * runtime.world, seed=seed)

    @property
    def state(self) -> DataState:
        return self.stream.state

    def restore(self, state: DataState) -> None:
        """Continue from `state`: the batches the saved stream would have yielded next."""
        self.stream = BatchStream(
            self.windows, self.batch_size * self.rt.world, seed=self.seed, state=state
        )

    def next(self) -> tuple[list[str], list[str], TokenBatch]:
        """This rank's share of the next global batch: texts, task labels, student tokens
        (input_ids, attention_mask [B, T], B = batch_size; with `append_eos` a document's last
        window ends with EOS)."""
        batch = next(self.stream)
        texts = batch.texts[self.rt.rank :: self.rt.world]
        tasks = batch.tasks[self.rt.rank :: self.rt.world]
        ends = batch.ends[self.rt.rank :: self.rt.world] if self.append_eos else []
        tokens = tokenize(
            self.tokenizer, texts, max_length=self.seq_len, add_bos=self.add_bos, eos=ends
        )
        return texts, tasks, tokens
