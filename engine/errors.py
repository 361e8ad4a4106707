"""The engine's error hierarchy.

Every failure a user can cause (a bad spec, a damaged file, too small a budget) raises a
subclass of `EngineError` whose message says what failed, where, the value and the fix.
`cli.py` turns these into one-line errors; any other exception is a bug and keeps its traceback.
The subclasses also derive from the matching builtin so that callers catching `ValueError`
or `OSError` keep working.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class SpecError(EngineError, ValueError):
    """The merge description (YAML or CLI flags) is invalid."""


class CheckpointError(EngineError, ValueError):
    """An input checkpoint cannot be used: missing, damaged or inconsistent."""


class HeaderError(CheckpointError):
    """A safetensors header is malformed (length, JSON, dtype, shape or offsets)."""


class ShapeMismatchError(CheckpointError):
    """The models are not homologous: tensor names, shapes or dtypes differ from the base."""


class BudgetError(EngineError, MemoryError):
    """The memory budget cannot hold even the smallest block."""


class OutputError(EngineError, OSError):
    """The output location cannot be written (exists, not writable, disk full)."""


class NonFiniteError(EngineError, ArithmeticError):
    """`--strict-finite`: a merged tensor holds NaN or Inf (from the inputs, or an overflow)."""


class ResumeError(EngineError, ValueError):
    """A run cannot be resumed: the journal does not match this spec and these inputs."""


class Interrupted(EngineError):
    """SIGINT/SIGTERM stopped a merge between blocks; its journal is synced and it can resume."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
