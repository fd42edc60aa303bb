"""Device choice and activation checkpointing across the torch / transformers versions a
cluster has (found on a real GPU: `cuda` without an index and transformers 5.17 both broke)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvd.core.runtime import resolve_device
from kvd.run.assemble import checkpoint_activations


def test_cuda_without_an_index_is_this_process_gpu() -> None:
    # torch.cuda.set_device(torch.device("cuda")) raises; under torchrun rank r uses cuda:r
    assert resolve_device("cuda", 3) == torch.device("cuda", 3)
    assert resolve_device("cuda:1", 3) == torch.device("cuda", 1)
    assert resolve_device("cpu", 3) == torch.device("cpu")


def test_auto_is_the_local_gpu_when_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", 2) == torch.device("cuda", 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", 2) == torch.device("cpu")


class OlderModel:
    """A transformers model before activation_checkpointing_enable existed (5.17, say)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Any = None) -> None:
        self.calls.append(gradient_checkpointing_kwargs)


def test_activation_checkpointing_on_older_transformers() -> None:
    model = OlderModel()
    checkpoint_activations(model)
    assert model.calls == [{"use_reentrant": False}]
    # this transformers' path (activation_checkpointing_enable): tests/test_capture.py checks
    # that layers are recomputed in backward and K/V gradients stay exact
