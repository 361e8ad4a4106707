"""Model Stock (Jang et al., 2024, "Model Stock: All we need is just a few fine-tuned weights").

With k fine-tunes and cos θ the mean pairwise cosine between their deltas δₘ = θₘ − θ_base
(over the whole tensor; the paper's angle, averaged over pairs as mergekit does for k > 2),
    t = k·cos θ / (1 + (k − 1)·cos θ),   θ = t · mean(θₘ) + (1 − t) · θ_base.
Each cosine is δᵢ·δⱼ / max(‖δᵢ‖‖δⱼ‖, 1e-6), clamped to [−1, 1], as in mergekit. The dot
products and norms are summed in one fixed order in one reducer pass (`engine.stats.gram`), so t and the
merged bytes do not depend on the block size. Needs at least two models besides the base.
mergekit's `filter_wise: true` (one angle per row) is not supported. Where 1 + (k − 1)·cos θ is
exactly 0 (t would be infinite) the base is kept (t = 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from engine.methods import steps
from engine.methods.base import Chunk, Method, ParamDef, ParamValue, Reducer, Stats, TensorParams
from engine.methods.steps import Step
from engine.stats.gram import Gram
from engine.stats.pairwise import Pair

GRAM = "model_stock.gram"


def _row_angles_unsupported(v: ParamValue) -> str | None:
    return "true (one angle per row) is not supported; use false" if v else None


FILTER_WISE = ParamDef("filter_wise", False, per_model=False, check=_row_angles_unsupported)


def pairs(k: int) -> list[Pair]:
    """(i, j) with i <= j: the squared norms and the pairwise dot products of k deltas."""
    return [(i, j) for i in range(k) for j in range(i, k)]


def interpolation_ratio(gram: Mapping[Pair, float], k: int) -> float:
    """t = k·cos / (1 + (k − 1)·cos) from the Gram entries of the k deltas."""
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            norms = math.sqrt(gram[(i, i)]) * math.sqrt(gram[(j, j)])
            cosines.append(min(max(gram[(i, j)] / max(norms, 1e-6), -1.0), 1.0))
    cos = sum(cosines) / len(cosines)
    denominator = 1.0 + (k - 1) * cos
    return k * cos / denominator if denominator != 0.0 else 0.0


class ModelStock(Method):
    name = "model_stock"
    params = (FILTER_WISE,)
    min_models = 2

    def reducers(self, p: TensorParams) -> Sequence[Reducer]:
        return (Gram(GRAM, [(m, 0) for m in range(1, len(p.models) + 1)], pairs(len(p.models))),)  # the deltas

    def steps(self, p: TensorParams, stats: Stats, n_models: int) -> Sequence[Step]:
        t = interpolation_ratio(stats[GRAM], n_models)
        mean = [steps.set_(1), *(steps.add(m) for m in range(2, n_models + 1)), Step(steps.DIV, scale=n_models)]
        return (*mean, Step(steps.MUL, scale=t), steps.add(0, 1.0 - t))  # t·mean + (1 − t)·θ_base

    def apply(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> torch.Tensor:
        return steps.run([base, *models], self.steps(p, stats, len(models)))
