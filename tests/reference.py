"""Whole-tensor reference merges, written from the papers' formulas; `engine` never imports this.

They load every tensor whole (as today's tools do) and must agree bit for bit with the engine's
block-wise output: the float32 operations are done in the same order, elementwise, so any
difference is a blocking bug, not rounding.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def load_model(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder (single file or sharded)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(load_file(str(folder / f)))
        return out
    return load_file(str(folder / "model.safetensors"))


def linear(
    base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool
) -> torch.Tensor:
    out = models[0] * weights[0]
    for m, w in zip(models[1:], weights[1:]):
        out += m * w
    if normalize:
        total = sum(weights)
        out /= 1.0 if abs(total) < 1e-8 else total
    return out


def task_arithmetic(
    base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float], lam: float, normalize: bool
) -> torch.Tensor:
    deltas = [m - base for m in models]
    mixed = linear(base, deltas, weights, normalize)
    if lam != 1.0:
        mixed = mixed * lam
    return base + mixed


def merge_folders(
    method: str, base_dir: Path, model_dirs: Sequence[Path], out_dtype: torch.dtype | None = None, **params: object
) -> dict[str, torch.Tensor]:
    """Merge whole tensors of the folders with `method`; returns name -> output tensor."""
    base = load_model(base_dir)
    models = [load_model(d) for d in model_dirs]
    weights = params.get("weights") or [1.0] * len(models)
    out = {}
    for name, b in base.items():
        if b.dtype not in FLOATS:
            out[name] = b
            continue
        bf = b.float()
        ms = [m[name].float() for m in models]
        if method == "linear":
            r = linear(bf, ms, weights, bool(params.get("normalize", True)))  # type: ignore[arg-type]
        elif method == "task_arithmetic":
            r = task_arithmetic(bf, ms, weights, float(params.get("lam", 1.0)), bool(params.get("normalize", False)))  # type: ignore[arg-type]
        elif method in ("dare_linear", "dare_ties"):
            r = dare_merge(
                method, name, bf, ms,
                weights=weights,  # type: ignore[arg-type]
                densities=params.get("densities") or [1.0] * len(models),  # type: ignore[arg-type]
                seed=int(params.get("seed", 0)),  # type: ignore[call-overload]
                lam=float(params.get("lam", 1.0)),  # type: ignore[arg-type]
                normalize=bool(params.get("normalize", False)),
                rescale=bool(params.get("rescale", True)),
            )  # fmt: skip
        else:
            raise ValueError(method)
        out[name] = r.to(out_dtype or b.dtype)
    return out


def dare(delta: torch.Tensor, keep: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """The paper's DARE: δ̂ = m ⊙ δ / (1 − p), m ~ Bernoulli(1 − p); DropOnly without the division."""
    if density >= 1.0:
        return delta
    dropped = delta * keep
    return dropped / density if rescale else dropped


def ties_merge(weighted: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """TIES elect + disjoint merge, whole tensor: sign of Σ wδ (0 counts as +), agreeing models only."""
    total = weighted[0].clone()
    for x in weighted[1:]:
        total += x
    sign = torch.where(total >= 0, 1.0, -1.0)
    mixed = torch.zeros_like(total)
    divisor = torch.zeros_like(total)
    for x, w in zip(weighted, weights):
        agree = torch.sign(x) == sign
        mixed += torch.where(agree, x, 0.0)
        divisor += torch.where(agree, w, 0.0)
    if normalize:
        mixed /= torch.where(divisor == 0, 1.0, divisor)
    return mixed


def dare_merge(
    method: str,
    name: str,
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    densities: Sequence[float],
    seed: int,
    lam: float = 1.0,
    normalize: bool = False,
    rescale: bool = True,
) -> torch.Tensor:
    """dare_linear / dare_ties on whole float32 tensors, masks from the engine's keyed streams."""
    from engine.rng import KeyedRng, stream_key

    deltas = []
    for i, (m, d) in enumerate(zip(models, densities)):
        keep = KeyedRng(stream_key(seed, name, i)).keep(0, base.numel(), d).view(base.shape)
        deltas.append(dare(m - base, keep, d, rescale))
    if method == "dare_linear":
        mixed = linear(base, deltas, weights, normalize)
    else:
        mixed = ties_merge([x * w for x, w in zip(deltas, weights)], weights, normalize)
    if lam != 1.0:
        mixed = mixed * lam
    return base + mixed


# --- Methods with tensor-wide statistics (TIES, breadcrumbs, DELLA, SLERP, model stock, DARE's
# norm rescale). Whole tensors: top-k by a stable sort of |δ| (largest first, equal magnitudes by
# lowest flat index), ranks by argsort, norms and dot products summed in the engine's defined
# order over the whole flat tensor at once (numpy), so none of them shares code with the engine's
# reducers, which must meet the same order chunk by chunk.


def pairwise_sum(terms: torch.Tensor, group: int = 4096) -> float:
    """Σ of float64 terms in the engine's defined order (engine.stats.pairwise), over the whole
    flat tensor: pad to a multiple of `group`, sum each group by halving, repeat on the sums."""
    import numpy as np

    v = terms.reshape(-1).numpy()
    while v.size > 1:
        v = np.concatenate([v, np.zeros(-v.size % group)]).reshape(-1, group)
        width = group
        while width > 1:
            width //= 2
            v = v[:, :width] + v[:, width : 2 * width]
        v = v[:, 0]
    return float(v[0]) + 0.0 if v.size else 0.0


def pairwise_dot(x: torch.Tensor, y: torch.Tensor) -> float:
    """Σ xᵢ·yᵢ of float32 tensors: float64 products are exact; summed pairwise."""
    return pairwise_sum(x.double().reshape(-1) * y.double().reshape(-1))


def rank_order(delta: torch.Tensor) -> torch.Tensor:
    """Flat indices by |δ| descending; equal magnitudes in index order (stable sort)."""
    return torch.sort(delta.abs().reshape(-1), descending=True, stable=True).indices


def keep_ranks(delta: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """δ with every element outside ranks [lo, hi) of `rank_order` zeroed (multiplied by 0)."""
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[rank_order(delta)[lo:hi]] = True
    return delta * mask.view(delta.shape)


def ties_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the int(density · n) largest magnitudes, at least one (mergekit 0.1.5)."""
    n = delta.numel()
    return delta if density >= 1.0 else keep_ranks(delta, 0, min(n, max(1, int(density * n))))


def breadcrumbs_trim(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's magnitude_outliers: drop the int(gamma · n) largest, keep the next int(density · n)."""
    if density >= 1.0:
        return delta
    n = delta.numel()
    k, n_top = int(density * n), int(gamma * n)
    n_bot = n - k - n_top
    if n_bot < 0:
        n_top += n_bot
    return keep_ranks(delta, n_top, n_top + k)


def della_trim(delta: torch.Tensor, density: float, epsilon: float, rescale: bool, rng: object) -> torch.Tensor:
    """DELLA MagPrune: per-row rank probabilities in [d − ε, d + ε], keyed keep, divide by p."""
    if density >= 1.0 or delta.numel() == 0:
        return delta
    w = int(torch.tensor(delta.shape[1:]).prod()) if delta.dim() > 1 else 1
    rows = delta.reshape(-1, w)
    if w == 1:
        prob = torch.full_like(rows, density)
    else:
        order = torch.sort(rows.abs(), dim=1, stable=True).indices  # ascending
        rank_norm = torch.argsort(order, dim=1).float() / (w - 1)  # the inverse permutation
        prob = (density - epsilon) + rank_norm * 2 * epsilon
    keep = rng.keep_where(0, prob.reshape(-1)).view(delta.shape)  # type: ignore[attr-defined]
    out = delta * keep
    return out / prob.view(delta.shape) if rescale else out


def slerp_ref(base: torch.Tensor, model: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit's slerp, with float64 pairwise norms and dot product."""
    import math

    n0, n1 = math.sqrt(pairwise_dot(base, base)), math.sqrt(pairwise_dot(model, model))
    dot = pairwise_dot(base, model) / ((n0 if n0 > 1e-8 else 1.0) * (n1 if n1 > 1e-8 else 1.0))
    if abs(dot) > 0.9995:
        return (1 - t) * base + t * model
    theta_0 = math.acos(dot)
    theta_t = theta_0 * t
    s0 = math.sin(theta_0 - theta_t) / math.sin(theta_0)
    s1 = math.sin(theta_t) / math.sin(theta_0)
    return s0 * base + s1 * model


def model_stock_ref(base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
    """Model Stock: t = N·cos / (1 + (N − 1)·cos), cos the mean pairwise cosine of the deltas."""
    import math

    offsets = [m - base for m in models]
    cos = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norms = math.sqrt(pairwise_dot(offsets[i], offsets[i])) * math.sqrt(pairwise_dot(offsets[j], offsets[j]))
            cos.append(min(max(pairwise_dot(offsets[i], offsets[j]) / max(norms, 1e-6), -1.0), 1.0))
    c = sum(cos) / len(cos)
    n = len(models)
    t = n * c / (1 + (n - 1) * c) if 1 + (n - 1) * c != 0 else 0.0
    avg = models[0].clone()
    for m in models[1:]:
        avg += m
    avg /= n
    return t * avg + (1 - t) * base


def dare_norm_trim(delta: torch.Tensor, keep: torch.Tensor, density: float, norm: str) -> torch.Tensor:
    """DARE with norm matching: m ⊙ δ · ‖δ‖ / ‖m ⊙ δ‖ (mergekit's rescaled_masked_tensor)."""
    import math

    if density >= 1.0 or delta.numel() == 0:
        return delta
    masked = delta * keep
    if norm == "linf":
        before, after = float(delta.abs().max()), float(masked.abs().max())
    elif norm == "l1":
        before, after = (
            pairwise_sum(delta.double().abs()),
            pairwise_sum(masked.double().abs()),
        )
    else:
        before, after = math.sqrt(pairwise_dot(delta, delta)), math.sqrt(pairwise_dot(masked, masked))
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


STATS_DEFAULTS: dict[str, dict[str, object]] = {
    "ties": {"normalize": True},
    "breadcrumbs": {"normalize": False, "gamma": 0.01},
    "breadcrumbs_ties": {"normalize": False, "gamma": 0.01},
    "della": {"normalize": True, "epsilon": 0.15, "rescale": True},
    "della_linear": {"normalize": False, "epsilon": 0.15, "rescale": True},
    "dare_linear": {"normalize": False, "rescale": True},
    "dare_ties": {"normalize": False, "rescale": True},
}


def stats_merge(
    method: str, name: str, base: torch.Tensor, models: Sequence[torch.Tensor], **params: object
) -> torch.Tensor:
    """One float32 tensor merged by a tensor-wide-statistics method; params as in the spec."""
    from engine.rng import KeyedRng, stream_key

    if method == "slerp":
        return slerp_ref(base, models[0], float(params.get("t", 0.5)))  # type: ignore[arg-type]
    if method == "model_stock":
        return model_stock_ref(base, models)
    p = {**STATS_DEFAULTS[method], **params}
    n = len(models)
    weights = list(p.get("weights") or [1.0] * n)  # type: ignore[call-overload]
    dens = list(p.get("densities") or [1.0] * n)  # type: ignore[call-overload]
    gammas = list(p.get("gammas") or [p.get("gamma", 0.01)] * n)  # type: ignore[call-overload]
    eps = list(p.get("epsilons") or [p.get("epsilon", 0.15)] * n)  # type: ignore[call-overload]
    deltas = []
    for i, (m, d) in enumerate(zip(models, dens)):
        delta = m - base
        rng = KeyedRng(stream_key(int(p.get("seed", 0)), name, i))  # type: ignore[call-overload]
        if method == "ties":
            deltas.append(ties_trim(delta, d))
        elif method.startswith("breadcrumbs"):
            deltas.append(breadcrumbs_trim(delta, d, gammas[i]))
        elif method.startswith("della"):
            deltas.append(della_trim(delta, d, eps[i], bool(p["rescale"]), rng))
        else:  # dare with rescale_norm
            keep = rng.keep(0, delta.numel(), d).view(delta.shape)
            deltas.append(dare_norm_trim(delta, keep, d, str(p["rescale_norm"])))
    if method in ("ties", "breadcrumbs_ties", "della", "dare_ties"):
        mixed = ties_merge([x * w for x, w in zip(deltas, weights)], weights, bool(p["normalize"]))
    else:
        mixed = linear(base, deltas, weights, bool(p["normalize"]))
    lam = float(p.get("lambda", 1.0))  # type: ignore[arg-type]
    return base + (mixed * lam if lam != 1.0 else mixed)


def merge_per_tensor(
    fn: Callable[[str, torch.Tensor, list[torch.Tensor]], torch.Tensor],
    base_dir: Path,
    model_dirs: Sequence[Path],
    out_dtype: torch.dtype | None = None,
    keep_empty: bool = False,
) -> dict[str, torch.Tensor]:
    """`fn(name, base, models)` on the float32 copies of every float tensor of the folders, cast to
    the base's dtype (or `out_dtype`); other tensors (and empty ones, with `keep_empty`) as they are."""
    base = load_model(base_dir)
    models = [load_model(d) for d in model_dirs]
    out = {}
    for name, b in base.items():
        if b.dtype not in FLOATS or (keep_empty and b.numel() == 0):
            out[name] = b
            continue
        out[name] = fn(name, b.float(), [m[name].float() for m in models]).to(out_dtype or b.dtype)
    return out


def merge_folders_stats(
    method: str, base_dir: Path, model_dirs: Sequence[Path], out_dtype: torch.dtype | None = None, **params: object
) -> dict[str, torch.Tensor]:
    """`merge_folders` for the tensor-wide-statistics methods (see `stats_merge`)."""
    return merge_per_tensor(lambda n, b, ms: stats_merge(method, n, b, ms, **params), base_dir, model_dirs, out_dtype)


def stack_layers(parts: Sequence[tuple[dict[str, torch.Tensor], int, int]]) -> dict[str, torch.Tensor]:
    """mergekit's passthrough over slices: layers [a, b) of each model in turn, renumbered from 0;
    embeddings from the first part's model, every other tensor outside the layers from the last's."""
    import re

    layer = re.compile(r"\.layers\.(\d+)\.")
    first, last = parts[0][0], parts[-1][0]
    out = {n: t for n, t in first.items() if not layer.search(n) and "embed" in n}
    j = 0
    for model, a, b in parts:
        for i in range(a, b):
            for n, t in model.items():
                m = layer.search(n)
                if m and int(m.group(1)) == i:
                    out[n[: m.start(1)] + str(j) + n[m.end(1) :]] = t
            j += 1
    out |= {n: t for n, t in last.items() if not layer.search(n) and "embed" not in n}
    return out
