"""`mergekit_rounding`: merge with mergekit's arithmetic (0.1.5) instead of leanmerge's.

mergekit casts every input to the config's `dtype` when it loads it, and its generalized task
arithmetic runs in that dtype: for task_arithmetic with `dtype: bfloat16` each delta, each
weighted delta (by a weight itself rounded to bf16), their sum, the divisor, the quotient, the
λ product and the sum with the base are each rounded to bf16. Its linear casts the inputs to
`dtype` and then sums in float32 with fused multiply-adds (`addcmul_`). leanmerge by default
reads the stored values and rounds once, on write: more accurate, but not mergekit's bytes.

This module runs mergekit's code for one chunk, literally, with torch in that dtype: every op is
elementwise, so the result does not depend on the chunk. TIES and breadcrumbs trim the rounded
deltas: their top-k passes (engine.stats.topk, exact) run on the deltas rounded to the dtype, and
the kept deltas are then weighted, elected and summed in the dtype as mergekit does. Ties in
magnitude at the cut (frequent in bf16) are kept from the lowest flat index up, where mergekit's
unstable `argsort` (TIES) and ascending `sort` (breadcrumbs) keep an unspecified set, and
mergekit keeps at least one element (k = max(1, ...)). Model stock's angles and the random
methods (DARE, DELLA: mergekit draws torch.bernoulli masks) are not covered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from engine.dtypes import DTYPES
from engine.errors import SpecError
from engine.methods.base import Chunk, Method, Reducer, Stats, TensorParams
from engine.methods.task_arithmetic import DeltaMerge

METHODS = ("linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties")


class MergekitRounded(Method):
    """`inner` (one of `METHODS`) computed as mergekit computes it in `dtype`."""

    def __init__(self, inner: Method, dtype: torch.dtype) -> None:
        self.inner, self.dtype = inner, dtype
        self.name = inner.name  # type: ignore[misc]
        self.params = inner.params  # type: ignore[misc]
        self.min_models, self.max_models = inner.min_models, inner.max_models  # type: ignore[misc]
        self.uses_base = inner.uses_base  # type: ignore[misc]

    def validate(self, p: TensorParams) -> None:
        self.inner.validate(p)

    def reducers(self, p: TensorParams) -> Sequence[Reducer]:
        return [OnRoundedDeltas(r, self.dtype) for r in self.inner.reducers(p)]

    def apply(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> torch.Tensor:
        weights = p.per_model("weight")
        if self.name == "linear":
            return linear(models, weights, p.flag("normalize"), self.dtype)
        zero, deltas = rounded_deltas(base, models, self.dtype)
        if self.name != "task_arithmetic":  # trim the rounded deltas (× 0 or 1: exact), unweighted
            unit = TensorParams(p.globals, tuple({**m, "weight": 1.0} for m in p.models), p.base)
            assert isinstance(self.inner, DeltaMerge)
            deltas = self.inner.weighted_deltas_(zero, deltas, unit, stats, c)
        consensus = self.name in ("ties", "breadcrumbs_ties")
        return mix(base, deltas, weights, p.flag("normalize"), p.number("lambda"), self.dtype, consensus)


def rounded_deltas(
    base: torch.Tensor, models: Sequence[torch.Tensor], dtype: torch.dtype
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A zero base and each model's delta rounded to `dtype` (as float32): what the inner
    method's trim and top-k passes then see as δ = model − base, exactly."""
    b = base.to(dtype)
    return torch.zeros_like(base), [(m.to(dtype) - b).float() for m in models]


class OnRoundedDeltas(Reducer):
    """`inner`'s pass over the deltas rounded to `dtype` instead of the exact ones."""

    def __init__(self, inner: Reducer, dtype: torch.dtype) -> None:
        self.inner, self.dtype = inner, dtype
        self.folds_ahead, self.skippable = inner.folds_ahead, inner.skippable

    def start(self, p: TensorParams, stats: Stats, numel: int) -> Any:
        return self.inner.start(p, stats, numel)

    def chunk(
        self, acc: Any, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> None:
        zero, deltas = rounded_deltas(base, models, self.dtype)
        self.inner.chunk(acc, zero, deltas, p, stats, c)

    def finish(self, acc: Any, p: TensorParams, stats: Stats) -> dict[str, Any]:
        return self.inner.finish(acc, p, stats)

    def so_far(self, acc: Any, p: TensorParams, stats: Stats) -> dict[str, Any]:
        return self.inner.so_far(acc, p, stats)

    def needed(self, p: TensorParams, stats: Stats) -> bool:
        return self.inner.needed(p, stats)


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


def mix(
    base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool, lam: float,
    dtype: torch.dtype, consensus: bool,
) -> torch.Tensor:  # fmt: skip
    """mergekit 0.1.5's generalized task arithmetic after sparsification, every op in `dtype`:
    weight, mix (a sum, or with `consensus` TIES' sign election and disjoint sum), divide,
    scale by λ, add to the base. `deltas`: float32 holding values of `dtype`."""
    b = base.to(dtype)
    stacked = torch.stack([d.to(dtype) for d in deltas])  # (models, n)
    w = torch.tensor(list(weights), dtype=dtype, device=b.device).unsqueeze(-1)  # (models, 1)
    stacked.mul_(w)
    if consensus:
        sign = stacked.sign()
        majority = (stacked.sum(dim=0) >= 0).to(dtype) * 2 - 1
        mask = (sign == majority).to(dtype)
        mixed = (stacked * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(dim=0)
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
            f"mergekit_rounding covers {', '.join(METHODS)}, not {method.name}: mergekit's random masks and other "
            "methods' arithmetic are not reproduced (leave mergekit_rounding out: leanmerge rounds once, on write)"
        )
    if out_dtype is None:
        raise SpecError("mergekit_rounding rounds to the config's dtype: set one (dtype: bfloat16, or --out-dtype)")
    return MergekitRounded(method, DTYPES[out_dtype])
