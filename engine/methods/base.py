"""What a merge method is: declared parameters plus a pure function over float32 chunks.

Methods never see files, blocks or devices: the executor hands `apply` flat float32 chunks of
the base and of every model (all on one device) and a `ChunkRandom` keyed to the chunk's flat
position, and casts what `apply` returns once, on write. Because `apply` is elementwise, the
result cannot depend on where the executor cut the tensor.

The model chunks are scratch copies that `apply` may overwrite: the arithmetic is memory-bound,
and in-place ops on cache-resident chunks run 2-4x faster than allocating a result per op
(bench/bench_steps.py). The base chunk is shared by every model and must not be changed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from engine.rng import KeyedRng

if TYPE_CHECKING:
    from engine.methods.steps import Step

ParamValue = float | bool | str  # str: one of a fixed set of choices (e.g. rescale_norm)
Stats = Mapping[str, Any]  # tensor-wide statistics from the reducers, by name


def _any(_: ParamValue) -> str | None:
    return None


@dataclass(frozen=True)
class ParamDef:
    """One method parameter: its default, whether each model may set its own, how to check it."""

    name: str
    default: ParamValue
    per_model: bool
    check: Callable[[ParamValue], str | None] = _any  # returns what is wrong, or None


def in_unit_interval(v: ParamValue) -> str | None:
    """Check for densities: a kept fraction in (0, 1]."""
    return None if 0.0 < float(v) <= 1.0 else f"must lie in (0, 1], got {v}"


WEIGHT = ParamDef("weight", 1.0, per_model=True)
DENSITY = ParamDef("density", 1.0, per_model=True, check=in_unit_interval)
LAMBDA = ParamDef("lambda", 1.0, per_model=False)


def one_of(*choices: str) -> Callable[[ParamValue], str | None]:
    """Check for string parameters that take one of `choices`."""

    def check(v: ParamValue) -> str | None:
        return None if v in choices else f"must be one of {', '.join(map(repr, choices))}, got {v!r}"

    return check


def normalize_param(default: bool) -> ParamDef:
    return ParamDef("normalize", default, per_model=False)


@dataclass(frozen=True)
class TensorParams:
    """Parameters resolved for one tensor: the globals, one mapping per model, and the base's
    own per-model parameters (used by passthrough, whose one model is the base)."""

    globals: Mapping[str, ParamValue]
    models: tuple[Mapping[str, ParamValue], ...]
    base: Mapping[str, ParamValue] = field(default_factory=dict)
    # True where the base stream is the first listed model rather than an origin to take deltas
    # from: a `base_optional` method in a config without base_model (`MergeSpec.base_is_model`)
    base_is_model: bool = False

    def per_model(self, name: str) -> list[float]:
        return [float(m[name]) for m in self.models]

    def flag(self, name: str) -> bool:
        return bool(self.globals[name])

    def number(self, name: str) -> float:
        return float(self.globals[name])

    def choice(self, name: str) -> str:
        return str(self.globals[name])


@dataclass(frozen=True)
class Chunk:
    """Where a chunk sits in its tensor, with the tensor's keyed random streams (one per model)."""

    streams: tuple[KeyedRng, ...]
    start: int  # flat index of the chunk's first element
    numel: int = 0  # elements in the whole tensor
    row_numel: int = 1  # elements per row; chunks of `row_aligned` methods hold whole rows
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    shape: tuple[int, ...] = ()  # the tensor's shape (per-fibre statistics: nuslerp's row modes)
    tensor: str = ""  # the tensor's name, for a method's error messages

    def keep(self, model: int, n: int, density: float) -> torch.Tensor:
        """0/1 float32 mask of the n elements of `model` from this chunk's start: 1 = kept.

        Float rather than bool because multiplying by it is 3x faster than by a bool mask.
        """
        mask = torch.empty(n, dtype=torch.float32, device=self.device)
        return self.streams[model].keep(self.start, n, density, mask_out=mask)

    def index(self, n: int) -> torch.Tensor:
        """Flat indices (int64) of the chunk's n elements, for index-based tie-breaking."""
        return torch.arange(self.start, self.start + n, device=self.device)


class Reducer(ABC):
    """One pass over every chunk of a tensor that computes a statistic exactly, dask-style:
    `start` an accumulator, fold each chunk into it with `chunk`, turn it into stats in `finish`.

    Chunks arrive in flat order. A reducer may overwrite the model chunks (scratch) but not base.
    """

    @abstractmethod
    def start(self, p: TensorParams, stats: Stats, numel: int) -> Any:
        """A fresh accumulator for a tensor of `numel` elements, given earlier passes' stats."""

    @abstractmethod
    def chunk(
        self, acc: Any, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> None:
        """Fold one chunk into `acc` (in place)."""

    def raw_chunk(self, acc: Any, raw: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk) -> bool:
        """Fold one chunk given as views of the read buffers (the inputs' dtypes, base first), if
        this reducer can: True if it did. The default cannot, and `chunk` then gets the float32
        copies; a reducer that reads the raw inputs itself saves the copies' pass over memory."""
        return False

    @abstractmethod
    def finish(self, acc: Any, p: TensorParams, stats: Stats) -> dict[str, Any]:
        """The statistics this pass adds, by name."""

    # True for a last pass whose statistics, after any chunk, are right for merging every chunk
    # folded so far (`so_far`): its blocks are then folded just before each is merged, on the
    # apply pass's reads, and the tensor is read once less (a merge from row 0 in one process).
    folds_ahead: bool = False

    def so_far(self, acc: Any, p: TensorParams, stats: Stats) -> dict[str, Any]:
        """Statistics right for merging the chunks folded so far (for `folds_ahead` passes)."""
        raise NotImplementedError(f"{type(self).__name__} does not fold ahead of the merge")

    # True for a pass (never the first) that the statistics before it may leave with nothing to
    # count (`needed`): the plan then counts its read as one that may not happen.
    skippable: bool = False

    def needed(self, p: TensorParams, stats: Stats) -> bool:
        """Whether this pass has anything to count, given the statistics before it (only a
        `skippable` pass may say no). Where not, the executor reads nothing for it and its
        statistics are `finish(start(...))`, no chunk folded."""
        return True


class Method(ABC):
    """A merge method: `apply` maps float32 chunks of base and models to the merged chunk."""

    name: ClassVar[str]
    params: ClassVar[tuple[ParamDef, ...]]
    uses_rng: ClassVar[bool] = False
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    row_aligned: ClassVar[bool] = False  # chunks must hold whole rows (per-row statistics)
    # False when `apply` and the reducers never look at the base's values (it is a template for
    # names and shapes): the executor then skips reading it, and `base` holds arbitrary numbers.
    # A config may then leave base_model out (the first model is the template), and a base listed
    # among the models is averaged in as one of them, as in mergekit.
    uses_base: ClassVar[bool] = True
    # True where mergekit makes base_model optional (nuslerp, multislerp): a config without one
    # gives the first listed model, with its parameters, as the base stream (`base_is_model`).
    base_optional: ClassVar[bool] = False
    # True where mergekit averages a base_model that `models` does not list in as one more model
    # (karcher: its inputs are every model of the config, the base included).
    base_joins: ClassVar[bool] = False

    def reducers(self, p: TensorParams) -> Sequence[Reducer]:
        """The passes to run over the whole tensor before `apply`; none for elementwise methods."""
        return ()

    @abstractmethod
    def apply(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> torch.Tensor:
        """Merge one chunk. base: (n,) float32; models: k scratch tensors (n,) float32 -> (n,) float32."""

    def steps(self, p: TensorParams, stats: Stats, n_models: int) -> Sequence[Step] | None:
        """The merge of a chunk as a fixed program of float32 ops (`engine.methods.steps`), equal
        to `apply`, where it is one: the CPU then runs it in C from the read buffers. None: `apply`
        only."""
        return None

    def validate(self, p: TensorParams) -> None:
        """Raise `SpecError` for combinations of parameters that no single `ParamDef.check` can see
        (e.g. density + gamma > 1). The message names the parameter and the model."""
        return None

    def param(self, name: str) -> ParamDef | None:
        return next((d for d in self.params if d.name == name), None)


def scale_(x: torch.Tensor, w: float) -> torch.Tensor:
    """x *= w in place; multiplying by 1.0 is exact, so it is skipped."""
    return x if w == 1.0 else x.mul_(w)


def weighted_sum_(terms: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ wₘ·xₘ accumulated in model order, overwriting the (scratch) terms; returns terms[0]."""
    acc = scale_(terms[0], weights[0])
    for x, w in zip(terms[1:], weights[1:]):
        acc += scale_(x, w)
    return acc


def div_(x: torch.Tensor, d: float) -> torch.Tensor:
    """x /= d in place, correctly rounded on every device.

    CUDA divides by a Python number as a multiplication by its reciprocal, one rounding more than
    the CPU's true division, so the last bit (and, through DELLA's keep probabilities, a mask
    decision) could differ; a divisor that is a tensor on the device takes the true division.
    """
    if x.device.type == "cpu":
        return x.div_(d)
    return x.div_(torch.tensor(d, dtype=x.dtype, device=x.device))


def safe_divisor(total: float) -> float:
    """A weight sum used as a divisor; mergekit's rule: near zero becomes 1 (no rescale)."""
    return 1.0 if abs(total) < 1e-8 else total
