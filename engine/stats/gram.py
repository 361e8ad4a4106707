"""Gram entries Σ xᵢ·xⱼ over whole tensors, as one reducer pass (SLERP, model stock).

The vectors are given by the method as streams of the chunk (0 the base, m the m-th model) or
differences of two (the weights for SLERP, the deltas for model stock) and summed in one fixed
order (`PairwiseSums`), so the statistic, and every byte merged from it, is the same for any block
size, device or thread count. On the CPU the C reads them straight from the read buffers
(`raw_chunk`); elsewhere they are formed from the float32 chunks (`chunk`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from engine.budget import WORK_ARRAYS
from engine.methods.base import Chunk, Reducer, Stats, TensorParams
from engine.stats.pairwise import ALONE, GROUP, Pair, PairwiseSums, Vector, fused_for, step_size

ROWS = 8  # products summed side by side


class Gram(Reducer):
    """Puts `stats[name]`: {(i, j): Σ xᵢ·xⱼ} for the requested pairs, each a float64 sum in the
    order `PairwiseSums` fixes, up to ROWS of them side by side."""

    def __init__(self, name: str, vectors: Sequence[Vector], pairs: Sequence[Pair]) -> None:
        self.name, self.vectors, self.pairs = name, tuple(vectors), tuple(pairs)
        # `chunk` forms a difference in place over its model's float32 chunk (scratch)
        minuends = [a for a, b in self.vectors if b != ALONE]
        read = {b for _, b in self.vectors} | {a for a, b in self.vectors if b == ALONE}
        if 0 in minuends or len(set(minuends)) < len(minuends) or read & set(minuends):
            raise ValueError(f"{name}: a difference must overwrite a model's chunk no other vector reads: {vectors}")
        self.batches = [self.pairs[b : b + ROWS] for b in range(0, len(self.pairs), ROWS)]
        # float64 arrays of a torch-path step (`PairwiseSums._widened`): the vectors, the products
        self.arrays = max(max(pair) for pair in self.pairs) + 1 + len(self.batches[0])

    def start(self, p: TensorParams, stats: Stats, numel: int) -> Any:
        return [PairwiseSums(len(batch)) for batch in self.batches]

    def raw_chunk(self, acc: Any, raw: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk) -> bool:
        """On the CPU, with the C built and float32 or bfloat16 inputs: the C forms the vectors
        from the read buffers as it sums, so the chunk is never copied to float32."""
        if fused_for(raw) is None:
            return False
        for sums, batch in zip(acc, self.batches):
            sums.add_products(raw, batch, vectors=self.vectors)
        return True

    def chunk(
        self, acc: Any, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> None:
        streams = [base, *models]
        vecs = [streams[a] if b == ALONE else streams[a].sub_(streams[b]) for a, b in self.vectors]
        # The torch path's float64 copies and products live in the chunk's planned temporaries
        # (WORK_ARRAYS float32 arrays): a step is as long as they can hold.
        step = min(step_size(base.device), max(1, base.numel() * WORK_ARRAYS // 2 // self.arrays // GROUP) * GROUP)
        for sums, batch in zip(acc, self.batches):
            sums.add_products(vecs, batch, step)

    def finish(self, acc: Any, p: TensorParams, stats: Stats) -> dict[str, Any]:
        values = [v for sums in acc for v in sums.values()]
        return {self.name: dict(zip(self.pairs, values))}
