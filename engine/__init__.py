"""leanmerge: memory-lean, out-of-core merging of homologous models (DARE and relatives).

Public API (also importable as `leanmerge`):
    merge(spec, output, ...)  run a merge and return its Report
    prepare(spec, ...)        open inputs and compute the Plan without reading tensor bytes
    MergeSpec, ModelRef       the merge description
    load_yaml_spec(path)      a mergekit-style YAML file -> MergeSpec
    EngineError and subclasses

The names are imported on first use (`load`), not by `import engine`: the engine imports torch
(~2 s and ~220 MB), which `leanmerge --help` and `--version` do not need.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import types
from typing import Any

__version__ = "0.1.0"

# torch's OpenMP threads spin after each parallel op, waiting for the next, unless told otherwise
# before torch loads: beside busy neighbours that spinning took the cores the work needed (a ties
# merge of 0.68 GB beside two `yes`: 409 s wall and 63 user-s; with passive waits 33 s and 4.1 s).
# The merge's own C threads block when idle; torch's now sleep too.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Where each public name lives.
_API = {
    **dict.fromkeys(
        (
            "BudgetError",
            "CheckpointError",
            "EngineError",
            "HeaderError",
            "OutputError",
            "ResumeError",
            "ShapeMismatchError",
            "SpecError",
        ),
        "engine.errors",
    ),
    **dict.fromkeys(("Report", "merge", "prepare"), "engine.merge"),
    **dict.fromkeys(("MergeSpec", "ModelRef", "load_yaml_spec"), "engine.spec"),
}
__all__ = sorted(_API)


def load() -> None:
    """Import the engine (and with it torch), with the cyclic collector paused.

    Importing torch makes some 250,000 objects that live as long as the process. The cyclic
    collector, started by their count, scanned that growing heap again and again, on the way in
    and after (1.2 s of a 4.2 s `leanmerge` start on 2 cores). So it pauses for the import, and
    what is alive then is frozen, out of every later collection's sight. The price: the import's
    own cyclic garbage (about 7,000 small objects, 0.7 MB) stays, as one collection to find it
    costs 0.25 s; garbage that was waiting before the import is collected first. The CLI calls
    this before it imports any engine module that imports torch.

    Binds every public name here: until then `engine.merge` (say) is found by `__getattr__`.
    """
    modules = sorted(set(_API.values()))
    if not all(m in sys.modules for m in modules):
        collecting = gc.isenabled()
        gc.collect()
        gc.disable()
        try:
            for module in modules:
                importlib.import_module(module)
        finally:
            gc.freeze()
            if collecting:
                gc.enable()
    for name, module in _API.items():
        globals()[name] = getattr(sys.modules[module], name)


def __getattr__(name: str) -> Any:
    """The public API, imported on first use."""
    if name not in _API:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    load()
    return globals()[name]


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


class _Engine(types.ModuleType):
    """This package, whose public names win over its submodules': importing `engine.merge` sets
    the attribute `merge` to the submodule, and `engine.merge` must stay the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if not (name in _API and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Engine
