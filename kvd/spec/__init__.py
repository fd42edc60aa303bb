"""The run spec and what it is built on: model geometry read without weights (config.json, GGUF
header, presets), the model source base class, and the pydantic run spec (`runspec`).

`from kvd.spec import RunSpec, load_spec, parse_spec, ...` is the public path of the run spec;
kvd's own modules import `kvd.spec.runspec`.
"""

from kvd.spec.runspec import (
    AlignerRef,
    AlignmentSpec,
    ComponentRef,
    DataRef,
    EvaluationSpec,
    FusionRef,
    LossRef,
    ModelRef,
    OutputSpec,
    ProjectorRef,
    RunSpec,
    StageSpec,
    StudentRef,
    TeacherRef,
    TrainingSpec,
    apply_overrides,
    json_schema,
    load_spec,
    parse_spec,
    read_yaml,
)

__all__ = [
    "AlignerRef",
    "AlignmentSpec",
    "ComponentRef",
    "DataRef",
    "EvaluationSpec",
    "FusionRef",
    "LossRef",
    "ModelRef",
    "OutputSpec",
    "ProjectorRef",
    "RunSpec",
    "StageSpec",
    "StudentRef",
    "TeacherRef",
    "TrainingSpec",
    "apply_overrides",
    "json_schema",
    "load_spec",
    "parse_spec",
    "read_yaml",
]
