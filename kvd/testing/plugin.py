"""kvd's pytest plugin (entry point `pytest11`: `kvd = "kvd.testing.plugin"`): fixtures for
testing kvd plugins, available in every test once kvd is installed.

- `kvd_plugins`: the process-wide plugins loaded afresh (built-ins and every installed entry
  point, `KVD_LOAD_PLUGINS` unset), and forgotten again after the test;
- `tiny_causal_lm`: `kvd.testing.tiny_causal_lm`, a factory of tiny random causal LMs;
- `kv_bundle`: a `kvd.testing.KVFactory`: `kv_bundle(...)` gives a `KVBundle`,
  `kv_bundle.fusion_input(...)` a `FusionInput`.

torch is imported when a fixture is first used, not when pytest loads the plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

from kvd.core.manager import ALLOWLIST_ENV, Plugins, get_plugins, reset_plugins

if TYPE_CHECKING:
    from kvd.spec.models import LoadedModel
    from kvd.testing.factories import KVFactory


@pytest.fixture
def kvd_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[Plugins]:
    """Fresh process-wide plugins with every installed entry point; reset after the test."""
    monkeypatch.delenv(ALLOWLIST_ENV, raising=False)
    reset_plugins()
    yield get_plugins()
    reset_plugins()


@pytest.fixture
def tiny_causal_lm() -> Callable[..., LoadedModel]:
    """`tiny_causal_lm(model_type="llama", layers=2, heads=4, kv_heads=2, head_dim=8, seed=0)`
    -> a `LoadedModel` with random weights and kvd's byte-level tokenizer."""
    from kvd.testing.factories import tiny_causal_lm as factory

    return factory


@pytest.fixture
def kv_bundle() -> KVFactory:
    """`kv_bundle(batch=, heads=, seq=, head_dim=, layers=, pad=)` -> a `KVBundle`;
    `kv_bundle.fusion_input(teachers=, ...)` -> a `FusionInput` with masked teachers."""
    from kvd.testing.factories import KVFactory

    return KVFactory()
