"""`import leanmerge`: the engine's public API under the name users install (the package is
`engine`; see its docstring). Names are looked up on first use, as in `engine`, so importing
this module does not import torch.

Example:
    >>> import leanmerge
    >>> spec = leanmerge.load_yaml_spec("merge.yaml")  # doctest: +SKIP
    >>> report = leanmerge.merge(spec, "merged", max_memory=8 << 30)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import engine
from engine import __version__, load

__all__ = [*engine.__all__, "__version__", "load"]


def __getattr__(name: str) -> Any:
    if name in engine.__all__:
        return getattr(engine, name)
    raise AttributeError(f"module 'leanmerge' has no attribute {name!r}")
