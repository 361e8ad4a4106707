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

from collections.abc import Sequence

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
    normalize_param,
    scale_,
)
from engine.methods.dare import RESCALE
from engine.methods.task_arithmetic import DeltaMerge, deltas_


def _non_negative(v: ParamValue) -> str | None:
    return None if float(v) >= 0.0 else f"must be >= 0, got {v}"


EPSILON = ParamDef("epsilon", 0.15, per_model=True, check=_non_negative)


def row_ranks(mag: torch.Tensor) -> torch.Tensor:
    """Rank of each element in its row, smallest magnitude 0; ties by position. (rows, w) -> float32."""
    rows, w = mag.shape
    order = torch.sort(mag, dim=1, stable=True).indices
    ranks = torch.empty(rows, w, dtype=torch.float32, device=mag.device)
    position = torch.arange(w, dtype=torch.float32, device=mag.device).expand(rows, w)
    return ranks.scatter_(1, order, position)


def keep_probabilities(delta: torch.Tensor, row_numel: int, density: float, epsilon: float) -> torch.Tensor:
    """pᵢ = (d − ε) + rank / (w − 1) · 2ε per element of whole rows; rows of one element get d. (n,) -> (n,)."""
    if row_numel == 1:
        return torch.full_like(delta, density)
    rank_norm = row_ranks(delta.view(-1, row_numel).abs()).div_(row_numel - 1).view(-1)
    return rank_norm.mul_(2).mul_(epsilon).add_(density - epsilon)


def magprune_(delta: torch.Tensor, model: int, density: float, epsilon: float, rescale: bool, c: Chunk) -> torch.Tensor:
    """MagPrune in place on a chunk of whole rows: keep each element with its pᵢ, divide by pᵢ."""
    if density >= 1.0:
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

    def weighted_deltas_(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> list[torch.Tensor]:
        """wₘ · δ̂ₘ per model, in place over the model chunks."""
        args = zip(deltas_(base, models), p.per_model("density"), p.per_model("epsilon"), p.per_model("weight"))
        return [scale_(magprune_(x, m, d, e, p.flag("rescale"), c), w) for m, (x, d, e, w) in enumerate(args)]


class Della(_Della):
    name = "della"
    consensus = True


class DellaLinear(_Della):
    name = "della_linear"
    params = (WEIGHT, DENSITY, EPSILON, LAMBDA, RESCALE, normalize_param(False))
