"""DARE: Drop And REscale (Yu et al., 2023, "Language Models are Super Mario: Absorbing
Abilities from Homologous Models as a Free Lunch").

Each delta δₘ = θₘ − θ_base keeps every element with probability d (the density) and drops the
rest; survivors are divided by d so that E[δ̂ₘ] = δₘ. `rescale: false` is the paper's DropOnly
ablation. The keep decision comes from the keyed stream of (seed, tensor, model) at the
element's flat index, so the masks are the same whatever the block size, device or order.

`rescale_norm: l1` (or l2, linf) replaces the division by d with matching the norm of the whole
dropped delta to the original's, as current mergekit's `rescale: true` does; it costs one
reducer pass (`engine.methods.rescale_norm`). The default, `density`, is the paper's 1/d.

- dare_linear: task arithmetic on the DARE'd deltas; with one model it sparsifies a fine-tune.
- dare_ties: TIES sign election and disjoint merge on the DARE'd deltas.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.errors import SpecError
from engine.methods import steps
from engine.methods.base import (
    DENSITY,
    LAMBDA,
    WEIGHT,
    Chunk,
    ParamDef,
    Reducer,
    Stats,
    TensorParams,
    div_,
    normalize_param,
    one_of,
    scale_,
)
from engine.methods.rescale_norm import FACTORS, NORMS, NormMatch
from engine.methods.steps import Step
from engine.methods.task_arithmetic import DeltaMerge, deltas_

RESCALE = ParamDef("rescale", True, per_model=False)
# "density": divide survivors by d (the paper); a norm: match the whole tensor's norm instead.
RESCALE_NORM = ParamDef("rescale_norm", "density", per_model=False, check=one_of("density", *NORMS))
DARE_PARAMS = (WEIGHT, DENSITY, LAMBDA, normalize_param(False), RESCALE, RESCALE_NORM)


def rescale_norm(p: TensorParams) -> str | None:
    """The norm to match, or None for the paper's 1/d (or no rescale at all)."""
    norm = str(p.globals.get("rescale_norm", "density"))  # absent in hand-made TensorParams
    return norm if norm != "density" and p.flag("rescale") else None


def drop_and_rescale_(delta: torch.Tensor, keep: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """DARE in place: zero the dropped entries; divide survivors by the density so E[out] == delta.

    Multiply-then-divide, as mergekit does, so the two agree bit for bit.
    """
    delta.mul_(keep)
    return div_(delta, density) if rescale else delta


def dare_deltas_(
    base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, c: Chunk, stats: Stats | None = None
) -> list[torch.Tensor]:
    """δ̂ₘ for every model of the chunk, in place. A density of 1 keeps every element unchanged.

    With `rescale_norm`, survivors are multiplied by the tensor's norm-matching factor (from
    `stats`) instead of divided by the density.
    """
    factors = (stats or {}).get(FACTORS)
    rescale = p.flag("rescale") and factors is None
    out = []
    for i, (delta, d) in enumerate(zip(deltas_(base, models), p.per_model("density"))):
        if d < 1.0:
            delta = drop_and_rescale_(delta, c.keep(i, delta.numel(), d), d, rescale)
            if factors is not None:
                delta = scale_(delta, factors[i])
        out.append(delta)
    return out


class _Dare(DeltaMerge):
    params = DARE_PARAMS
    uses_rng = True

    def weighted_deltas_(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> list[torch.Tensor]:
        return [scale_(d, w) for d, w in zip(dare_deltas_(base, models, p, c, stats), p.per_model("weight"))]

    def sparsify_steps(self, m: int, p: TensorParams, stats: Stats) -> list[Step] | None:
        """`dare_deltas_` for model m as steps: keep, then divide by d or scale by the norm factor."""
        d, factors = p.per_model("density")[m - 1], stats.get(FACTORS)
        if d >= 1.0:
            return []
        out = [steps.keep(m - 1, d, m)]
        if p.flag("rescale") and factors is None:
            out.append(Step(steps.DIV, scale=d, reg=m))
        if factors is not None and factors[m - 1] != 1.0:
            out.append(Step(steps.MUL, scale=factors[m - 1], reg=m))
        return out

    def validate(self, p: TensorParams) -> None:
        if p.choice("rescale_norm") != "density" and not p.flag("rescale"):
            raise SpecError(f"{self.name}: 'rescale_norm' {p.choice('rescale_norm')!r} needs 'rescale: true'")

    def reducers(self, p: TensorParams) -> Sequence[Reducer]:
        norm = rescale_norm(p)
        return (NormMatch(norm),) if norm and min(p.per_model("density")) < 1.0 else ()


class DareLinear(_Dare):
    name = "dare_linear"


class DareTies(_Dare):
    name = "dare_ties"
    consensus = True
