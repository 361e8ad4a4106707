"""DARE: Drop And REscale (Yu et al., 2023, "Language Models are Super Mario: Absorbing
Abilities from Homologous Models as a Free Lunch").

Each delta δₘ = θₘ − θ_base keeps every element with probability d (the density) and drops the
rest; survivors are divided by d so that E[δ̂ₘ] = δₘ. `rescale: false` is the paper's DropOnly
ablation. The keep decision comes from the keyed stream of (seed, tensor, model) at the
element's flat index, so the masks are the same whatever the block size, device or order.

- dare_linear: task arithmetic on the DARE'd deltas; with one model it sparsifies a fine-tune.
- dare_ties: TIES sign election and disjoint merge on the DARE'd deltas.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.methods.base import (
    DENSITY,
    LAMBDA,
    WEIGHT,
    Chunk,
    Method,
    ParamDef,
    Stats,
    TensorParams,
    normalize_param,
    safe_divisor,
    scale_,
    weighted_sum_,
)
from engine.methods.consensus import disjoint_merge_
from engine.methods.task_arithmetic import add_to_base_, deltas_

RESCALE = ParamDef("rescale", True, per_model=False)
DARE_PARAMS = (WEIGHT, DENSITY, LAMBDA, normalize_param(False), RESCALE)


def drop_and_rescale_(delta: torch.Tensor, keep: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """DARE in place: zero the dropped entries; divide survivors by the density so E[out] == delta.

    Multiply-then-divide, as mergekit does, so the two agree bit for bit.
    """
    delta.mul_(keep)
    return delta.div_(density) if rescale else delta


def dare_deltas_(base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, c: Chunk) -> list[torch.Tensor]:
    """δ̂ₘ for every model of the chunk, in place. A density of 1 keeps every element unchanged."""
    rescale = p.flag("rescale")
    out = []
    for i, (delta, d) in enumerate(zip(deltas_(base, models), p.per_model("density"))):
        out.append(delta if d >= 1.0 else drop_and_rescale_(delta, c.keep(i, delta.numel(), d), d, rescale))
    return out


class DareLinear(Method):
    name = "dare_linear"
    params = DARE_PARAMS
    uses_rng = True

    def apply(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> torch.Tensor:
        weights = p.per_model("weight")
        mixed = weighted_sum_(dare_deltas_(base, models, p, c), weights)
        if p.flag("normalize"):
            mixed /= safe_divisor(sum(weights))
        return add_to_base_(base, mixed, p.number("lambda"))


class DareTies(Method):
    name = "dare_ties"
    params = DARE_PARAMS
    uses_rng = True

    def apply(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> torch.Tensor:
        weights = p.per_model("weight")
        weighted = [scale_(delta, w) for delta, w in zip(dare_deltas_(base, models, p, c), weights)]
        mixed = disjoint_merge_(weighted, weights, p.flag("normalize"))
        return add_to_base_(base, mixed, p.number("lambda"))
