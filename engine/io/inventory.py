"""Open every input checkpoint and check that they are homologous (same tensors as the base)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.dtypes import MERGEABLE
from engine.errors import ShapeMismatchError
from engine.io.checkpoint import Checkpoint, open_checkpoint
from engine.io.header import short_repr

SHOW = 5  # offending tensors named in an error; the rest are counted


@dataclass(frozen=True)
class Inventory:
    """The base and the models, indexed and checked against each other."""

    base: Checkpoint
    models: tuple[Checkpoint, ...]

    @property
    def input_bytes(self) -> int:
        return self.base.nbytes + sum(m.nbytes for m in self.models)


def take_inventory(base: Path, models: Sequence[Path]) -> Inventory:
    """Open `base` and `models` and check every model against the base.

    Raises:
        CheckpointError: a folder or file is unusable.
        ShapeMismatchError: a model lacks, adds or reshapes tensors of the base.
    """
    inv = Inventory(open_checkpoint(base), tuple(open_checkpoint(m) for m in models))
    for model in inv.models:
        check_homology(inv.base, model)
    return inv


def check_homology(base: Checkpoint, model: Checkpoint) -> None:
    """Raise `ShapeMismatchError` listing how `model`'s tensors differ from `base`'s.

    Float dtypes may differ (every input is computed in float32); anything else must match.
    """
    problems: list[str] = []
    for name, b in base.tensors.items():
        m = model.tensors.get(name)
        if m is None:
            problems.append(f"{short_repr(name)} missing")
        elif m.shape != b.shape:
            problems.append(f"{short_repr(name)} shape {list(m.shape)} vs base {list(b.shape)}")
        elif m.dtype != b.dtype and not (m.dtype in MERGEABLE and b.dtype in MERGEABLE):
            problems.append(f"{short_repr(name)} dtype {m.dtype} vs base {b.dtype}")
    problems += [f"{short_repr(name)} not in base" for name in model.tensors if name not in base.tensors]
    if problems:
        more = f" and {len(problems) - SHOW} more" if len(problems) > SHOW else ""
        raise ShapeMismatchError(
            f"{model.folder}: not homologous with base {base.folder}: {len(problems)} tensor(s) differ: "
            f"{'; '.join(problems[:SHOW])}{more}"
        )
