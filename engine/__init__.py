"""leanmerge: memory-lean, out-of-core merging of homologous models (DARE and relatives).

Public API:
    merge(spec, output, ...)  run a merge and return its Report
    prepare(spec, ...)        open inputs and compute the Plan without reading tensor bytes
    MergeSpec, ModelRef       the merge description
    load_yaml_spec(path)      a mergekit-style YAML file -> MergeSpec
    EngineError and subclasses
"""

from __future__ import annotations

__version__ = "0.1.0"

from engine.errors import (  # noqa: E402
    BudgetError,
    CheckpointError,
    EngineError,
    HeaderError,
    OutputError,
    ResumeError,
    ShapeMismatchError,
    SpecError,
)
from engine.merge import Report, merge, prepare  # noqa: E402
from engine.spec import MergeSpec, ModelRef, load_yaml_spec  # noqa: E402

__all__ = [
    "BudgetError",
    "CheckpointError",
    "EngineError",
    "HeaderError",
    "MergeSpec",
    "ModelRef",
    "OutputError",
    "Report",
    "ResumeError",
    "ShapeMismatchError",
    "SpecError",
    "load_yaml_spec",
    "merge",
    "prepare",
]
