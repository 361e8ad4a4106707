"""Linear merge (model soups; Wortsman et al., 2022, "Model soups"): θ = Σ wₘ θₘ [/ Σ wₘ].

The base is used only as the template for names, shapes and files, and is never read; include
it among the models to average it in, as mergekit does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.methods import steps
from engine.methods.base import (
    WEIGHT,
    Chunk,
    Method,
    Stats,
    TensorParams,
    div_,
    normalize_param,
    safe_divisor,
    weighted_sum_,
)
from engine.methods.steps import Step


class Linear(Method):
    name = "linear"
    params = (WEIGHT, normalize_param(True))
    uses_base = False

    def apply(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> torch.Tensor:
        weights = p.per_model("weight")
        out = weighted_sum_(models, weights)
        if p.flag("normalize"):
            div_(out, safe_divisor(sum(weights)))
        return out

    def steps(self, p: TensorParams, stats: Stats, n_models: int) -> Sequence[Step]:
        """`apply` as a program (the base, stream 0, is never read)."""
        w = [None if x == 1.0 else x for x in p.per_model("weight")]
        program = [steps.set_(1, w[0]), *(steps.add(m, w[m - 1]) for m in range(2, n_models + 1))]
        if p.flag("normalize"):
            program.append(Step(steps.DIV, scale=safe_divisor(sum(p.per_model("weight")))))
        return program
