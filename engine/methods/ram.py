"""RAM: Reinforced Agent Merging (arXiv:2601.13572), as mergekit's `ram` and `ramplus_tl`
compute it.

With δₘ = θₘ − θ_base, an element of δₘ *contributes* where |δₘ| > epsilon; c is the number of
models contributing to the element. An element only one model changes keeps that model's delta
whole; one several change gets their mean:
    ram:         θ = θ_base + Σₘ [c = 1]·δ̃ₘ + [c > 1]·δ̃ₘ / c        (δ̃ₘ: δₘ where it contributes, else 0)
    ramplus_tl:  the unique part scaled per model, [c = 1]·δ̃ₘ·λₘ, with
                 λₘ = 1 + r·clamp(ρₘ, 0, alpha),  ρₘ = sharedₘ / max(uniqueₘ, epsilon),
                 sharedₘ / uniqueₘ: how many of model m's contributing elements have c > 1 / c = 1
                 in the whole tensor ("tensor-local").
ram is elementwise (no pass before the merge); ramplus_tl counts sharedₘ and uniqueₘ exactly
(integers) in one pass, and λₘ is computed from them with mergekit's own torch expression. The
per-element arithmetic is mergekit's float32 ops in its order, so float32 merges equal mergekit's
bit for bit. mergekit casts inputs to the config's `dtype` and does every op in it (bf16); this
computes in float32 and rounds once on write (measured on tiny float32 Llama-shaped models: both
100% bit-equal to mergekit 0.1.5). mergekit's ramplus_tl returns float32 tensors whatever the
`dtype` (its float32 λ promotes the sum); here the output dtype is the base's, or `--out-dtype`.
Defaults as mergekit: epsilon 1e-5, r 0.1, alpha 0.2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from engine.methods.base import Chunk, Method, ParamDef, ParamValue, Reducer, Stats, TensorParams

COUNTS = "ramplus_tl.counts"  # stats key: [(sharedₘ, uniqueₘ)] by model
LAMBDAS = "ramplus_tl.lambdas"


def _non_negative(v: ParamValue) -> str | None:
    return None if 0.0 <= float(v) < math.inf else f"must be a finite number >= 0, got {v}"


def _finite(v: ParamValue) -> str | None:
    return None if math.isfinite(float(v)) else f"must be a finite number, got {v}"


EPSILON = ParamDef("epsilon", 1e-5, per_model=False, check=_non_negative)
R = ParamDef("r", 0.1, per_model=False, check=_finite)
ALPHA = ParamDef("alpha", 0.2, per_model=False, check=_non_negative)


def contributions(
    base: torch.Tensor, models: Sequence[torch.Tensor], epsilon: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(δ̃ₘ, c): the deltas zeroed where |δₘ| <= epsilon (in place over the model chunks), and the
    count of contributing models per element (int32)."""
    deltas = [m.sub_(base) for m in models]
    flags = [d.abs() > epsilon for d in deltas]
    count = torch.zeros_like(deltas[0], dtype=torch.int32)
    for d, f in zip(deltas, flags):
        d.mul_(f)  # δ·False is ±0, as mergekit's tv_flat * nonzero_mask
        count += f
    return deltas, count


def ram_merge(
    base: torch.Tensor, deltas: Sequence[torch.Tensor], count: torch.Tensor, lambdas: Sequence[float] | None
) -> torch.Tensor:
    """θ_base + Σₘ (δ̃ₘ·[c = 1]·λₘ + δ̃ₘ·[c > 1] / max(c, 1)), summed in model order (mergekit's
    ops; λ None: ram's unscaled unique part). Overwrites the deltas."""
    unique, overlap = (count == 1).float(), (count > 1).float()
    divisor = count.clamp(min=1).float()
    merged = None
    for m, d in enumerate(deltas):
        solo = d * unique
        if lambdas is not None:
            solo.mul_(lambdas[m])
        term = solo.add_(d.mul_(overlap).div_(divisor))
        merged = term if merged is None else merged.add_(term)
    assert merged is not None
    return merged.add_(base)


class Ram(Method):
    name = "ram"
    params = (EPSILON,)

    def apply(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> torch.Tensor:
        deltas, count = contributions(base, models, p.number("epsilon"))
        return ram_merge(base, deltas, count, None)


class _Counts(Reducer):
    """sharedₘ and uniqueₘ over the whole tensor: integer counts, the same for any chunking."""

    def start(self, p: TensorParams, stats: Stats, numel: int) -> Any:
        return [[0, 0] for _ in p.models]

    def chunk(
        self, acc: Any, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> None:
        eps = p.number("epsilon")
        flags = [m.sub_(base).abs_() > eps for m in models]
        count = torch.zeros_like(flags[0], dtype=torch.int32)
        for f in flags:
            count += f
        shared, unique = count > 1, count == 1
        for a, f in zip(acc, flags):
            a[0] += int((f & shared).sum())
            a[1] += int((f & unique).sum())

    def finish(self, acc: Any, p: TensorParams, stats: Stats) -> dict[str, Any]:
        return {LAMBDAS: ramplus_lambdas(acc, p.number("r"), p.number("alpha"), p.number("epsilon"))}


def ramplus_lambdas(counts: Sequence[Sequence[int]], r: float, alpha: float, epsilon: float) -> list[float]:
    """λₘ = 1 + r·clamp(sharedₘ / max(uniqueₘ, epsilon), 0, alpha): mergekit's torch expression
    (float32), on the CPU."""
    shared = torch.tensor([c[0] for c in counts], dtype=torch.int64)
    unique = torch.tensor([c[1] for c in counts], dtype=torch.int64)
    rho = shared / unique.clamp(min=epsilon)
    return [float(x) for x in 1 + r * rho.clamp(min=0, max=alpha)]


class RamPlusTl(Method):
    name = "ramplus_tl"
    params = (R, ALPHA, EPSILON)

    def reducers(self, p: TensorParams) -> Sequence[Reducer]:
        return (_Counts(),)

    def apply(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> torch.Tensor:
        deltas, count = contributions(base, models, p.number("epsilon"))
        return ram_merge(base, deltas, count, stats[LAMBDAS])
