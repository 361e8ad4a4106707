"""Passthrough: the base's tensors, unchanged or scaled (mergekit's `passthrough`).

With `slices` (engine.slices) this stacks layer ranges of different models, or repeats layers of
one, into a deeper model ("frankenmerges"); without slices it copies one model, converting its
dtype. `scale` multiplies tensors (usually given with filters, e.g. `{filter: o_proj, value: 0}`
to silence a repeated layer's output projection); at 1 the values pass unchanged. As in mergekit
it is a per-model parameter: set on the model's (or slice source's) own entry, or globally as
every model's default, its filters matched against the input's tensor name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.methods import steps
from engine.methods.base import Chunk, Method, ParamDef, Stats, TensorParams, scale_
from engine.methods.steps import Step


class Passthrough(Method):
    name = "passthrough"
    params = (ParamDef("scale", 1.0, per_model=True),)
    min_models = 0
    max_models = 0

    def apply(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> torch.Tensor:
        # The one model is the base: its scale is the base's own. The base chunk is shared and
        # read-only: scaling needs a copy.
        scale = _scale(p)
        return base if scale == 1.0 else scale_(base.clone(), scale)

    def steps(self, p: TensorParams, stats: Stats, n_models: int) -> Sequence[Step]:
        """`apply` as a program: the base, scaled."""
        scale = _scale(p)
        return (steps.set_(0, None if scale == 1.0 else scale),)


def _scale(p: TensorParams) -> float:
    """The one model's (the base's) `scale`, per-model as in mergekit."""
    return float(p.base.get("scale", 1.0))
