"""NearSwap: take the other model's value where it lies near the base's (mergekit's `nearswap`;
alchemonaut, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001).

Per element, with a = θ_base, b = θ₁ (exactly one model besides the base) and the global `t`:
    w = clamp(t / max(|a − b|, 1e-6), 0, 1),   θ = w·b + (1 − w)·a,
so elements closer than t are swapped to the model, farther ones interpolated towards the base.

Elementwise, no statistics: the same float32 ops in the same order as mergekit's torch code
(`t / x` is torch's reciprocal(x)·t; then the clamp, w·b, 1 − w, (1 − w)·a and the sum), each
one IEEE-rounded on every device, so float32 inputs give mergekit's bytes exactly. mergekit
computes in the inputs' dtype (bf16 inputs: every op rounded to bf16); here float32, rounded once.
`t` is required, as in mergekit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from engine.errors import SpecError
from engine.methods.base import Chunk, Method, ParamDef, ParamValue, Stats, TensorParams

MIN_DISTANCE = 1e-6  # mergekit's clamp on |a − b|


def _finite(v: ParamValue) -> str | None:
    ok = not isinstance(v, (bool, str)) and math.isfinite(float(v))
    return None if ok else f"must be a finite number, got {v!r}"


T = ParamDef("t", math.nan, per_model=False, check=_finite)  # NaN: not given (required)


def nearswap(base: torch.Tensor, model: torch.Tensor, t: float) -> torch.Tensor:
    """w·b + (1 − w)·a with w = clamp(t / max(|a − b|, 1e-6), 0, 1), overwriting `model`."""
    weight = torch.sub(base, model).abs_().clamp_(min=MIN_DISTANCE).reciprocal_().mul_(t).clamp_(0, 1)
    return model.mul_(weight).add_(weight.neg_().add_(1.0).mul_(base))  # 1 − w == −w + 1, one rounding


class NearSwap(Method):
    name = "nearswap"
    params = (T,)
    min_models = 1
    max_models = 1

    def validate(self, p: TensorParams) -> None:
        if math.isnan(p.number("t")):
            raise SpecError(
                "nearswap needs the global parameter 't' (the distance below which the model's value is taken)"
            )

    def apply(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> torch.Tensor:
        return nearswap(base, models[0], p.number("t"))
