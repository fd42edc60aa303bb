"""Test helpers for kvd plugin authors: the component contract, tiny models and synthetic KV.

    from kvd.testing import check_component

    def test_my_router_keeps_the_contract():
        check_component("fusions", "my_router", temperature=0.5)

Installed with kvd, `kvd.testing.plugin` is a pytest plugin (entry point `pytest11`) that gives
every test the fixtures `kvd_plugins`, `tiny_causal_lm` and `kv_bundle`. The helpers are
imported on first use, so loading the pytest plugin does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvd.testing.contract import ContractError, ContractReport, check_component
    from kvd.testing.factories import (
        KVFactory,
        fusion_input,
        kv_bundle,
        tiny_causal_lm,
        tiny_lm_config,
    )

_HOMES = {
    "ContractError": "contract",
    "ContractReport": "contract",
    "check_component": "contract",
    "KVFactory": "factories",
    "fusion_input": "factories",
    "kv_bundle": "factories",
    "tiny_causal_lm": "factories",
    "tiny_lm_config": "factories",
}

__all__ = [
    "ContractError",
    "ContractReport",
    "KVFactory",
    "check_component",
    "fusion_input",
    "kv_bundle",
    "tiny_causal_lm",
    "tiny_lm_config",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'kvd.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(f"kvd.testing.{_HOMES[name]}"), name)
