"""Task arithmetic (Ilharco et al., 2023, "Editing Models with Task Arithmetic").

θ = θ_base + λ · Σ wₘ δₘ with δₘ = θₘ − θ_base, optionally with Σ wₘ δₘ divided by Σ wₘ.

`DeltaMerge` is the shape every delta-based method shares (mergekit's "generalized task
arithmetic"): sparsify each delta, weight it, mix the weighted deltas (a plain sum, or TIES
sign election and disjoint merge), add to the base. DARE, TIES, breadcrumbs and DELLA differ only
in how they sparsify (`weighted_deltas_`) and whether they elect signs (`consensus`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from engine.methods import steps
from engine.methods.base import (
    LAMBDA,
    WEIGHT,
    Chunk,
    Method,
    Stats,
    TensorParams,
    div_,
    normalize_param,
    safe_divisor,
    scale_,
    weighted_sum_,
)
from engine.methods.consensus import disjoint_merge_
from engine.methods.steps import Step


def deltas_(base: torch.Tensor, models: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """δₘ = θₘ − θ_base in float32, computed in place over the (scratch) model chunks."""
    return [m.sub_(base) for m in models]


def add_to_base_(base: torch.Tensor, mixed: torch.Tensor, lam: float) -> torch.Tensor:
    """θ_base + λ · mixed, in place over `mixed`; λ = 1 skips the (exact) multiply."""
    return scale_(mixed, lam).add_(base)


def merge_weighted_(
    base: torch.Tensor, weighted: Sequence[torch.Tensor], weights: Sequence[float], p: TensorParams, *, consensus: bool
) -> torch.Tensor:
    """θ_base + λ · mix(wₘ δ̂ₘ), in place over the (scratch) weighted deltas.

    mix is Σ (divided by Σ wₘ with `normalize`), or with `consensus` the TIES disjoint merge
    (divided by the agreeing models' Σ wₘ with `normalize`).
    """
    if consensus:
        mixed = disjoint_merge_(weighted, weights, p.flag("normalize"))
    else:
        mixed = weighted_sum_(weighted, [1.0] * len(weighted))
        if p.flag("normalize"):
            div_(mixed, safe_divisor(sum(weights)))
    return add_to_base_(base, mixed, p.number("lambda"))


class DeltaMerge(Method):
    """Sparsify, weight, mix, add to base; subclasses override `weighted_deltas_` and `consensus`."""

    consensus: ClassVar[bool] = False  # TIES sign election + disjoint merge instead of a sum

    def weighted_deltas_(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> list[torch.Tensor]:
        """wₘ · δ̂ₘ per model, in place over the model chunks; here δ̂ₘ = δₘ (nothing dropped)."""
        return [scale_(d, w) for d, w in zip(deltas_(base, models), p.per_model("weight"))]

    def apply(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> torch.Tensor:
        weighted = self.weighted_deltas_(base, models, p, stats, c)
        return merge_weighted_(base, weighted, p.per_model("weight"), p, consensus=self.consensus)

    def sparsify_steps(self, m: int, p: TensorParams, stats: Stats) -> list[Step] | None:
        """The steps that sparsify δₘ in register m, as `weighted_deltas_` does before weighting
        (none here); None where no program can (DELLA's per-row ranks)."""
        return []

    def steps(self, p: TensorParams, stats: Stats, n_models: int) -> Sequence[Step] | None:
        """`apply` as a program: register m holds wₘ δ̂ₘ, then the mix and the base's add."""
        weights = p.per_model("weight")
        program: list[Step] = []
        for m in range(1, n_models + 1):
            sparse = self.sparsify_steps(m, p, stats)
            if sparse is None:
                return None
            program += [steps.set_(m, reg=m), Step(steps.SUB, 0, reg=m), *sparse]
            if weights[m - 1] != 1.0:
                program.append(Step(steps.MUL, scale=weights[m - 1], reg=m))
        return [*program, *self.mix_steps(p, n_models)]

    def mix_steps(self, p: TensorParams, n_models: int) -> list[Step]:
        """The program's end, `merge_weighted_` of registers 1..n holding wₘ δ̂ₘ: the mix, λ, the base's add."""
        weights = p.per_model("weight")
        program: list[Step] = []
        if self.consensus:
            program.append(steps.elect(weights, p.flag("normalize")))
            acc = 0
        else:  # weighted_sum_ of the weighted deltas, into the first
            program += [Step(steps.ACC, m, reg=1) for m in range(2, n_models + 1)]
            acc = 1
            if p.flag("normalize"):
                program.append(Step(steps.DIV, scale=safe_divisor(sum(weights)), reg=1))
        if p.number("lambda") != 1.0:
            program.append(Step(steps.MUL, scale=p.number("lambda"), reg=acc))
        return [*program, Step(steps.ADD, 0, reg=acc)]


class TaskArithmetic(DeltaMerge):
    name = "task_arithmetic"
    params = (WEIGHT, LAMBDA, normalize_param(False))
