"""Task arithmetic (Ilharco et al., 2023, "Editing Models with Task Arithmetic").

θ = θ_base + λ · Σ wₘ δₘ with δₘ = θₘ − θ_base, optionally with Σ wₘ δₘ divided by Σ wₘ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.methods.base import (
    LAMBDA,
    WEIGHT,
    Chunk,
    Method,
    Stats,
    TensorParams,
    normalize_param,
    safe_divisor,
    scale_,
    weighted_sum_,
)


def deltas_(base: torch.Tensor, models: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """δₘ = θₘ − θ_base in float32, computed in place over the (scratch) model chunks."""
    return [m.sub_(base) for m in models]


def add_to_base_(base: torch.Tensor, mixed: torch.Tensor, lam: float) -> torch.Tensor:
    """θ_base + λ · mixed, in place over `mixed`; λ = 1 skips the (exact) multiply."""
    return scale_(mixed, lam).add_(base)


class TaskArithmetic(Method):
    name = "task_arithmetic"
    params = (WEIGHT, LAMBDA, normalize_param(False))

    def apply(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> torch.Tensor:
        weights = p.per_model("weight")
        mixed = weighted_sum_(deltas_(base, models), weights)
        if p.flag("normalize"):
            mixed /= safe_divisor(sum(weights))
        return add_to_base_(base, mixed, p.number("lambda"))
