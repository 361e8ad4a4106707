"""TIES sign election and disjoint merge (Yadav et al., 2023, "TIES-Merging: Resolving
Interference When Merging Models"), shared by every *_ties method.

Each element's sign is elected as the sign of Σ wₘ δₘ (ties go to +, as mergekit does); only the
models whose weighted delta has that sign contribute, and with `normalize` their sum is divided
by the sum of their weights (a zero divisor becomes 1). A zero delta (for example one DARE
dropped) has sign 0 and so never agrees: it adds neither value nor weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def elect_sign(weighted: Sequence[torch.Tensor]) -> torch.Tensor:
    """+1 where Σ wₘ δₘ ≥ 0, else −1 (float32); summed in model order."""
    total = weighted[0].clone()
    for x in weighted[1:]:
        total += x
    return torch.where(total >= 0, 1.0, -1.0)


def disjoint_merge(weighted: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """Σ over agreeing models of wₘ δₘ, divided by their Σ wₘ when `normalize`.

    weighted: k tensors (n,) holding wₘ δₘ -> (n,) float32.
    """
    sign = elect_sign(weighted)
    mixed = torch.zeros_like(sign)
    divisor = torch.zeros_like(sign)
    for x, w in zip(weighted, weights):
        agree = torch.sign(x) == sign
        mixed += torch.where(agree, x, 0.0)
        if normalize:
            divisor += torch.where(agree, w, 0.0)
    if normalize:
        mixed /= torch.where(divisor == 0, 1.0, divisor)
    return mixed
