"""What the spherical methods (nuslerp, multislerp, karcher) share: their vectors, the Gram matrix
of those vectors from one reducer pass, and the merge as a fixed linear combination of them.

Each of these methods returns, per tensor, a linear combination Σ cᵢ·vᵢ of its input vectors
(the models, or their deltas from the base, plus the base): every quantity its formula needs
(norms, cosines, the norm of a tangent or of a mean) is a quadratic form cᵀ·G·c in the Gram
matrix G of the vectors. `engine.stats.gram` sums G in one fixed order (float64, exact products),
so the coefficients are computed in float64 on the host from G alone and the merged bytes do not
depend on the block size, the device or the thread count; the combination itself is a `steps`
program (run in C on the CPU).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from engine.methods import steps
from engine.methods.base import TensorParams
from engine.methods.steps import Step
from engine.stats.pairwise import ALONE, Pair, Vector


def input_vectors(p: TensorParams, n_models: int) -> list[Vector]:
    """The vectors a base-optional method mixes: with a base, each model's delta θₘ − θ_base;
    without one (`base_is_model`), the base stream (the first listed model) and the models."""
    if p.base_is_model:
        return [(m, ALONE) for m in range(n_models + 1)]
    return [(m, 0) for m in range(1, n_models + 1)]


def input_weights(p: TensorParams, name: str = "weight") -> list[float]:
    """Each vector's weight, in `input_vectors` order."""
    own = p.per_model(name)
    return [float(p.base[name]), *own] if p.base_is_model else own


def all_pairs(k: int) -> list[Pair]:
    """(i, j), i <= j: every entry of the Gram matrix of k vectors."""
    return [(i, j) for i in range(k) for j in range(i, k)]


def gram_matrix(entries: Mapping[Pair, float], k: int) -> list[list[float]]:
    """The symmetric k x k matrix from the reducer's upper triangle."""
    return [[entries[(min(i, j), max(i, j))] for j in range(k)] for i in range(k)]


def quad(g: Sequence[Sequence[float]], a: Sequence[float], b: Sequence[float]) -> float:
    """aᵀ·G·b, summed in a fixed order (row by row)."""
    return sum(a[i] * sum(g[i][j] * b[j] for j in range(len(b))) for i in range(len(a)))


def norm(g: Sequence[Sequence[float]], c: Sequence[float]) -> float:
    """‖Σ cᵢ vᵢ‖; a form that rounding left just below 0 is 0."""
    return math.sqrt(max(quad(g, c, c), 0.0))


def combination(coeffs: Sequence[float], vectors: Sequence[Vector], divisor: float | None = None) -> tuple[Step, ...]:
    """The program of (Σ cᵢ·vᵢ) / divisor, plus the base where the vectors are deltas from it.

    Products, sum and quotient are each rounded to float32 in this order (mergekit's for
    nuslerp: c₀·v₀ + c₁·v₁, then / sin θ, then + base)."""
    if all(b == ALONE for _, b in vectors):
        prog = [steps.set_(vectors[0][0], coeffs[0]), *(steps.add(a, c) for (a, _), c in zip(vectors[1:], coeffs[1:]))]
        reg = 0
    else:  # register r holds delta r (its model's stream less the base), scaled
        prog = []
        for r, ((a, b), c) in enumerate(zip(vectors, coeffs), start=1):
            prog += [steps.set_(a, reg=r), Step(steps.SUB, b, reg=r), Step(steps.MUL, scale=c, reg=r)]
        prog += [Step(steps.ACC, r, reg=1) for r in range(2, len(vectors) + 1)]
        reg = 1
    if divisor is not None:
        prog.append(Step(steps.DIV, scale=divisor, reg=reg))
    if any(b != ALONE for _, b in vectors):
        prog.append(steps.add(0, reg=1))
    return tuple(prog)


def copy_of(stream: int) -> tuple[Step, ...]:
    """The program that returns one input unchanged."""
    return (steps.set_(stream),)
