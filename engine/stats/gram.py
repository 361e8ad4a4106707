"""Gram entries Σ xᵢ·xⱼ over whole tensors, as one reducer pass (SLERP, model stock).

The vectors are derived from each chunk by the method (weights for SLERP, deltas for model
stock) and summed in one fixed order (`PairwiseSum`), so the statistic, and every byte merged
from it, is the same for any block size, device or thread count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from engine.methods.base import Chunk, Reducer, Stats, TensorParams
from engine.stats.pairwise import PairwiseSum, step_size, widen

# (base, models) -> the float32 vectors of the chunk; may overwrite the (scratch) models.
Vectors = Callable[[torch.Tensor, Sequence[torch.Tensor]], Sequence[torch.Tensor]]
Pair = tuple[int, int]


class Gram(Reducer):
    """Puts `stats[name]`: {(i, j): Σ xᵢ·xⱼ} for the requested pairs, each a pairwise float64 sum."""

    def __init__(self, name: str, vectors: Vectors, pairs: Sequence[Pair]) -> None:
        self.name, self.vectors, self.pairs = name, vectors, tuple(pairs)

    def start(self, p: TensorParams, stats: Stats, numel: int) -> Any:
        return {pair: PairwiseSum() for pair in self.pairs}

    def chunk(
        self, acc: Any, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> None:
        vecs = self.vectors(base, models)
        used = sorted({i for pair in self.pairs for i in pair})
        step = step_size(base.device)
        for s in range(0, base.numel(), step):
            wide = {i: widen(vecs[i][s : s + step], ("gram", i)) for i in used}  # once per vector
            for i, j in self.pairs:
                acc[(i, j)].add_products64(wide[i], wide[j])

    def finish(self, acc: Any, p: TensorParams, stats: Stats) -> dict[str, Any]:
        return {self.name: {pair: s.value() for pair, s in acc.items()}}
