"""leanmerge: memory-lean, out-of-core merging of homologous models (DARE and relatives).

Public API:
    merge(spec, output, ...)  run a merge and return its Report
    prepare(spec, ...)        open inputs and compute the Plan without reading tensor bytes
    MergeSpec, ModelRef       the merge description
    load_yaml_spec(path)      a mergekit-style YAML file -> MergeSpec
    EngineError and subclasses
"""

from __future__ import annotations

import gc
import os

__version__ = "0.1.0"

# torch's OpenMP threads spin after each parallel op, waiting for the next, unless told otherwise
# before torch loads: beside busy neighbours that spinning took the cores the work needed (a ties
# merge of 1.3 GB beside two `yes`: 409 s wall and 63 user-s; with passive waits 33 s and 4.1 s).
# The merge's own C threads block when idle; torch's now sleep too.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Importing the engine imports torch: some 250,000 objects that live as long as the process. The
# cyclic collector, started by their count, scanned that growing heap again and again, on the way
# in and after (1.2 s of a 4.2 s `leanmerge` start on 2 cores). So it pauses for the import, and
# what is alive then is frozen, out of every later collection's sight. The price: the import's
# own cyclic garbage (about 7,000 small objects, 0.7 MB) stays, as one collection to find it
# costs 0.25 s; garbage that was waiting before the import is collected first.
_collecting = gc.isenabled()
gc.collect()
gc.disable()
try:
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
finally:
    gc.freeze()
    if _collecting:
        gc.enable()

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
