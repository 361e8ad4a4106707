"""SLERP: spherical linear interpolation between the base and one model (Shoemake, 1985,
"Animating rotation with quaternion curves"; the merge as in mergekit's `slerp`).

Each tensor is treated as one vector: with Ω the angle between θ_base and θ₁,
    θ = sin((1 − t)·Ω) / sin Ω · θ_base + sin(t·Ω) / sin Ω · θ₁,
falling back to linear interpolation (1 − t)·θ_base + t·θ₁ when the vectors are nearly
parallel (|cos Ω| > 0.9995), as mergekit does. A norm at most 1e-8 is taken as 1 (mergekit's
`normalize`). cos Ω needs ‖θ_base‖², ‖θ₁‖² and θ_base·θ₁ over the whole tensor: one reducer pass
sums them in one fixed order (`engine.stats.gram`), so the two coefficients, and the merged bytes, are the
same for any block size. mergekit sums in float32 numpy, which can move cos Ω in its last bits.

`t` is global (mergekit: required; here 0.5 if unset) and must lie in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from engine.methods import steps
from engine.methods.base import Chunk, Method, ParamDef, ParamValue, Reducer, Stats, TensorParams
from engine.methods.steps import Step
from engine.stats.gram import Gram
from engine.stats.pairwise import ALONE

DOT_THRESHOLD = 0.9995  # mergekit's: beyond it the vectors count as parallel
NORM_EPS = 1e-8
GRAM = "slerp.gram"


def _unit_interval(v: ParamValue) -> str | None:
    return None if 0.0 <= float(v) <= 1.0 else f"must lie in [0, 1], got {v}"


T = ParamDef("t", 0.5, per_model=False, check=_unit_interval)


def slerp_coefficients(t: float, s00: float, s11: float, s01: float) -> tuple[float, float]:
    """(c0, c1) with θ = c0·θ_base + c1·θ₁, from ‖θ_base‖², ‖θ₁‖² and θ_base·θ₁."""
    n0, n1 = math.sqrt(s00), math.sqrt(s11)
    dot = s01 / ((n0 if n0 > NORM_EPS else 1.0) * (n1 if n1 > NORM_EPS else 1.0))
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    omega = math.acos(dot)
    return math.sin(omega - omega * t) / math.sin(omega), math.sin(omega * t) / math.sin(omega)


class Slerp(Method):
    name = "slerp"
    params = (T,)
    min_models = 1
    max_models = 1

    def reducers(self, p: TensorParams) -> Sequence[Reducer]:
        return (Gram(GRAM, [(0, ALONE), (1, ALONE)], [(0, 0), (1, 1), (0, 1)]),)  # the weights

    def steps(self, p: TensorParams, stats: Stats, n_models: int) -> Sequence[Step]:
        g = stats[GRAM]
        c0, c1 = slerp_coefficients(p.number("t"), g[(0, 0)], g[(1, 1)], g[(0, 1)])
        return (steps.set_(1, c1), steps.add(0, c0))  # c1·θ₁ + c0·θ_base

    def apply(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> torch.Tensor:
        return steps.run([base, *models], self.steps(p, stats, len(models)))
