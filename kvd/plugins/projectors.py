"""Built-in projectors, registered through the same hook as a third-party plugin's."""

from __future__ import annotations

from kvd import project
from kvd.core.hookspecs import Register, hookimpl


@hookimpl
def register_projectors(register: Register) -> None:
    register("identity", project.IdentityProjector)
    register("head_dim", project.HeadDimProjector)
    register("heads", project.HeadsProjector)
    register("head_dim_then_heads", project.HeadDimThenHeadsProjector)
    register("linear", project.LinearProjector)
    register("elastic_bottleneck", project.ElasticBottleneckProjector)
