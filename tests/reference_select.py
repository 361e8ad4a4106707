"""Whole-tensor references for sce, ram, ramplus_tl and model stock's `filter_wise`, written from
mergekit's code (merge_methods/sce.py, ram.py, model_stock.py) with the engine's defined choices:
ties at the top-k cut kept from the lowest flat index (a stable sort), norms and sums in the
engine's fixed orders (`reference.pairwise_sum`; a row's sum by halving over the row padded to
a power of two), sums over models in model order. Nothing here is shared with `engine`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from reference import merge_per_tensor, model_stock_ref, pairwise_sum


def _model_sum(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    out = xs[0].clone()
    for x in xs[1:]:
        out = out + x
    return out


def sce_ref(base: torch.Tensor, models: Sequence[torch.Tensor], select_topk: float) -> torch.Tensor:
    """mergekit's sce_merge on float32 tensors."""
    tvs = [m - base for m in models]
    if select_topk < 1.0:
        stack = torch.stack([t.double() for t in tvs])
        mean = _model_sum(list(stack)) / len(tvs)
        var = (_model_sum([(x - mean) * (x - mean) for x in stack]) / len(tvs)).float().abs()
        k = int(torch.count_nonzero(var) * select_topk)
        mask = torch.zeros(var.numel())
        mask[torch.sort(var.reshape(-1), descending=True, stable=True).indices[:k]] = 1.0
        tvs = [t * mask.view(t.shape) for t in tvs]
    n = base.numel()
    means = torch.tensor([pairwise_sum(t.double() * t.double()) / n for t in tvs], dtype=torch.float64).float()
    total = float(_model_sum(list(means)))
    weights = torch.full((len(tvs),), 1.0 / len(tvs)) if abs(total) < 1e-6 else means / total
    majority = torch.where(_model_sum(tvs) >= 0, 1.0, -1.0)
    erased = [w * (t.sign() == majority) for t, w in zip(tvs, weights)]
    merged = _model_sum([t * e for t, e in zip(tvs, erased)])
    return base + merged / _model_sum(erased).clamp(min=1e-6)


def ram_ref(
    base: torch.Tensor, models: Sequence[torch.Tensor], epsilon: float, plus: tuple[float, float] | None = None
) -> torch.Tensor:
    """mergekit's ram_merge, or ramplus_tl_merge with plus = (r, alpha), on float32 tensors."""
    tv = torch.stack([m - base for m in models]).view(len(models), -1)
    nonzero = tv.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    overlap, unique = counts > 1, counts == 1
    lam = torch.ones(len(models), 1)
    if plus is not None:
        r, alpha = plus
        rho = (nonzero & overlap).sum(dim=1) / (nonzero & unique).sum(dim=1).clamp(min=epsilon)
        lam = (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)
    tvz = tv * nonzero
    terms = tvz * unique * lam if plus is not None else tvz * unique
    terms = terms + tvz * overlap / counts.clamp(min=1)
    return base + _model_sum(list(terms)).view(base.shape)


def _row_sums(terms: np.ndarray) -> np.ndarray:
    width = 1 << max(terms.shape[1] - 1, 0).bit_length()
    v = np.concatenate([terms, np.zeros((terms.shape[0], width - terms.shape[1]))], axis=1)
    while v.shape[1] > 1:
        half = v.shape[1] // 2
        v = v[:, :half] + v[:, half:]
    return v[:, 0] + 0.0


def model_stock_rows_ref(base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
    """Model stock with filter_wise: one t per row of a 2-D (or more) tensor; a tensor whose rows
    hold one element takes the whole-tensor angle."""
    rows = base.shape[0] if base.dim() >= 1 else 1
    if base.dim() < 2 or base.numel() == rows:
        return model_stock_ref(base, models)
    b = base.reshape(rows, -1)
    offsets = [(m.reshape(rows, -1) - b).double().numpy() for m in models]
    k = len(models)
    ts = []
    for r in range(rows):
        cos = 0.0
        for i in range(k):
            for j in range(i + 1, k):
                ni = math.sqrt(_row_sums(offsets[i][r : r + 1] ** 2)[0])
                nj = math.sqrt(_row_sums(offsets[j][r : r + 1] ** 2)[0])
                dot = _row_sums(offsets[i][r : r + 1] * offsets[j][r : r + 1])[0]
                cos += min(max(dot / max(ni * nj, 1e-6), -1.0), 1.0)
        c = cos / (k * (k - 1) // 2)
        den = 1.0 + (k - 1) * c
        ts.append(k * c / den if den != 0.0 else 0.0)
    t = torch.tensor(ts, dtype=torch.float64)
    avg = _model_sum([m.reshape(rows, -1) for m in models]) / k
    return (avg * t.float()[:, None] + b * (1.0 - t).float()[:, None]).view(base.shape)


def select_merge(method: str, base: torch.Tensor, models: Sequence[torch.Tensor], **p: object) -> torch.Tensor:
    """One float32 tensor merged by `method`; parameters as in the spec (mergekit's defaults)."""
    if method == "sce":
        return sce_ref(base, models, float(p.get("select_topk", 1.0)))  # type: ignore[arg-type]
    eps = float(p.get("epsilon", 1e-5))  # type: ignore[arg-type]
    if method == "ram":
        return ram_ref(base, models, eps)
    if method == "ramplus_tl":
        return ram_ref(base, models, eps, (float(p.get("r", 0.1)), float(p.get("alpha", 0.2))))  # type: ignore[arg-type]
    if method == "model_stock":
        return model_stock_rows_ref(base, models) if p.get("filter_wise") else model_stock_ref(base, models)
    raise ValueError(method)


def merge_folders_select(
    method: str, base_dir: Path, model_dirs: Sequence[Path], out_dtype: torch.dtype | None = None, **params: object
) -> dict[str, torch.Tensor]:
    """Every tensor of the folders merged by `select_merge`, cast to the base's dtype (or `out_dtype`)."""
    merged = lambda _, b, ms: select_merge(method, b, ms, **params)  # noqa: E731
    return merge_per_tensor(merged, base_dir, model_dirs, out_dtype, keep_empty=True)
