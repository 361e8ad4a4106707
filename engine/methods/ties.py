"""TIES-Merging (Yadav et al., 2023, "TIES-Merging: Resolving Interference When Merging Models").

1. Trim: keep the k = int(density · n) largest |δₘ| of each tensor, per model, and zero the rest.
2. Elect: each element's sign is the sign of Σ wₘ δ̂ₘ.
3. Disjoint merge: only the models that agree with the elected sign contribute (`consensus`).

θ = θ_base + λ · merged. The top-k is exact and out of core (`engine.stats.topk`): three reducer
passes find the k-th largest magnitude; ties at the threshold are kept from the lowest flat
index up, so exactly k elements survive, the same for every block size. Density 1 keeps
everything. Defaults follow mergekit: normalize true, lambda 1.

Against mergekit 0.1.5 (`magnitude` + `get_mask("sum")`): the sign election (Σ wₘ δ̂ₘ >= 0 elects
+), the disjoint merge and the divisor (the agreeing weights' sum, 0 taken as 1) are the same
rules, and float32 inputs merge to the same bytes (3 float32 fine-tunes of a tiny Llama, density
0.5: 100%). What differs:
- Ties at the threshold: mergekit keeps the first k of `torch.argsort(descending=True)`, which is
  not stable (the order of equal magnitudes is whatever the sort leaves: no rule to match); here
  the lowest flat indices. bf16 deltas are few-bit numbers, so many magnitudes equal the
  threshold: on tiny bf16 Llama-shaped models 1.9% of elements did, and the order alone changed
  1.3% of the merged elements (each a kept or dropped delta, not an ulp).
- Precision: mergekit casts inputs to the config's `dtype` and does each op in it: δ = θₘ − θ_base
  rounded to bf16 (5.4% of those deltas were not exact in bf16; the rounding also moves
  magnitudes across the threshold), then wₘ·δ, the sum, the division and the add to the base
  each rounded to bf16. Here δ is float32 and the result is rounded once. On those models the
  deltas' rounding and the tie order explain all but 0.6% of the 5.5% of elements that differ
  (94.5% bit-equal); `--mergekit-rounding` reproduces the bf16 arithmetic.
- Tensors with fewer than 1/density elements: mergekit 0.1.5 keeps max(1, int(density · n)), here
  int(density · n) (k = 0 keeps nothing).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.methods import steps
from engine.methods.base import (
    DENSITY,
    LAMBDA,
    WEIGHT,
    Chunk,
    Reducer,
    Stats,
    TensorParams,
    normalize_param,
    scale_,
)
from engine.methods.steps import Step
from engine.methods.task_arithmetic import DeltaMerge, deltas_
from engine.stats.topk import Cut, in_top, magnitude_key, topk_reducers

TRIM = "ties.trim"  # stats key: one Cut per model


def top_k_count(density: float, numel: int) -> int:
    """mergekit's k: int(density · numel); density 1 keeps every element."""
    return numel if density >= 1.0 else int(density * numel)


def trim_(delta: torch.Tensor, cut: Cut, start: int) -> torch.Tensor:
    """Zero, in place, the elements of a delta chunk outside its tensor's top k."""
    if cut == Cut.everything():
        return delta
    return delta.mul_(in_top(magnitude_key(delta), cut, start))


def _wants(p: TensorParams, numel: int) -> list[tuple[int, int]]:
    return [(m, top_k_count(d, numel)) for m, d in enumerate(p.per_model("density"))]


class Ties(DeltaMerge):
    name = "ties"
    consensus = True
    params = (WEIGHT, DENSITY, LAMBDA, normalize_param(True))

    def reducers(self, p: TensorParams) -> Sequence[Reducer]:
        # Density 1 everywhere trims nothing: skip the three passes (and their reads).
        return topk_reducers(TRIM, _wants) if min(p.per_model("density")) < 1.0 else ()

    def weighted_deltas_(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> list[torch.Tensor]:
        cuts = stats.get(TRIM) or [Cut.everything()] * len(models)
        trimmed = [trim_(delta, cut, c.start) for delta, cut in zip(deltas_(base, models), cuts)]
        return [scale_(delta, w) for delta, w in zip(trimmed, p.per_model("weight"))]

    def sparsify_steps(self, m: int, p: TensorParams, stats: Stats) -> list[Step] | None:
        """`trim_` of model m as a step."""
        cut = (stats.get(TRIM) or [Cut.everything()] * m)[m - 1]
        return [] if cut == Cut.everything() else [steps.top(cut, Cut.nothing(), m)]
