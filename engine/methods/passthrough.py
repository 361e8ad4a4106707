"""Passthrough: the base's tensors, unchanged or scaled (mergekit's `passthrough`).

With `slices` (engine.slices) this stacks layer ranges of different models, or repeats layers of
one, into a deeper model ("frankenmerges"); without slices it copies one model, converting its
dtype. `scale` multiplies tensors (usually given with filters, e.g. `{filter: o_proj, value: 0}`
to silence a repeated layer's output projection); at 1 the values pass unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.methods import steps
from engine.methods.base import Chunk, Method, ParamDef, Stats, TensorParams, scale_
from engine.methods.steps import Step


class Passthrough(Method):
    name = "passthrough"
    params = (ParamDef("scale", 1.0, per_model=False),)
    min_models = 0
    max_models = 0
    worth_compiling = False  # a copy: nothing to fuse that the disk would notice

    def apply(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> torch.Tensor:
        # The base chunk is shared and read-only: scaling needs a copy.
        return base if p.number("scale") == 1.0 else scale_(base.clone(), p.number("scale"))

    def steps(self, p: TensorParams, stats: Stats, n_models: int) -> Sequence[Step]:
        """`apply` as a program: the base, scaled."""
        return (steps.set_(0, None if p.number("scale") == 1.0 else p.number("scale")),)
