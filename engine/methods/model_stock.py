"""Model Stock (Jang et al., 2024, "Model Stock: All we need is just a few fine-tuned weights").

With k fine-tunes and cos θ the mean pairwise cosine between their deltas δₘ = θₘ − θ_base
(over the whole tensor; the paper's angle, averaged over pairs as mergekit does for k > 2),
    t = k·cos θ / (1 + (k − 1)·cos θ),   θ = t · mean(θₘ) + (1 − t) · θ_base.
Each cosine is δᵢ·δⱼ / max(‖δᵢ‖‖δⱼ‖, 1e-6), clamped to [−1, 1], as in mergekit. The dot
products and norms are summed in one fixed order in one reducer pass (`engine.stats.gram`), so t and the
merged bytes do not depend on the block size. Needs at least two models besides the base. Where 1 + (k − 1)·cos θ is exactly 0 (t would
be infinite) the base is kept (t = 0; mergekit 0.1.5 keeps it where |1 + (k − 1)·cos θ| < 1e-6).

`filter_wise: true` (mergekit's): one angle, and one t, per row of a 2-D tensor; a tensor whose
rows hold one element (1-D, 0-D) takes one angle for the whole tensor, as mergekit treats a
vector as one row. The chunks hold whole rows, so each row's norms and dot products are summed
inside its chunk, in float64 by halving over the row padded to a power of two
(`engine.methods.row_stock`). Differences from mergekit: an n×1 tensor gets one angle here (one
per element there) and a tensor of 3 or more dimensions one per dim-0 row (one per vector along
the last dimension there), since the chunks know rows, not shapes. mergekit computes each
row's norms, cosines and t in float32 (torch's sums), this in float64: on tiny float32 Llama-shaped
models 80.6% of the elements were bit-equal, 97.9% within 1 ulp, max 1.2e-7 (whole-tensor
model_stock, the same cause: 91.9% and 99.8%).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from engine.methods import row_stock, steps
from engine.methods.base import Chunk, Method, ParamDef, Reducer, Stats, TensorParams
from engine.methods.steps import Step
from engine.stats.gram import Gram
from engine.stats.pairwise import Pair

GRAM = "model_stock.gram"


FILTER_WISE = ParamDef("filter_wise", False, per_model=False)


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
    row_aligned = True  # filter_wise: a row's angle from its chunk (elementwise merges are unchanged)

    def reducers(self, p: TensorParams) -> Sequence[Reducer]:
        deltas, gram = [(m, 0) for m in range(1, len(p.models) + 1)], pairs(len(p.models))
        return (row_stock.VectorGram(GRAM, deltas, gram) if p.flag("filter_wise") else Gram(GRAM, deltas, gram),)

    def steps(self, p: TensorParams, stats: Stats, n_models: int) -> Sequence[Step] | None:
        if p.flag("filter_wise"):
            return None  # a t per row: `apply`
        return self.whole_steps(stats, n_models)

    def whole_steps(self, stats: Stats, n_models: int) -> Sequence[Step]:
        """The merge with one t for the whole tensor (from its Gram entries), as a program."""
        t = interpolation_ratio(stats[GRAM], n_models)
        mean = [steps.set_(1), *(steps.add(m) for m in range(2, n_models + 1)), Step(steps.DIV, scale=n_models)]
        return (*mean, Step(steps.MUL, scale=t), steps.add(0, 1.0 - t))  # t·mean + (1 − t)·θ_base

    def apply(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> torch.Tensor:
        if p.flag("filter_wise") and c.row_numel > 1:
            return row_stock.merge_rows(base, models, c.row_numel)
        return steps.run([base, *models], self.whole_steps(stats, len(models)))
