"""An offline byte-level tokenizer for random tiny models: token id = byte value, plus specials."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from kvd.spec.geometry import TokenizerFacts, tokens_fingerprint

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIALS = (BOS, EOS, PAD)
VOCAB_SIZE = 256 + len(SPECIALS)


def _byte_symbols() -> list[str]:
    """The printable stand-in of every byte 0..255 used by byte-level BPE, in byte order."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return [table[b] for b in range(256)]


def byte_tokenizer() -> Any:
    """A `PreTrainedTokenizerFast` with ids 0..255 = bytes, 256 = BOS, 257 = EOS, 258 = PAD.

    Offsets are character spans of the text (a multi-byte character's bytes share its span).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(_byte_symbols())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )


@lru_cache(maxsize=1)
def byte_tokenizer_facts() -> TokenizerFacts:
    return TokenizerFacts(
        family="bytes", sha256=tokens_fingerprint([*_byte_symbols(), *SPECIALS]), adds_bos=True
    )
