"""Gram entries Σ xᵢ·xⱼ over whole tensors, as one reducer pass (SLERP, model stock).

The vectors are derived from each chunk by the method (weights for SLERP, deltas for model
stock) and summed in one fixed order (`PairwiseSums`), so the statistic, and every byte merged
from it, is the same for any block size, device or thread count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from engine.budget import WORK_ARRAYS
from engine.methods.base import Chunk, Reducer, Stats, TensorParams
from engine.stats.pairwise import GROUP, Pair, PairwiseSums, step_size

# (base, models) -> the float32 vectors of the chunk; may overwrite the (scratch) models.
Vectors = Callable[[torch.Tensor, Sequence[torch.Tensor]], Sequence[torch.Tensor]]


ROWS = 8  # products summed side by side


class Gram(Reducer):
    """Puts `stats[name]`: {(i, j): Σ xᵢ·xⱼ} for the requested pairs, each a float64 sum in the
    order `PairwiseSums` fixes, up to ROWS of them side by side."""

    def __init__(self, name: str, vectors: Vectors, pairs: Sequence[Pair]) -> None:
        self.name, self.vectors, self.pairs = name, vectors, tuple(pairs)
        self.batches = [self.pairs[b : b + ROWS] for b in range(0, len(self.pairs), ROWS)]
        # float64 arrays of a torch-path step (`PairwiseSums._widened`): the vectors, the products
        self.arrays = max(max(pair) for pair in self.pairs) + 1 + len(self.batches[0])

    def start(self, p: TensorParams, stats: Stats, numel: int) -> Any:
        return [PairwiseSums(len(batch)) for batch in self.batches]

    def chunk(
        self, acc: Any, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> None:
        vecs = self.vectors(base, models)
        # The torch path's float64 copies and products live in the chunk's planned temporaries
        # (WORK_ARRAYS float32 arrays): a step is as long as they can hold.
        step = min(step_size(base.device), max(1, base.numel() * WORK_ARRAYS // 2 // self.arrays // GROUP) * GROUP)
        for sums, batch in zip(acc, self.batches):
            sums.add_products(vecs, batch, step)

    def finish(self, acc: Any, p: TensorParams, stats: Stats) -> dict[str, Any]:
        values = [v for sums in acc for v in sums.values()]
        return {self.name: dict(zip(self.pairs, values))}
