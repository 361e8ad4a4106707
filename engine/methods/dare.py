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
    ChunkRandom,
    Method,
    ParamDef,
    TensorParams,
    normalize_param,
    safe_divisor,
    weighted_sum,
)
from engine.methods.consensus import disjoint_merge
from engine.methods.task_arithmetic import add_to_base

RESCALE = ParamDef("rescale", True, per_model=False)


def drop_and_rescale(delta: torch.Tensor, keep: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """DARE: zero the dropped entries; divide survivors by the density so E[out] == delta."""
    if rescale:
        delta = delta / density
    return torch.where(keep, delta, 0.0)


def dare_deltas(base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, rng: ChunkRandom) -> list[torch.Tensor]:
    """δ̂ₘ for every model of the chunk. A density of 1 keeps every element unchanged."""
    rescale = p.flag("rescale")
    out = []
    for i, (m, d) in enumerate(zip(models, p.per_model("density"))):
        delta = m - base
        out.append(delta if d >= 1.0 else drop_and_rescale(delta, rng.keep(i, delta.numel(), d), d, rescale))
    return out


class DareLinear(Method):
    name = "dare_linear"
    params = (WEIGHT, DENSITY, LAMBDA, normalize_param(False), RESCALE)
    uses_rng = True

    def apply(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, rng: ChunkRandom
    ) -> torch.Tensor:
        weights = p.per_model("weight")
        mixed = weighted_sum(dare_deltas(base, models, p, rng), weights)
        if p.flag("normalize"):
            mixed /= safe_divisor(sum(weights))
        return add_to_base(base, mixed, p.number("lambda"))


class DareTies(Method):
    name = "dare_ties"
    params = (WEIGHT, DENSITY, LAMBDA, normalize_param(False), RESCALE)
    uses_rng = True

    def apply(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, rng: ChunkRandom
    ) -> torch.Tensor:
        weights = p.per_model("weight")
        weighted = [delta * w for delta, w in zip(dare_deltas(base, models, p, rng), weights)]
        mixed = disjoint_merge(weighted, weights, p.flag("normalize"))
        return add_to_base(base, mixed, p.number("lambda"))
