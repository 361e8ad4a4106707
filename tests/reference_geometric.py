"""Whole-tensor references for nuslerp, multislerp, karcher and nearswap; `engine` never imports this.

Each loads whole float32 tensors, forms the vectors (deltas) elementwise, sums norms and dot
products in the engine's defined orders without its code (`reference.pairwise_dot` for whole
tensors, numpy's sequential `cumsum` per fibre), computes the coefficients from the formulas in
float64 and applies them to the whole tensor with torch: the block-wise merge must equal it bit
for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from reference import load_model, pairwise_dot


def nuslerp_coefficients(t: float, s00: float, s11: float, s01: float) -> tuple[float, float, float]:
    """(sin((1 − t)Ω), sin(tΩ), sin Ω), or (1 − t, t, 1) where sin² Ω <= 1e-16."""
    cos = s01 / math.sqrt(max(s00, 1e-14) * max(s11, 1e-14))
    cos = min(max(cos, -1.0), 1.0)
    if 1.0 - cos * cos <= 1e-16:
        return 1.0 - t, t, 1.0
    omega = math.acos(cos)
    return math.sin((1.0 - t) * omega), math.sin(t * omega), math.sin(omega)


def fibre_view(x: torch.Tensor, row_wise: bool) -> torch.Tensor:
    """(fibres, length): the last-dim fibres, or the dim-0 ones (mergekit's transpose(0, -1))."""
    if x.dim() <= 1:
        return x.reshape(1, -1)
    if row_wise:
        return x.reshape(x.shape[0], -1).T
    return x.reshape(-1, x.shape[-1])


def nuslerp_ref(
    base: torch.Tensor | None, models: Sequence[torch.Tensor], weights: Sequence[float], flatten: bool, row_wise: bool
) -> torch.Tensor:
    """mergekit's nuslerp of two models (base None) or of their deltas from `base`."""
    v0, v1 = (m if base is None else m - base for m in models)
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    if flatten:
        c0, c1, s = nuslerp_coefficients(t, pairwise_dot(v0, v0), pairwise_dot(v1, v1), pairwise_dot(v0, v1))
        out = (v0 * c0 + v1 * c1) / s
    else:
        f0, f1 = (fibre_view(v, row_wise).double().numpy() for v in (v0, v1))
        sums = [np.cumsum(a * b, axis=1)[:, -1] for a, b in ((f0, f0), (f1, f1), (f0, f1))]
        coeffs = torch.tensor([nuslerp_coefficients(t, *map(float, s)) for s in zip(*sums)], dtype=torch.float32)
        c0, c1, s = (coeffs[:, i : i + 1] for i in range(3))  # (fibres, 1)
        out0, out1 = fibre_view(v0.clone(), row_wise), fibre_view(v1.clone(), row_wise)
        mixed = (out0 * c0 + out1 * c1) / s
        out = (mixed.T if row_wise and v0.dim() > 1 else mixed).reshape(v0.shape)
    return out if base is None else out + base


def _gram(vectors: Sequence[torch.Tensor]) -> list[list[float]]:
    return [[pairwise_dot(a, b) for b in vectors] for a in vectors]


def _q(g: list[list[float]], a: Sequence[float], b: Sequence[float]) -> float:
    return sum(a[i] * sum(g[i][j] * b[j] for j in range(len(b))) for i in range(len(a)))


def _norm(g: list[list[float]], c: Sequence[float]) -> float:
    return math.sqrt(max(_q(g, c, c), 0.0))


def _combine(vectors: Sequence[torch.Tensor], coeffs: Sequence[float], base: torch.Tensor | None) -> torch.Tensor:
    out = vectors[0] * coeffs[0]
    for v, c in zip(vectors[1:], coeffs[1:]):
        out = out + v * c
    return out if base is None else out + base


def multislerp_ref(
    base: torch.Tensor | None, models: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:  # fmt: skip
    """mergekit's multislerp: tangent-space barycentre at the normalised weighted mean."""
    if len(models) == 1:
        return models[0]
    xs = [m if base is None else m - base for m in models]
    g, k = _gram(xs), len(xs)
    w = [x / sum(weights) for x in weights] if normalize else list(weights)
    norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(k)]
    unit = [1.0 / (n + eps) for n in norms]
    mean = [wi * ui for wi, ui in zip(w, unit)]
    mean_norm = _norm(g, mean)
    if mean_norm < eps:
        assert k == 2
        return _combine(xs, w, base)
    hat = [c / mean_norm for c in mean]
    dots = [unit[i] * _q(g, [1.0 if j == i else 0.0 for j in range(k)], hat) for i in range(k)]
    pull = sum(wi * d for wi, d in zip(w, dots))
    tangent = [c - pull * h for c, h in zip(mean, hat)]
    tn = _norm(g, tangent) + eps
    scale = sum(n * wi for n, wi in zip(norms, w))
    coeffs = [scale * (h * math.cos(tn) + c * (math.sin(tn) / tn)) for h, c in zip(hat, tangent)]
    return _combine(xs, coeffs, base)


def karcher_coeffs(g: list[list[float]], max_iter: int, tol: float) -> list[float]:
    """mergekit's Karcher iteration on the coefficients of u over the models."""
    k = len(g)
    norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(k)]
    valid = [i for i in range(k) if norms[i] > tol]
    if not valid:
        return [0.0] * k
    a = 1.0 / len(valid)
    units = {i: [1.0 / norms[i] if j == i else 0.0 for j in range(k)] for i in valid}
    u = [sum(a * units[i][j] for i in valid) for j in range(k)]
    nu = _norm(g, u)
    u = list(units[valid[0]]) if nu < tol else [c / nu for c in u]
    for _ in range(max_iter):
        t = [0.0] * k
        for i in valid:
            dot = min(max(_q(g, u, units[i]), -1.0), 1.0)
            theta = math.acos(dot)
            if theta < tol or math.sin(theta) == 0.0:
                continue
            f = a * theta / math.sin(theta)
            t = [tj + f * (uij - dot * uj) for tj, uij, uj in zip(t, units[i], u)]
        nt = _norm(g, t)
        if nt < tol or nt == 0.0:
            break
        u = [math.cos(nt) * uj + math.sin(nt) * (tj / nt) for uj, tj in zip(u, t)]
        un = _norm(g, u)
        if un > tol:
            u = [c / un for c in u]
    s = sum(n / k for n in norms)
    return [s * c for c in u]


def karcher_ref(models: Sequence[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    if len(models) == 1:
        return models[0]
    c = karcher_coeffs(_gram(models), max_iter, tol)
    return models[0] - models[0] if not any(c) else _combine(models, c, None)


def karcher_literal(models: Sequence[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """mergekit's karcher_merge_tensors on float64 vectors (for checking the coefficient form)."""
    xs = [m.double().reshape(-1) for m in models]
    norms = [float(torch.linalg.norm(x)) for x in xs]
    units = [x / n if n else torch.zeros_like(x) for x, n in zip(xs, norms)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    a = 1.0 / len(valid)
    u = sum(a * units[i] for i in valid)
    nu = float(torch.linalg.norm(u))  # type: ignore[arg-type]
    u = units[valid[0]].clone() if nu < tol else u / nu
    for _ in range(max_iter):
        t = torch.zeros_like(u)
        for i in valid:
            dot = float(torch.clamp(torch.dot(u, units[i]), -1.0, 1.0))
            theta = math.acos(dot)
            if theta < tol or math.sin(theta) == 0.0:
                continue
            t += a * (theta / math.sin(theta)) * (units[i] - dot * u)
        nt = float(torch.linalg.norm(t))
        if nt < tol or nt == 0.0:
            break
        u = math.cos(nt) * u + math.sin(nt) * (t / nt)
        un = float(torch.linalg.norm(u))
        if un > tol:
            u = u / un
    return (sum(norms) / len(xs) * u).reshape(models[0].shape)


def nearswap_ref(base: torch.Tensor, model: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit's nearswap_merge, as written."""
    absdiff = torch.abs(base - model)
    weight = (t / absdiff.clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * model + (1 - weight) * base


def arcee_fusion_ref(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """mergekit's arcee_fusion with exact quantiles (no sampling) and a float64 sequential KL sum."""
    w = base.shape[-1] if base.dim() > 1 else max(base.numel(), 1)
    b, m = base.reshape(-1, w), model.reshape(-1, w)
    p = torch.softmax(m, dim=-1) + 1e-8
    q = torch.softmax(b, dim=-1) + 1e-8
    terms = (p * torch.log(p / q)).double().numpy()
    kl = torch.from_numpy(np.cumsum(terms, axis=1)[:, -1:]).float()
    imp = ((m - b).abs() * kl).reshape(-1)
    ranks = (torch.tensor([0.25, 0.5, 0.75]) * (imp.numel() - 1)).long()
    q1, median, q3 = torch.sort(imp).values[ranks]
    threshold = median + 1.5 * (q3 - q1)
    mask = (imp >= threshold).float().reshape(base.shape)
    return base + (model - base) * mask


def merge_folders_geometric(
    method: str, base_dir: Path, model_dirs: Sequence[Path], out_dtype: torch.dtype | None = None, **params: object
) -> dict[str, torch.Tensor]:
    """Whole-tensor merge of the folders' float tensors: `params` as the config's, `weights` the
    vectors' weights in order, `has_base` False where the vectors are the models themselves."""
    base, models = load_model(base_dir), [load_model(d) for d in model_dirs]
    has_base, w = bool(params.get("has_base", True)), list(params.get("weights", []))  # type: ignore[call-overload]
    out = {}
    for name, b in base.items():
        if not b.is_floating_point():
            out[name] = b
            continue
        bf, ms = b.float(), [m[name].float() for m in models]
        origin = bf if has_base else None
        if method == "nuslerp":
            r = nuslerp_ref(origin, ms, w, bool(params.get("flatten", True)), bool(params.get("row_wise", False)))
        elif method == "multislerp":
            r = multislerp_ref(origin, ms, w, bool(params.get("normalize_weights", True)))
        elif method == "karcher":
            r = karcher_ref(ms, int(params.get("max_iter", 10)), float(params.get("tol", 1e-5)))  # type: ignore[call-overload, arg-type]
        elif method == "arcee_fusion":
            r = arcee_fusion_ref(bf, ms[0])
        else:
            r = nearswap_ref(bf, ms[0], float(params["t"]))  # type: ignore[arg-type]
        out[name] = r.to(out_dtype or b.dtype)
    return out
