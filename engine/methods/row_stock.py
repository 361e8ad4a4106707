"""Model stock with `filter_wise: true` (mergekit's): one angle, and one t, per row.

Each row's squared norms and dot products of the deltas are float64 sums of exact float64
products, added in one fixed order: the row is zero-padded to a power of two and halved (the
upper half added onto the lower until one term is left). A chunk holds whole rows
(`ModelStock.row_aligned`), so a row's sums are the same for every block size, device and
thread count. t per row follows `model_stock.interpolation_ratio` op for op, in float64 tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from engine.methods.base import Chunk, Stats, TensorParams, div_
from engine.stats.gram import Gram


class VectorGram(Gram):
    """The whole tensor's Gram entries, only where its rows hold one element (a 1-D or 0-D tensor
    takes one angle, as mergekit treats a vector as one row); other tensors skip the pass."""

    def raw_chunk(self, acc: Any, raw: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk) -> bool:
        return c.row_numel > 1 or super().raw_chunk(acc, raw, p, stats, c)

    def chunk(
        self, acc: Any, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> None:
        if c.row_numel == 1:
            super().chunk(acc, base, models, p, stats, c)


def row_sums(terms: torch.Tensor) -> torch.Tensor:
    """Σ of each row of float64 `terms` (rows, w) by halving over the row zero-padded to a power
    of two; a sum of zeros is +0. Overwrites nothing. -> (rows,) float64."""
    rows, w = terms.shape
    width = 1 << max(w - 1, 0).bit_length()
    x = torch.nn.functional.pad(terms, (0, width - w))
    while width > 1:
        width //= 2
        x = x[:, :width] + x[:, width : 2 * width]
    return x[:, 0] + 0.0


def row_ratios(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """t per row, k·cos / (1 + (k − 1)·cos) with cos the mean pairwise cosine of the rows of the
    k float32 deltas (rows, w); t = 0 where the denominator is 0. -> (rows,) float64."""
    k = len(deltas)
    wide = [d.double() for d in deltas]
    norms = [row_sums(x * x).sqrt_() for x in wide]
    total = torch.zeros(wide[0].shape[0], dtype=torch.float64, device=wide[0].device)
    for i in range(k):
        for j in range(i + 1, k):
            dot = row_sums(wide[i] * wide[j])
            total += (dot / (norms[i] * norms[j]).clamp_(min=1e-6)).clamp_(-1.0, 1.0)
    cos = total / (k * (k - 1) // 2)
    denominator = 1.0 + (k - 1) * cos
    return torch.where(denominator != 0.0, k * cos / denominator, 0.0)


def merge_rows(base: torch.Tensor, models: Sequence[torch.Tensor], row_numel: int) -> torch.Tensor:
    """t·mean(θₘ) + (1 − t)·θ_base with a t per row of the chunk (whole rows), in float32 as the
    whole-tensor program does: mean in model order, divided by k, times t, plus (1 − t)·θ_base."""
    rows = base.view(-1, row_numel)
    t = row_ratios([m.view(-1, row_numel) - rows for m in models])
    mean = models[0].view(-1, row_numel)
    for m in models[1:]:
        mean.add_(m.view(-1, row_numel))
    div_(mean, len(models))
    return mean.mul_(t.float()[:, None]).add_(rows * (1.0 - t).float()[:, None]).view(-1)
