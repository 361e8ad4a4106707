"""Whole-tensor reference merges, written from the papers' formulas; `engine` never imports this.

They load every tensor whole (as today's tools do) and must agree bit for bit with the engine's
block-wise output: the float32 operations are done in the same order, elementwise, so any
difference is a blocking bug, not rounding.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
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
