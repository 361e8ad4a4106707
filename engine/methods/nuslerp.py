"""NuSLERP: spherical interpolation of two models, or of their task vectors (mergekit's `nuslerp`,
Goddard et al., 2024, "Arcee's MergeKit"; SLERP after Shoemake, 1985).

With two vectors v₀, v₁ (the two models; or, given a base_model, their deltas from it) and
weights w₀, w₁: t = w₁ / (w₀ + w₁) (0.5 where |w₀ + w₁| < 1e-6), and
    cos Ω = v₀·v₁ / (max(‖v₀‖, 1e-7)·max(‖v₁‖, 1e-7)),  Ω = acos(clamp(cos Ω, −1, 1)),
    θ = (sin((1 − t)·Ω)·v₀ + sin(t·Ω)·v₁) / sin Ω   [+ θ_base with a base],
or (1 − t)·v₀ + t·v₁ where 1 − cos² Ω <= 1e-16 (mergekit 0.1.5's test). Which vectors:
- `nuslerp_flatten: true` (the default, as mergekit): the whole tensor is one vector. Its Gram
  entries come from one reducer pass (`engine.stats.gram`), the merge is a `steps` program.
- `nuslerp_flatten: false`: one Ω per fibre, along the last dim (`nuslerp_row_wise: false`, a row
  of a 2-D weight) or along dim 0 (`nuslerp_row_wise: true`, a column), as mergekit's transpose
  does. A 1-D tensor is one fibre either way. Blocks are row bands along dim 0: a last-dim fibre
  of a 2-D weight lies inside one row, but a dim-0 fibre crosses every block, and so does a 1-D
  tensor's one fibre. So every fibre's ‖v₀‖², ‖v₁‖² and v₀·v₁ come from one reducer pass
  (`FibreSums`, chunks of whole rows): float64 exact products added sequentially by flat index
  (the fixed order; a fibre cut by a block boundary carries its partial sums into the next
  chunk; dim-0 fibres add row after row), on the CPU whatever the device. Its `finish` turns
  them into per-fibre float32 coefficients (Python's math, one fibre at a time: rows floats of
  state for last-dim fibres, columns for dim-0 ones), and `apply` gathers each element's.

Where it must match mergekit: the same t, Ω rule, clamp, colinear fallback and elementwise order
(c₀·v₀ + c₁·v₁, then / sin Ω, then + base), so float32 inputs differ from mergekit's output only
where its float32 norms and dot product (torch's own summation order) move a coefficient in its
last bits; acos amplifies that where the vectors are nearly parallel (cos Ω near 1), and on tiny
float32 Llama-shaped models 34-95% of the elements are bit-equal to mergekit's, leanmerge's the
closer to the float64 result (97% within 1 ulp of it, mergekit's 89%). Deliberate differences:
those sums are exact-product float64 sums in a fixed order (block-size independent); the
weights default to 1 (mergekit requires them); mergekit computes in the inputs' dtype (bf16
inputs: every op rounded to bf16), this engine in float32 with one rounding at the end. Without base_model the first listed
model is v₀ (mergekit's order of the two models); with one, the two other models are v₀, v₁.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from engine.errors import SpecError
from engine.methods import steps
from engine.methods.base import WEIGHT, Chunk, Method, ParamDef, Reducer, Stats, TensorParams
from engine.methods.spherical import combination, input_vectors, input_weights
from engine.methods.steps import Step
from engine.stats.gram import Gram
from engine.stats.pairwise import ALONE, Vector

FLATTEN = ParamDef("nuslerp_flatten", True, per_model=False)
ROW_WISE = ParamDef("nuslerp_row_wise", False, per_model=False)
GRAM, FIBRES = "nuslerp.gram", "nuslerp.fibres"
NORM_CLAMP = 1e-7  # mergekit's _normalize
COLINEAR = 1e-8  # |sin Ω| at most this: linear interpolation


def interpolation_t(weights: Sequence[float]) -> float:
    """t = w₁ / (w₀ + w₁); 0.5 where the weights (nearly) cancel, as mergekit."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def coefficients(t: float, s00: float, s11: float, s01: float) -> tuple[float, float, float | None]:
    """(c₀, c₁, divisor) with θ = (c₀·v₀ + c₁·v₁) / divisor; divisor None: no division."""
    # sqrt of the product rather than a product of roots: equal vectors give cos Ω == 1 exactly
    scale = math.sqrt(max(s00, NORM_CLAMP**2) * max(s11, NORM_CLAMP**2))
    cos = min(max(s01 / scale, -1.0), 1.0)
    if 1.0 - cos * cos <= COLINEAR**2:  # mergekit 0.1.5's test: sin² Ω <= ε²
        return 1.0 - t, t, None
    omega = math.acos(cos)
    return math.sin((1.0 - t) * omega), math.sin(t * omega), math.sin(omega)


class NuSlerp(Method):
    name = "nuslerp"
    params = (WEIGHT, FLATTEN, ROW_WISE)
    min_models = 1
    max_models = 2
    base_optional = True
    row_aligned = True  # dim-0 fibre sums take whole rows

    def validate(self, p: TensorParams) -> None:
        got = len(p.models) + p.base_is_model
        if got != 2:
            where = "" if p.base_is_model else " besides base_model"
            raise SpecError(f"nuslerp merges exactly two models: list two models{where}, got {got}")

    def reducers(self, p: TensorParams) -> Sequence[Reducer]:
        vectors = input_vectors(p, len(p.models))
        if p.flag("nuslerp_flatten"):
            return (Gram(GRAM, vectors, [(0, 0), (1, 1), (0, 1)]),)
        return (FibreSums(vectors, p.flag("nuslerp_row_wise")),)

    def steps(self, p: TensorParams, stats: Stats, n_models: int) -> Sequence[Step] | None:
        if not p.flag("nuslerp_flatten"):
            return None
        g = stats[GRAM]
        t = interpolation_t(input_weights(p))
        c0, c1, divisor = coefficients(t, g[(0, 0)], g[(1, 1)], g[(0, 1)])
        return combination((c0, c1), input_vectors(p, n_models), divisor)

    def apply(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> torch.Tensor:
        streams = [base, *models]
        program = self.steps(p, stats, len(models))
        if program is not None:
            return steps.run(streams, program)
        f: _Fibres = stats[FIBRES].to(c.device)
        v0, v1 = (_vector(streams, v) for v in input_vectors(p, len(models)))
        fibre = f.index(c.start, v0.numel())
        out = v0.mul_(f.c0[fibre]).add_(v1.mul_(f.c1[fibre])).div_(f.divisor[fibre])
        return out if p.base_is_model else out.add_(base)


def _vector(streams: Sequence[torch.Tensor], v: Vector) -> torch.Tensor:
    """The vector's chunk, in place over its (scratch) model chunk where it is a delta."""
    a, b = v
    if b == ALONE:
        return streams[a].clone() if a == 0 else streams[a]
    return streams[a].sub_(streams[b])


class _Fibres:
    """Per-fibre float32 coefficients (c₀, c₁, divisor; divisor 1 where none) and the geometry
    that maps a flat index to its fibre."""

    def __init__(self, along_dim0: bool, length: int, period: int, coeffs: torch.Tensor) -> None:
        self.along_dim0, self.length, self.period = along_dim0, length, period
        self.c0, self.c1, self.divisor = coeffs.to(torch.float32)

    def index(self, start: int, n: int) -> torch.Tensor:
        flat = torch.arange(start, start + n, device=self.c0.device)
        return flat % self.period if self.along_dim0 else flat // self.length

    def to(self, device: torch.device) -> _Fibres:
        if self.c0.device != device:
            self.c0, self.c1, self.divisor = (x.to(device) for x in (self.c0, self.c1, self.divisor))
        return self


def fibre_geometry(shape: Sequence[int], along_dim0: bool) -> tuple[bool, int, int]:
    """(along dim 0, fibre length, fibre count) of a tensor: a 0-D or 1-D tensor is one fibre."""
    numel = math.prod(shape)
    if len(shape) <= 1:
        return False, numel, 1
    if along_dim0:
        return True, shape[0], numel // shape[0]
    return False, shape[-1], numel // shape[-1] if shape[-1] else 0


class FibreSums(Reducer):
    """Puts `stats[FIBRES]`: each fibre's coefficients from its ‖v₀‖², ‖v₁‖², v₀·v₁, each a float64
    sum of exact products in flat-index order (sequential within the fibre), on the CPU."""

    def __init__(self, vectors: Sequence[Vector], along_dim0: bool) -> None:
        self.vectors, self.along_dim0 = list(vectors), along_dim0

    def start(self, p: TensorParams, stats: Stats, numel: int) -> Any:
        return {"sums": None}

    def chunk(
        self, acc: Any, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> None:
        dim0, length, count = fibre_geometry(c.shape, self.along_dim0)
        if acc["sums"] is None:
            acc.update(sums=torch.zeros(3, count, dtype=torch.float64), geometry=(dim0, length, count))
        v0, v1 = (_vector([base, *models], v).double().cpu() for v in self.vectors)
        terms = torch.stack([v0 * v0, v1 * v1, v0 * v1])  # (3, n) exact in float64
        if dim0:
            _add_rows(acc["sums"], terms, c.start, count)
        else:
            _add_runs(acc["sums"], terms, c.start, length)

    def finish(self, acc: Any, p: TensorParams, stats: Stats) -> dict[str, Any]:
        sums = acc["sums"] if acc["sums"] is not None else torch.zeros(3, 0, dtype=torch.float64)
        dim0, length, count = acc.get("geometry", (False, 1, 0))
        t = interpolation_t(input_weights(p))
        out = torch.empty(3, sums.shape[1], dtype=torch.float64)
        for i, (s00, s11, s01) in enumerate(sums.T.tolist()):
            c0, c1, divisor = coefficients(t, s00, s11, s01)
            out[:, i] = torch.tensor([c0, c1, 1.0 if divisor is None else divisor], dtype=torch.float64)
        return {FIBRES: _Fibres(dim0, length, max(count, 1), out)}


def _add_runs(sums: torch.Tensor, terms: torch.Tensor, start: int, length: int) -> None:
    """Add the terms of flat positions [start, start + n) to their fibres (runs of `length`
    positions) one after another: a fibre's partial sum continues where the last chunk left it."""
    n, at = terms.shape[1], 0
    while at < n:
        fibre, offset = divmod(start + at, length)
        take = min(length - offset, n - at)
        first = fibre
        whole = 0 if offset else (n - at) // length
        if whole:  # several whole fibres at once: each one's running sum, sequential
            block = terms[:, at : at + whole * length].reshape(3, whole, length)
            block = torch.cat([torch.zeros(3, whole, 1, dtype=torch.float64), block], dim=2)
            sums[:, first : first + whole] = torch.cumsum(block, dim=2)[:, :, -1]
            at += whole * length
            continue
        part = torch.cat([sums[:, fibre : fibre + 1], terms[:, at : at + take]], dim=1)
        sums[:, fibre] = torch.cumsum(part, dim=1)[:, -1]
        at += take


def _add_rows(sums: torch.Tensor, terms: torch.Tensor, start: int, period: int) -> None:
    """Add the terms of whole rows (each `period` positions, one per fibre) to the fibres' sums,
    row after row."""
    rows = terms.reshape(3, -1, period)
    sums.copy_(torch.cumsum(torch.cat([sums.unsqueeze(1), rows], dim=1), dim=1)[:, -1])
