"""Open every input checkpoint and check that they are homologous (same tensors as the base)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from engine.dtypes import MERGEABLE
from engine.errors import CheckpointError, ShapeMismatchError
from engine.io.checkpoint import Checkpoint
from engine.io.header import short_repr
from engine.io.lora import is_adapter, open_model
from engine.slices import Slice, sliced_views
from engine.vocab import Resized, plan_resized, rows_problem

SHOW = 5  # offending tensors named in an error; the rest are counted


@dataclass(frozen=True)
class Inventory:
    """The base and the models, indexed and checked against each other."""

    base: Checkpoint
    models: tuple[Checkpoint, ...]
    vocab: str = "base"
    resized: dict[str, Resized] = field(default_factory=dict)  # embedding rows differ (engine.vocab)

    @property
    def input_bytes(self) -> int:
        return self.base.nbytes + sum(m.nbytes for m in self.models)


def take_inventory(base: Path, models: Sequence[Path], vocab: str = "base", slices: Sequence[Slice] = ()) -> Inventory:
    """Open `base` and `models` (model folders or LoRA adapters) and check each against the base.

    `vocab` ("base" or "union") decides which row-count differences of embedding-like tensors
    are merged (`engine.vocab`). With `slices`, the base and models are views of the slices'
    layer ranges (`engine.slices`) and `base` and `models` are not opened themselves.

    Raises:
        CheckpointError: a folder or file is unusable.
        ShapeMismatchError: a model lacks, adds or reshapes tensors of the base.
    """
    if slices:
        base_ckpt, *views = sliced_views(slices, _open_slice_source)
        opened = tuple(views)
    else:
        base_ckpt = _open_full(base, "cannot be the base (its weights are deltas of another model); give the full "
                               "model it was trained from as the base")  # fmt: skip
        opened = tuple(open_model(m, base_ckpt) for m in models)
    for model in opened:
        check_homology(base_ckpt, model, vocab)
    return Inventory(base_ckpt, opened, vocab, plan_resized(vocab, (base_ckpt, *opened)))


def _open_slice_source(folder: Path) -> Checkpoint:
    return _open_full(folder, "cannot be a slice source (its layers are deltas of another model); "
                      "merge it into its base first, or list it under 'models' without slices")  # fmt: skip


def _open_full(folder: Path, why: str) -> Checkpoint:
    """A folder that must hold a whole model: an adapter is refused saying `why`, adapter weights
    without their config are named as such (engine.io.lora.open_model)."""
    if is_adapter(folder):
        raise CheckpointError(f"{folder}: a LoRA adapter {why}")
    return open_model(folder, None)


def check_homology(base: Checkpoint, model: Checkpoint, vocab: str = "base") -> None:
    """Raise `ShapeMismatchError` listing how `model`'s tensors differ from `base`'s.

    Float dtypes may differ (every input is computed in float32); anything else must match,
    except the row counts of embedding-like tensors, which `vocab` may merge.
    """
    problems: list[str] = []
    for name, b in base.tensors.items():
        m = model.tensors.get(name)
        if m is None:
            problems.append(f"{short_repr(name)} missing")
        elif m.shape != b.shape:
            why = rows_problem(name, b.shape, m.shape, (b.dtype, m.dtype), vocab)
            if why is not None:
                hint = f" ({why})" if why else ""
                problems.append(f"{short_repr(name)} shape {list(m.shape)} vs base {list(b.shape)}{hint}")
        elif m.dtype != b.dtype and not (m.dtype in MERGEABLE and b.dtype in MERGEABLE):
            problems.append(f"{short_repr(name)} dtype {m.dtype} vs base {b.dtype}")
    problems += [f"{short_repr(name)} not in base" for name in model.tensors if name not in base.tensors]
    if problems:
        more = f" and {len(problems) - SHOW} more" if len(problems) > SHOW else ""
        raise ShapeMismatchError(
            f"{model.folder}: not homologous with base {base.folder}: {len(problems)} tensor(s) differ: "
            f"{'; '.join(problems[:SHOW])}{more}"
        )
