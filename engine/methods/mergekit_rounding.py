"""`mergekit_rounding`: merge with mergekit's arithmetic (0.1.5) instead of leanmerge's.

mergekit casts every input to the config's `dtype` when it loads it, and its generalized task
arithmetic runs in that dtype: for task_arithmetic with `dtype: bfloat16` each delta, each
weighted delta (by a weight itself rounded to bf16), their sum, the divisor, the quotient, the
λ product and the sum with the base are each rounded to bf16. Its linear casts the inputs to
`dtype` and then sums in float32 with fused multiply-adds (`addcmul_`). leanmerge by default
reads the stored values and rounds once, on write: more accurate, but not mergekit's bytes.

This module runs mergekit's code for one chunk, literally, with torch in that dtype: every op is
elementwise, so the result does not depend on the chunk. The statistics methods (TIES and
breadcrumbs' tensor-wide top-k, model stock's angles) and the random ones (DARE, DELLA: mergekit
draws torch.bernoulli masks) are not covered: their tensor-wide passes would have to run on
rounded deltas, and mergekit's tie order and random draws cannot be reproduced block by block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.dtypes import DTYPES
from engine.errors import SpecError
from engine.methods.base import Chunk, Method, Stats, TensorParams

METHODS = ("linear", "task_arithmetic")


class MergekitRounded(Method):
    """`inner` (linear or task_arithmetic) computed as mergekit computes it in `dtype`."""

    def __init__(self, inner: Method, dtype: torch.dtype) -> None:
        self.inner, self.dtype = inner, dtype
        self.name = inner.name  # type: ignore[misc]
        self.params = inner.params  # type: ignore[misc]
        self.min_models, self.max_models = inner.min_models, inner.max_models  # type: ignore[misc]
        self.uses_base = inner.uses_base  # type: ignore[misc]

    def validate(self, p: TensorParams) -> None:
        self.inner.validate(p)

    def apply(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> torch.Tensor:
        weights = p.per_model("weight")
        if self.name == "linear":
            return linear(models, weights, p.flag("normalize"), self.dtype)
        return task_arithmetic(base, models, weights, p.flag("normalize"), p.number("lambda"), self.dtype)


def linear(
    models: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool, dtype: torch.dtype
) -> torch.Tensor:
    """mergekit 0.1.5's linear_merge: inputs cast to `dtype`, then zero + Σ addcmul in float32
    (float64 for float64 inputs), divided by Σ w, cast back to `dtype`."""
    ts = [m.to(dtype) for m in models]
    work = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.tensor(weights, dtype=work, device=ts[0].device)
    out = torch.zeros_like(ts[0], dtype=work)
    for t, coefficient in zip(ts, w.unbind(0)):
        out.addcmul_(t, coefficient)
    if normalize:
        out.div_(w.sum())
    return out.to(dtype).float()


def task_arithmetic(
    base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool, lam: float,
    dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """mergekit 0.1.5's generalized task arithmetic without sparsification or consensus, every
    op in `dtype`."""
    b = base.to(dtype)
    deltas = b.new_empty((len(models), *b.shape))  # (models, n)
    for i, m in enumerate(models):
        deltas[i] = m.to(dtype) - b
    w = torch.tensor(list(weights), dtype=dtype, device=b.device).unsqueeze(-1)  # (models, 1)
    deltas.mul_(w)
    mixed = deltas.sum(dim=0)
    divisor = w.sum(dim=0)
    divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return (b + mixed).to(dtype).float()


def rounded(method: Method, out_dtype: str | None) -> MergekitRounded:
    """`method` with mergekit's rounding in the config's dtype.

    Raises:
        SpecError: the method is not one this covers, or no dtype is set.
    """
    if method.name not in METHODS:
        raise SpecError(
            f"mergekit_rounding covers {', '.join(METHODS)}, not {method.name}: its tensor-wide statistics or "
            "random masks cannot be reproduced block by block (leave mergekit_rounding out: leanmerge rounds once, on write)"
        )
    if out_dtype is None:
        raise SpecError("mergekit_rounding rounds to the config's dtype: set one (dtype: bfloat16, or --out-dtype)")
    return MergekitRounded(method, DTYPES[out_dtype])
