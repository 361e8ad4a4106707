"""DELLA (Deep et al., 2024, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling"): MagPrune, then TIES-style merging.

MagPrune (mergekit's `della_magprune`): within each row of δₘ, rank the magnitudes from smallest
(rank 0) to largest (rank w − 1) and give element i the keep probability
    pᵢ = (d − ε) + rankᵢ / (w − 1) · 2ε,
so that larger deltas are kept more often and the mean probability is the density d. Each
element is kept or dropped by the keyed stream of (seed, tensor, model) at its flat index
(`KeyedRng.keep_where`), and with `rescale` a survivor is divided by its own pᵢ, so that
E[δ̂ᵢ] = δᵢ (the paper's rescale). Then
- della: TIES sign election and disjoint merge of wₘ δ̂ₘ (normalize true by default);
- della_linear: Σ wₘ δ̂ₘ, optionally divided by Σ wₘ (normalize false by default);
and θ = θ_base + λ · merged.

Choices where mergekit is silent or differs:
- Equal magnitudes in a row are ranked by flat index (a stable sort), so the mask is a pure
  function of the data and the seed.
- A row is a slice along dim 0, all its elements (mergekit ranks along dim 1, which is the
  same for 2-D weights). A 1-D or 0-D tensor has rows of one element here, which keep with
  probability d (mergekit ranks a 1-D tensor as one row; with rows of one element it divides
  0 by 0). Ranking a whole 1-D tensor would need it in one piece whatever the budget.
- ε must leave every probability in (0, 1]: d − ε > 0 and d + ε <= 1 (mergekit asks d + ε < 1).
- Density 1 keeps the delta whole, as in mergekit, and ε is then not checked.
- Current mergekit rescales by the L1 norm instead; this follows the paper (1 / pᵢ).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from engine.errors import SpecError
from engine.methods.base import (
    DENSITY,
    LAMBDA,
    WEIGHT,
    Chunk,
    ParamDef,
    ParamValue,
    Stats,
    TensorParams,
    div_,
    normalize_param,
    scale_,
)
from engine.methods.dare import RESCALE
from engine.methods.steps import SET, Step, fused
from engine.methods.task_arithmetic import DeltaMerge, deltas_, merge_weighted_
from engine.stats import pairwise
from engine.stats.topk import magnitude_key


def _non_negative(v: ParamValue) -> str | None:
    return None if 0.0 <= float(v) < float("inf") else f"must be a finite number >= 0, got {v}"


EPSILON = ParamDef("epsilon", 0.15, per_model=True, check=_non_negative)
_LOW32 = (1 << 32) - 1
_PART_MIN = 1 << 16  # elements: below this a sorting thread costs more than it saves


def row_order(key: torch.Tensor) -> torch.Tensor:
    """Each row's positions from smallest key to largest, equal keys by position. (rows, w) int32 -> int64.

    The keys are |δ| as int32 bits (`magnitude_key`, which orders as the value), and a stable
    sort of them is what the ranks need. Packing the key above the position makes every int64
    unique, so any sort is stable: on CPU numpy's (vectorised, x86-simd-sort) sorts them 4-5x
    faster than `torch.sort(stable=True)` sorts the floats, and parts of the rows go to threads
    (numpy lets go of the GIL while it sorts). A NaN ranks above infinity; where among other
    NaNs does not matter, as it stays NaN whether kept or dropped.
    """
    rows, w = key.shape
    packed = key.to(torch.int64).bitwise_left_shift_(32).bitwise_or_(torch.arange(w, device=key.device))
    if key.device.type != "cpu":
        return torch.sort(packed, dim=1).values.bitwise_and_(_LOW32)
    rows_np = packed.numpy()  # shares memory: sorting its rows sorts `packed`
    parts = min(torch.get_num_threads(), rows, max(packed.numel() // _PART_MIN, 1))
    cuts = [rows * i // parts for i in range(parts + 1)]
    list(_sorters().map(lambda a, b: rows_np[a:b].sort(axis=1), cuts[:-1], cuts[1:]))
    return packed.bitwise_and_(_LOW32)


@functools.cache
def _sorters() -> ThreadPoolExecutor:
    """The threads every row sort of the process shares (made on first use)."""
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="leanmerge-sort")


def keep_probabilities(delta: torch.Tensor, row_numel: int, density: float, epsilon: float) -> torch.Tensor:
    """pᵢ = (d − ε) + rank / (w − 1) · 2ε per element of whole rows; rows of one element get d. (n,) -> (n,).

    The w probabilities of a row are computed once, in rank order, and scattered to the
    elements holding those ranks."""
    if row_numel == 1:
        return torch.full_like(delta, density)
    rows = delta.view(-1, row_numel)
    by_rank = div_(torch.arange(row_numel, dtype=torch.float32, device=delta.device), row_numel - 1)
    by_rank.mul_(2).mul_(epsilon).add_(density - epsilon)
    order = row_order(magnitude_key(rows))
    return torch.empty_like(rows).scatter_(1, order, by_rank.expand_as(rows)).view(-1)


def magprune_(delta: torch.Tensor, model: int, density: float, epsilon: float, rescale: bool, c: Chunk) -> torch.Tensor:
    """MagPrune in place on a chunk of whole rows: keep each element with its pᵢ, divide by pᵢ.

    On the CPU the C does it all (`_fused.magprune`: the rows' ranks, probabilities and keep test
    on the process's one thread pool, the same bytes); a GPU, or an install without the C, takes
    the torch ops below."""
    if density >= 1.0:
        return delta
    kernel = pairwise.fused_for([delta]) if c.row_numel > 1 and delta.dtype == torch.float32 else None
    if kernel is not None and delta.is_contiguous():
        key = c.streams[model].key
        kernel.magprune(
            pairwise.as_buffer(delta), c.row_numel, density, epsilon, rescale, key, c.start, pairwise.c_threads()
        )
        return delta
    prob = keep_probabilities(delta, c.row_numel, density, epsilon)
    delta.mul_(c.streams[model].keep_where(c.start, prob))
    return delta.div_(prob) if rescale else delta


class _Della(DeltaMerge):
    params = (WEIGHT, DENSITY, EPSILON, LAMBDA, RESCALE, normalize_param(True))
    uses_rng = True
    row_aligned = True  # ranks are per row: a chunk holds whole rows

    def validate(self, p: TensorParams) -> None:
        for i, (d, e) in enumerate(zip(p.per_model("density"), p.per_model("epsilon"))):
            if d < 1.0 and not (d - e > 0.0 and d + e <= 1.0):
                raise SpecError(
                    f"{self.name}: model {i + 1}: 'epsilon' {e} with 'density' {d} gives keep probabilities "
                    f"from {d - e:g} to {d + e:g}, which must lie in (0, 1]; choose epsilon < min(density, 1 - density)"
                )

    def pruned_deltas_(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, c: Chunk
    ) -> list[torch.Tensor]:
        """δ̂ₘ per model (MagPrune), in place over the model chunks."""
        args = zip(deltas_(base, models), p.per_model("density"), p.per_model("epsilon"))
        return [magprune_(x, m, d, e, p.flag("rescale"), c) for m, (x, d, e) in enumerate(args)]

    def weighted_deltas_(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> list[torch.Tensor]:
        """wₘ · δ̂ₘ per model, in place over the model chunks."""
        return [scale_(x, w) for x, w in zip(self.pruned_deltas_(base, models, p, c), p.per_model("weight"))]

    def apply(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> torch.Tensor:
        """MagPrune, then on the CPU the weights, the mix and the base's add in one pass of the C
        (the program the other delta methods end with: same bytes as `merge_weighted_`), else torch."""
        pruned = self.pruned_deltas_(base, models, p, c)
        weights = p.per_model("weight")
        program = [Step(SET, m, None if w == 1.0 else w, m) for m, w in enumerate(weights, 1)]
        out = torch.empty_like(base)
        inputs = [base, *pruned]
        if all(x.is_contiguous() for x in inputs) and fused(inputs, [*program, *self.mix_steps(p, len(pruned))], out):
            return out
        weighted = [scale_(x, w) for x, w in zip(pruned, weights)]
        return merge_weighted_(base, weighted, weights, p, consensus=self.consensus)

    def sparsify_steps(self, m: int, p: TensorParams, stats: Stats) -> list[Step] | None:
        return None  # per-row ranks and keep probabilities: `apply` only


class Della(_Della):
    name = "della"
    consensus = True


class DellaLinear(_Della):
    name = "della_linear"
    params = (WEIGHT, DENSITY, EPSILON, LAMBDA, RESCALE, normalize_param(False))
