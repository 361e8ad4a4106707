"""Model Breadcrumbs (Davari & Belilovsky, 2023, "Model Breadcrumbs: Scaling Multi-Task Model
Merging with Sparse Masks").

Each delta loses its largest-magnitude outliers and its smallest entries: of the n elements of
a tensor, the n_top = int(gamma · n) largest |δₘ| are dropped, then the smallest, so that
k = int(density · n) remain (mergekit's `magnitude_outliers`). In rank order (largest first,
equal magnitudes by lowest flat index) the kept ranks are [n_top, n_top + k): two exact top-k
cuts (`engine.stats.topk`), found in the same three passes. Then
- breadcrumbs: θ = θ_base + λ · Σ wₘ δ̂ₘ (optionally divided by Σ wₘ);
- breadcrumbs_ties: TIES sign election and disjoint merge on the δ̂ₘ.

Differences from mergekit: gamma = 0 keeps exactly the top-k (mergekit's `indices[n_bot:-0]`
keeps nothing); density + gamma > 1 is an error rather than silently shrinking gamma; ties at
either cut are resolved by flat index, not by an unstable sort. As in mergekit, density 1 keeps
the delta whole, gamma included. Defaults follow mergekit: gamma 0.01, normalize false.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.errors import SpecError
from engine.methods import steps
from engine.methods.base import (
    DENSITY,
    LAMBDA,
    WEIGHT,
    Chunk,
    ParamDef,
    ParamValue,
    Reducer,
    Stats,
    TensorParams,
    normalize_param,
    scale_,
)
from engine.methods.steps import Step
from engine.methods.task_arithmetic import DeltaMerge, deltas_
from engine.stats.topk import Cut, in_top, magnitude_key, topk_reducers

CUTS = "breadcrumbs.cuts"  # stats key: per model, the cut above the kept band, then the one below it


def _gamma_check(v: ParamValue) -> str | None:
    return None if 0.0 <= float(v) < 1.0 else f"must lie in [0, 1), got {v}"


GAMMA = ParamDef("gamma", 0.01, per_model=True, check=_gamma_check)


def band(density: float, gamma: float, numel: int) -> tuple[int, int]:
    """(n_top, n_top + k): the kept ranks, largest magnitude first; density 1 keeps all."""
    if density >= 1.0:
        return 0, numel
    k, n_top = int(density * numel), int(gamma * numel)
    n_top = min(n_top, numel - k)  # rounding guard: density + gamma <= 1 is checked up front
    return n_top, n_top + k


def _wants(p: TensorParams, numel: int) -> list[tuple[int, int]]:
    out = []
    for m, (d, g) in enumerate(zip(p.per_model("density"), p.per_model("gamma"))):
        lo, hi = band(d, g, numel)
        out += [(m, lo), (m, hi)]
    return out


def keep_band_(delta: torch.Tensor, outer: Cut, inner: Cut, start: int) -> torch.Tensor:
    """Zero, in place, what lies outside ranks [n_top, n_top + k): in `inner` and not in `outer`."""
    if outer == Cut.nothing() and inner == Cut.everything():
        return delta
    key = magnitude_key(delta)
    keep = in_top(key, inner, start)
    if outer != Cut.nothing():
        keep &= ~in_top(key, outer, start)
    return delta.mul_(keep)


class _Breadcrumbs(DeltaMerge):
    params = (WEIGHT, DENSITY, GAMMA, LAMBDA, normalize_param(False))

    def validate(self, p: TensorParams) -> None:
        for i, (d, g) in enumerate(zip(p.per_model("density"), p.per_model("gamma"))):
            if d < 1.0 and d + g > 1.0:
                raise SpecError(
                    f"{self.name}: model {i + 1}: 'gamma' {g} + 'density' {d} exceeds 1: there are not "
                    "enough elements left to drop the outliers and keep the density; lower gamma or density"
                )

    def reducers(self, p: TensorParams) -> Sequence[Reducer]:
        return topk_reducers(CUTS, _wants) if min(p.per_model("density")) < 1.0 else ()

    def weighted_deltas_(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> list[torch.Tensor]:
        """wₘ · δ̂ₘ per model, in place over the model chunks."""
        cuts = stats.get(CUTS) or [Cut.nothing(), Cut.everything()] * len(models)
        deltas = deltas_(base, models)
        return [
            scale_(keep_band_(d, cuts[2 * i], cuts[2 * i + 1], c.start), w)
            for i, (d, w) in enumerate(zip(deltas, p.per_model("weight")))
        ]

    def sparsify_steps(self, m: int, p: TensorParams, stats: Stats) -> list[Step] | None:
        """`keep_band_` of model m as a step."""
        cuts = stats.get(CUTS) or [Cut.nothing(), Cut.everything()] * m
        outer, inner = cuts[2 * m - 2], cuts[2 * m - 1]
        return [] if outer == Cut.nothing() and inner == Cut.everything() else [steps.top(inner, outer, m)]


class Breadcrumbs(_Breadcrumbs):
    name = "breadcrumbs"


class BreadcrumbsTies(_Breadcrumbs):
    name = "breadcrumbs_ties"
    consensus = True
