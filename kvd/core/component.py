"""The Config pattern every component follows: a strict nested pydantic model per component.

    class MeanFusion(nn.Module):
        class Config(ComponentConfig):
            temperature: float = 1.0

        def __init__(self, config: Config, **sizes: int) -> None: ...

The spec keeps YAML flat (`fusion: {name: mean, temperature: 0.5}`); everything but the name is
validated against the component's own `Config`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class ComponentConfig(BaseModel):
    """Base of every component's options: unknown keys are errors, values are immutable, and
    numbers are finite (inf and NaN are errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def config_class(component: Any) -> type[ComponentConfig]:
    """The component's nested `Config`, or the empty base when it takes no options."""
    cls = getattr(component, "Config", ComponentConfig)
    if not (isinstance(cls, type) and issubclass(cls, ComponentConfig)):
        raise TypeError(f"{component!r}.Config must subclass kvd.component.ComponentConfig")
    return cls
