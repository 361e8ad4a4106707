"""Karcher mean: the Riemannian (Fréchet) mean of the models' directions on the unit sphere,
scaled by their mean norm (mergekit's `karcher`; H. Karcher, 1977, "Riemannian center of mass and
mollifier smoothing"; https://en.wikipedia.org/wiki/Karcher_mean).

With the k models xᵢ (each tensor one vector; equal weights αᵢ = 1/k, as mergekit: there is no
base and no weight), uᵢ = xᵢ/‖xᵢ‖ for the models with ‖xᵢ‖ > tol (weights renormalised over
them; none: the result is 0), start from u = Σ αᵢuᵢ / ‖Σ αᵢuᵢ‖ (u₁ where that norm < tol) and
repeat at most `max_iter` times, as mergekit:
    T = Σ αᵢ · θᵢ/sin θᵢ · (uᵢ − cos θᵢ · u)   over i with θᵢ = acos(clamp(u·uᵢ, −1, 1)) >= tol,
    stop if ‖T‖ < tol;  u ← cos‖T‖ · u + sin‖T‖ · T/‖T‖;  u ← u/‖u‖ (if ‖u‖ > tol);
then θ = (Σ αᵢ ‖xᵢ‖) · u.

Out of core: u and T are linear combinations of the xᵢ at every iteration, so each iteration is
exactly a step on their k coefficients, and every dot product and norm it needs is a quadratic
form in the Gram matrix of the xᵢ. One reducer pass sums that matrix (float64 exact products,
fixed order: `engine.methods.spherical`); the iterations then run on the host on k x k numbers,
and a `steps` program writes Σ cᵢ·xᵢ. Two reads of each tensor for any `max_iter`, instead of
one per iteration, and the same bytes for any block size, device and thread count.

Where it must match mergekit: the same start, update, stopping rules and scale. Deliberate
differences: mergekit iterates on float32 (bf16 for bf16 inputs) tensors, each op rounded, with
torch's summation order in the dots and norms; here the iteration is float64 on the exact Gram
matrix and each output element one float32 combination, so float32 inputs differ from mergekit in
the last bits: on tiny float32 Llama-shaped models 25% bit-equal, 62% within 1 ulp; leanmerge's
output is 67% equal to the float64 iteration's result rounded and 99% within 1 ulp of it,
mergekit's 26% and 64%. An iteration that stops on `tol` may stop one step earlier or later
where ‖T‖ is within rounding of tol. A model at angle 0 or π from u (sin θ = 0) adds nothing to
T, where mergekit's 0/0 would make the tensor NaN (possible with tol 0). Where no model has a
norm above tol the output is +0.0 (x − x) for finite inputs. A base_model is one more input, as
in mergekit: listed among the models or not, it is averaged in (once).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from engine.methods import steps
from engine.methods.base import Chunk, Method, ParamDef, ParamValue, Reducer, Stats, TensorParams
from engine.methods.spherical import all_pairs, gram_matrix, norm, quad
from engine.methods.steps import Step
from engine.stats.gram import Gram
from engine.stats.pairwise import ALONE

GRAM, COEFFS = "karcher.gram", "karcher.coefficients"
MAX_ITER_LIMIT = 10_000  # host iterations on k x k numbers, once per tensor: ~0.1 s at most for 3 models


def _iterations(v: ParamValue) -> str | None:
    ok = not isinstance(v, (bool, str)) and float(v) == int(v) and 0 <= int(v) <= MAX_ITER_LIMIT
    return None if ok else f"must be a whole number in [0, {MAX_ITER_LIMIT}], got {v!r}"


def _tolerance(v: ParamValue) -> str | None:
    ok = not isinstance(v, (bool, str)) and 0.0 <= float(v) < float("inf")
    return None if ok else f"must be a finite number >= 0, got {v!r}"


MAX_ITER = ParamDef("max_iter", 10, per_model=False, check=_iterations)
TOL = ParamDef("tol", 1e-5, per_model=False, check=_tolerance)


def _unit(k: int, i: int, scale: float) -> list[float]:
    return [scale if j == i else 0.0 for j in range(k)]


def karcher_coefficients(g: Sequence[Sequence[float]], max_iter: int, tol: float) -> list[float]:
    """c with θ = Σ cᵢ xᵢ, from the Gram matrix of the k models (mergekit's iteration on u's
    coefficients); all zero where no model's norm exceeds tol."""
    k = len(g)
    norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(k)]
    valid = [i for i in range(k) if norms[i] > tol]
    if not valid:
        return [0.0] * k
    alpha = 1.0 / len(valid)  # 1/k each, renormalised over the valid models
    units = {i: _unit(k, i, 1.0 / norms[i]) for i in valid}  # uᵢ's coefficients
    u = [sum(alpha * units[i][j] for i in valid) for j in range(k)]
    norm_u = norm(g, u)
    u = list(units[valid[0]]) if norm_u < tol else [c / norm_u for c in u]
    for _ in range(max_iter):
        t = [0.0] * k
        for i in valid:
            dot = min(max(quad(g, u, units[i]), -1.0), 1.0)
            theta = math.acos(dot)
            if theta < tol or math.sin(theta) == 0.0:
                continue
            f = alpha * theta / math.sin(theta)
            t = [tj + f * (uij - dot * uj) for tj, uij, uj in zip(t, units[i], u)]
        norm_t = norm(g, t)
        if norm_t < tol or norm_t == 0.0:
            break
        u = [math.cos(norm_t) * uj + math.sin(norm_t) * (tj / norm_t) for uj, tj in zip(u, t)]
        u_norm = norm(g, u)
        if u_norm > tol:
            u = [c / u_norm for c in u]
    scale = sum(n / k for n in norms)  # every model's norm, zero ones included, weight 1/k
    return [scale * c for c in u]


class _KarcherGram(Gram):
    """The Gram pass, which also runs the iteration once per tensor (not once per block)."""

    def finish(self, acc: Any, p: TensorParams, stats: Stats) -> dict[str, Any]:
        out = super().finish(acc, p, stats)
        g = gram_matrix(out[GRAM], len(p.models))
        return {**out, COEFFS: karcher_coefficients(g, int(p.number("max_iter")), p.number("tol"))}


class Karcher(Method):
    name = "karcher"
    params = (MAX_ITER, TOL)
    min_models = 1
    uses_base = False
    base_joins = True

    def reducers(self, p: TensorParams) -> Sequence[Reducer]:
        k = len(p.models)
        return () if k == 1 else (_KarcherGram(GRAM, [(m, ALONE) for m in range(1, k + 1)], all_pairs(k)),)

    def steps(self, p: TensorParams, stats: Stats, n_models: int) -> Sequence[Step]:
        if n_models == 1:  # mergekit returns the one model
            return (steps.set_(1),)
        c = stats[COEFFS]
        if not any(c):
            return (steps.set_(1), Step(steps.SUB, 1))  # zeros (mergekit's zeros_like)
        return (steps.set_(1, c[0]), *(steps.add(m, cm) for m, cm in zip(range(2, n_models + 1), c[1:])))

    def apply(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> torch.Tensor:
        return steps.run([base, *models], self.steps(p, stats, len(models)))
