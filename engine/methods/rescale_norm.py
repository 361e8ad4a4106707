"""Norm-matching rescale for DARE (`rescale_norm`), as current mergekit rescales masked deltas
(its `rescaled_masked_tensor`; e.g. Deng et al., 2024, "DARE the Extreme" on why 1/d can
over-inflate a sparse delta).

Instead of dividing survivors by the density, the dropped delta δ̂ = m ⊙ δ is multiplied by
‖δ‖ / ‖m ⊙ δ‖ over the whole tensor, so the merged delta keeps the norm of the original:
- l1: Σ|δ| / Σ|m ⊙ δ|; l2: the same with Euclidean norms; linf: max|δ| / max|m ⊙ δ|.
If either norm is below 1e-7 the delta is left unscaled (mergekit's rule).

The norms need the whole tensor: one reducer pass recomputes each chunk's keyed mask (the same
one `apply` will draw) and sums in one fixed order (`PairwiseSums`), so the factor, and every
merged byte, is the same for any block size. mergekit sums in float32, which can move the factor's last bits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.methods.base import Chunk, Reducer, Stats, TensorParams
from engine.stats.pairwise import PairwiseSums

NORMS = ("l1", "l2", "linf")
FACTORS = "dare.rescale"  # stats key: per model, the factor (1.0 where nothing is dropped)
EPS = 1e-7


@dataclass
class _Norm:
    """One model's ‖δ‖ and ‖m ⊙ δ‖ so far."""

    before: PairwiseSums = field(default_factory=PairwiseSums)
    after: PairwiseSums = field(default_factory=PairwiseSums)
    max_before: float = 0.0
    max_after: float = 0.0

    def add(self, norm: str, delta: torch.Tensor, dropped: torch.Tensor) -> None:
        if norm == "l1":
            self.before.add(delta.abs())
            self.after.add(dropped.abs_())
        elif norm == "l2":
            self.before.add_products([delta], [(0, 0)])
            self.after.add_products([dropped], [(0, 0)])
        elif delta.numel():  # linf: a max is exact in any order
            self.max_before = max(self.max_before, float(delta.abs().max()))
            self.max_after = max(self.max_after, float(dropped.abs_().max()))

    def factor(self, norm: str) -> float:
        if norm == "linf":
            before, after = self.max_before, self.max_after
        else:
            root = math.sqrt if norm == "l2" else float
            before, after = root(self.before.value()), root(self.after.value())
        return 1.0 if before < EPS or after < EPS else before / after


class NormMatch(Reducer):
    """Puts `stats[FACTORS]`: per model, ‖δ‖ / ‖m ⊙ δ‖ in the chosen norm."""

    def __init__(self, norm: str) -> None:
        self.norm = norm

    def start(self, p: TensorParams, stats: Stats, numel: int) -> Any:
        return {m: _Norm() for m, d in enumerate(p.per_model("density")) if d < 1.0}

    def chunk(
        self, acc: Any, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> None:
        densities = p.per_model("density")
        for m, norm in acc.items():
            delta = models[m].sub_(base)
            norm.add(self.norm, delta, delta * c.keep(m, delta.numel(), densities[m]))

    def finish(self, acc: Any, p: TensorParams, stats: Stats) -> dict[str, Any]:
        return {FACTORS: tuple(acc[m].factor(self.norm) if m in acc else 1.0 for m in range(len(p.models)))}
