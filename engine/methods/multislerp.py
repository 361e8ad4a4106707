"""Multi-SLERP: barycentric interpolation of any number of models on a hypersphere (mergekit's
`multislerp`; C. Goddard, "Multi-SLERP", https://goddard.blog/posts/multislerp-wow-what-a-cool-idea).

With vectors xᵢ (the models; or, given a base_model, their deltas from it), weights wᵢ (divided by
Σ w with `normalize_weights`, the default), each tensor one vector:
    uᵢ = xᵢ / (‖xᵢ‖ + ε),  m = Σ wᵢ uᵢ,  m̂ = m / ‖m‖,
    τ = Σ wᵢ (uᵢ − (uᵢ·m̂)·m̂)          (the weighted tangent at m̂),
    θ = (Σ wᵢ ‖xᵢ‖) · (cos ‖τ‖'·m̂ + sin ‖τ‖'·τ / ‖τ‖')  [+ θ_base],  ‖τ‖' = ‖τ‖ + ε,
and, where ‖m‖ < ε, w₀x₀ + w₁x₁ [+ θ_base] for two vectors (an error for more, as mergekit).
One model alone is returned as it is.

Every vector above is a linear combination of the xᵢ, so all of it follows from their Gram
matrix (`engine.methods.spherical`): one reducer pass, then a `steps` program Σ cᵢ·xᵢ [+ θ_base].
Where it must match mergekit: the same formula, ε and fallbacks. Deliberate differences:
mergekit forms uᵢ, m, τ and the result as float32 (or bf16, for bf16 inputs) tensors, each op
rounded, with torch's own summation order in the norms and dot products; here the norms and dot
products are float64 sums of exact products in a fixed order, the coefficients float64, and each
output element one float32 linear combination of its inputs, so float32 inputs differ from
mergekit's output in the last bits of many elements (on tiny float32 Llama-shaped models 18-76%
bit-equal; leanmerge 69-85% equal to the float64 result rounded, mergekit 19-75%). The weights
default to 1 (mergekit requires them). mergekit orders the models through a Python
set (its order, and so its rounding, can change from run to run); here they keep the config's
order. Without base_model the first listed model is x₀.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from engine.errors import SpecError
from engine.methods import steps
from engine.methods.base import WEIGHT, Chunk, Method, ParamDef, ParamValue, Reducer, Stats, TensorParams
from engine.methods.spherical import (
    all_pairs,
    combination,
    copy_of,
    gram_matrix,
    input_vectors,
    input_weights,
    norm,
    quad,
)
from engine.methods.steps import Step
from engine.stats.gram import Gram

GRAM = "multislerp.gram"


def _positive(v: ParamValue) -> str | None:
    return None if 0.0 < float(v) < float("inf") else f"must be a finite number > 0, got {v}"


NORMALIZE_WEIGHTS = ParamDef("normalize_weights", True, per_model=False)
EPS = ParamDef("eps", 1e-8, per_model=False, check=_positive)


class AntipodalError(SpecError):
    """The weighted mean of the unit vectors vanishes (antipodal vectors with balancing weights)."""


def multislerp_coefficients(
    g: Sequence[Sequence[float]], weights: Sequence[float], normalize: bool, eps: float
) -> list[float]:
    """c with θ = Σ cᵢ xᵢ (θ_base aside), from the Gram matrix of the xᵢ."""
    k = len(weights)
    if normalize:
        total = sum(weights)
        weights = [w / total for w in weights]
    norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(k)]
    unit = [1.0 / (n + eps) for n in norms]  # uᵢ = unit[i]·xᵢ
    mean = [w * u for w, u in zip(weights, unit)]
    mean_norm = norm(g, mean)
    if mean_norm < eps:
        if k == 2:
            return list(weights)
        raise AntipodalError(
            "multislerp: the weighted sum of the unit vectors is zero (antipodal models with balancing weights); "
            "use other weights"
        )
    hat = [c / mean_norm for c in mean]
    dots = [unit[i] * quad(g, [1.0 if j == i else 0.0 for j in range(k)], hat) for i in range(k)]
    pull = sum(w * d for w, d in zip(weights, dots))
    tangent = [c - pull * h for c, h in zip(mean, hat)]
    t_norm = norm(g, tangent) + eps
    scale = sum(n * w for n, w in zip(norms, weights))
    return [scale * (h * math.cos(t_norm) + c * (math.sin(t_norm) / t_norm)) for h, c in zip(hat, tangent)]


class MultiSlerp(Method):
    name = "multislerp"
    params = (WEIGHT, NORMALIZE_WEIGHTS, EPS)
    min_models = 1
    base_optional = True

    def validate(self, p: TensorParams) -> None:
        weights = input_weights(p)
        if p.flag("normalize_weights") and len(weights) > 1 and sum(weights) == 0.0:
            raise SpecError("multislerp: the weights sum to 0 and normalize_weights is true; use other weights")

    def reducers(self, p: TensorParams) -> Sequence[Reducer]:
        k = len(p.models) + p.base_is_model
        return () if k == 1 else (Gram(GRAM, input_vectors(p, len(p.models)), all_pairs(k)),)

    def steps(self, p: TensorParams, stats: Stats, n_models: int) -> Sequence[Step]:
        vectors = input_vectors(p, n_models)
        if len(vectors) == 1:  # mergekit returns the one model
            return copy_of(vectors[0][0])
        g = gram_matrix(stats[GRAM], len(vectors))
        c = multislerp_coefficients(g, input_weights(p), p.flag("normalize_weights"), p.number("eps"))
        return combination(c, vectors)

    def apply(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> torch.Tensor:
        return steps.run([base, *models], self.steps(p, stats, len(models)))
