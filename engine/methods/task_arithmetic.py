"""Task arithmetic (Ilharco et al., 2023, "Editing Models with Task Arithmetic").

θ = θ_base + λ · Σ wₘ δₘ with δₘ = θₘ − θ_base, optionally with Σ wₘ δₘ divided by Σ wₘ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.methods.base import (
    LAMBDA,
    WEIGHT,
    ChunkRandom,
    Method,
    TensorParams,
    normalize_param,
    safe_divisor,
    weighted_sum,
)


def deltas(base: torch.Tensor, models: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """δₘ = θₘ − θ_base, in float32."""
    return [m - base for m in models]


def add_to_base(base: torch.Tensor, mixed: torch.Tensor, lam: float) -> torch.Tensor:
    """θ_base + λ · mixed; λ = 1 skips the multiply so results match mergekit bit for bit."""
    if lam != 1.0:
        mixed = mixed * lam
    return base + mixed


class TaskArithmetic(Method):
    name = "task_arithmetic"
    params = (WEIGHT, LAMBDA, normalize_param(False))

    def apply(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, rng: ChunkRandom
    ) -> torch.Tensor:
        weights = p.per_model("weight")
        mixed = weighted_sum(deltas(base, models), weights)
        if p.flag("normalize"):
            mixed /= safe_divisor(sum(weights))
        return add_to_base(base, mixed, p.number("lambda"))
