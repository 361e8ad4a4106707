"""Layer slices (mergekit's `slices`): output layers taken from layer ranges of the inputs.

A slice lists sources, each a model folder and a `layer_range: [start, end)`; every source of
a slice spans the same number of layers. The output's layers are the slices' layers one after
the other, renumbered from 0: with slices of 24 and 8 layers, output layer 30 is layer
`start + 6` of the second slice's sources. One slice with one source per model and the full
range is the same as listing the models; `passthrough` with one source per slice stacks layers
of different models or repeats layers of one (a "frankenmerge").

Tensors outside the numbered layers follow mergekit: the embeddings (`engine.gradient`'s
pre-weights) come from the first slice's sources, every other one (final norm, `lm_head`) from
the last slice's.

The merge still sees a base and k models, each a **view**: a `Checkpoint` whose tensors are
output names pointing at the bytes of source tensors in other folders. So slicing costs no
copy and nothing else in the engine knows about it: the reader reads `TensorInfo`s wherever
they lie, homology and vocabulary checks compare views, and journals fingerprint their shards.
Role r of a slice (the base or model k) is the source at that position: the base is the source
whose model is `base_model`, the models the other sources in the order listed.

Parameter gradients are interpolated over each slice's own layers, as mergekit does: layer i
of a slice of n layers sits at t = i / (n − 1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import CheckpointError, SpecError
from engine.gradient import LAYER_RE, PRE_WEIGHT_RE, layer_index
from engine.io.checkpoint import Checkpoint
from engine.io.header import TensorInfo
from engine.paths import real_path


@dataclass(frozen=True)
class SliceSource:
    """Layers `[start, end)` of the model in `path`."""

    path: Path
    start: int
    end: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", real_path(self.path))

    @property
    def layers(self) -> int:
        return self.end - self.start

    def to_json(self) -> dict[str, Any]:
        return {"model": str(self.path), "layer_range": [self.start, self.end]}


@dataclass(frozen=True)
class Slice:
    """One run of output layers: where the base's and each model's layers come from."""

    base: SliceSource
    models: tuple[SliceSource, ...]

    def __post_init__(self) -> None:
        for s in (self.base, *self.models):
            if not 0 <= s.start < s.end:
                raise SpecError(f"{s.path}: layer_range [{s.start}, {s.end}] must satisfy 0 <= start < end")
        if len({s.layers for s in (self.base, *self.models)}) > 1:
            spans = ", ".join(f"{s.path.name} [{s.start}, {s.end}]" for s in (self.base, *self.models))
            raise SpecError(f"every source of a slice must span the same number of layers, got {spans}")

    @property
    def layers(self) -> int:
        return self.base.layers

    def role(self, r: int) -> SliceSource:
        """Role 0 is the base, role k > 0 model k − 1."""
        return self.base if r == 0 else self.models[r - 1]

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base.to_json(), "models": [m.to_json() for m in self.models]}


def check_slices(slices: Sequence[Slice], n_models: int) -> None:
    """Every slice must name a source for the base and for each of the `n_models` models."""
    for i, s in enumerate(slices):
        if len(s.models) != n_models:
            raise SpecError(
                f"slices[{i}] has {len(s.models)} model source(s) besides the base, slices[0] has {n_models}: "
                "every slice needs a source for each model"
            )


def position(name: str | None, slices: Sequence[Slice]) -> float:
    """A tensor's position t for parameter gradients: along its slice's layers (mergekit's rule)."""
    if name is None:
        return 0.0
    j = layer_index(name)
    if j is None:
        return 0.0 if PRE_WEIGHT_RE.search(name) else 1.0
    for s in slices:
        if j < s.layers:
            return j / (s.layers - 1) if s.layers > 1 else 1.0
        j -= s.layers
    return 1.0  # not an output layer: only reached for names outside the plan


def renumber(name: str, layer: int) -> str:
    """`name` with its layer index replaced by `layer`."""
    m = LAYER_RE.search(name)
    assert m is not None, name
    return f"{name[: m.start(1)]}{layer}{name[m.end(1) :]}"


def sliced_views(slices: Sequence[Slice], open_folder: Callable[[Path], Checkpoint]) -> tuple[Checkpoint, ...]:
    """One view per role (base first, then each model) of the sliced output's tensors.

    Raises:
        CheckpointError: a layer range reaches past a source model's layers.
    """
    opened: dict[Path, Checkpoint] = {}

    def get(p: Path) -> Checkpoint:
        if p not in opened:
            opened[p] = open_folder(p)
        return opened[p]

    return tuple(_view([s.role(r) for s in slices], get) for r in range(1 + len(slices[0].models)))


def _view(sources: Sequence[SliceSource], get: Callable[[Path], Checkpoint]) -> Checkpoint:
    """The output's tensors for one role, given its source in each slice."""
    first, last = get(sources[0].path), get(sources[-1].path)
    tensors: dict[str, TensorInfo] = {n: t for n, t in _outside_layers(first) if PRE_WEIGHT_RE.search(n)}
    out_layer = 0
    for i, src in enumerate(sources):
        by_layer = _by_layer(get(src.path).tensors.values())
        if src.end > len(by_layer):
            raise CheckpointError(
                f"{src.path}: slices[{i}] layer_range [{src.start}, {src.end}] reaches past its {len(by_layer)} layers"
            )
        for layer in range(src.start, src.end):
            tensors.update((renumber(t.name, out_layer), t) for t in by_layer[layer])
            out_layer += 1
    tensors.update((n, t) for n, t in _outside_layers(last) if not PRE_WEIGHT_RE.search(n))
    shards = tuple(dict.fromkeys(t.file for t in tensors.values()))
    return Checkpoint(sources[0].path, tensors, shards)


def _outside_layers(ckpt: Checkpoint) -> Iterable[tuple[str, TensorInfo]]:
    return ((n, t) for n, t in ckpt.tensors.items() if layer_index(n) is None)


def _by_layer(tensors: Iterable[TensorInfo]) -> list[list[TensorInfo]]:
    """Tensors grouped by layer index; a list as long as the model's layer count."""
    groups: dict[int, list[TensorInfo]] = {}
    for t in tensors:
        i = layer_index(t.name)
        if i is not None:
            groups.setdefault(i, []).append(t)
    return [groups.get(i, []) for i in range(1 + max(groups, default=-1))]


def slices_json(slices: Sequence[Slice]) -> list[dict[str, Any]]:
    return [s.to_json() for s in slices]


def output_layers(slices: Sequence[Slice]) -> int:
    return sum(s.layers for s in slices)
