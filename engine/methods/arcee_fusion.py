"""Arcee Fusion: keep the model's change only where it matters most (mergekit's `arcee_fusion`,
Arcee AI, https://arcee.ai; "dynamic threshold fusion").

With the base b and exactly one model m, per element
    importance = |m − b| · KL(p ‖ q),   p = softmax(m) + 1e-8,  q = softmax(b) + 1e-8,
the softmax and the KL divergence Σ p·log(p/q) taken along the last dim (per row of a 2-D
weight; a 1-D tensor is one vector), and over the whole tensor
    threshold = Q₂ + 1.5·(Q₃ − Q₁),   Qⱼ = the importance of sorted index ⌊qⱼ·(n − 1)⌋
(qⱼ = 0.25, 0.5, 0.75 as float32, mergekit's index rule), then θ = b + (m − b)·[importance ≥ threshold].

Out of core: a chunk holds whole rows (`row_aligned`), so each last-dim fibre, its softmax and
its KL sum are in one chunk; the importance is a function of its row alone. The three quantiles
are exact k-th smallest values over the whole tensor, found by a radix select on the float bits
(two passes: a histogram of the high 16 bits of an order-preserving key, then of the low 16 bits
inside the chosen buckets; only the values are needed, so no tie pass). The apply pass computes
the importance a third time. Fixed order and layout make the bytes independent of the block
size, device and thread count: the KL sum is a float64 sum in index order within its row; the
importance is computed on the CPU whatever the device (torch's float32 exp and log differ
between CPU and CUDA), its log in 64-aligned slices below torch's parallel grain, so every
element goes through the same code path wherever the chunk starts.

Where it must match mergekit: the formula, eps, the index rule and the float32 threshold
arithmetic. Deliberate differences: mergekit sums the KL in float32 in torch's order (here a
float64 sum rounded to float32), and above 1e6 elements it estimates the quantiles from a random
sample of 1e6 (drawn from torch's global RNG: not reproducible); here they are exact, from all
elements. A 1-D tensor's one vector must fit one compute chunk (2**18 elements on the CPU) and one
block: otherwise the merge stops, naming the tensor and the limit (no LLM has such a 1-D tensor:
norms and biases are a few thousand elements). Why not lift it: the reference softmaxes the
vector whole with torch, whose max and sum of exps run in its kernel's own order; a softmax
assembled from pieces would differ from it in the last bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from engine.budget import CHUNK_ELEMS
from engine.errors import BudgetError
from engine.methods.base import Chunk, Method, Reducer, Stats, TensorParams

EPS = 1e-8
QUANTILES = (0.25, 0.5, 0.75)
THRESHOLD = "arcee_fusion.threshold"
_SLICE = 511 * 64  # elements per log call: a multiple of 64, below torch's grain (32768)
_BINS = 1 << 16


def _log(x: torch.Tensor) -> torch.Tensor:
    """log of a flat float32 tensor in fixed slices: each one single-threaded, 64-aligned, no
    scalar tail, so an element's result does not depend on where the chunk started."""
    n = x.numel()
    padded = torch.ones(-(-n // 64) * 64, dtype=torch.float32)
    padded[:n] = x
    for s in range(0, padded.numel(), _SLICE):
        torch.log(padded[s : s + _SLICE], out=padded[s : s + _SLICE])
    return padded[:n]


def row_width(shape: Sequence[int]) -> int:
    """Elements per softmax vector: the last dim; a 0-D or 1-D tensor is one vector."""
    if len(shape) <= 1:
        return max(1, shape[0] if shape else 1)
    return shape[-1]


def importance(base: torch.Tensor, model: torch.Tensor, c: Chunk) -> torch.Tensor:
    """|m − b| · KL per element of a chunk of whole vectors, float32, on the CPU. (n,) -> (n,)."""
    w, n = row_width(c.shape), base.numel()
    if len(c.shape) <= 1 and n != c.numel:
        raise BudgetError(_too_long(c, n))
    b, m = base.cpu().view(-1, w), model.cpu().view(-1, w)
    p = torch.softmax(m, dim=-1).add_(EPS)
    q = torch.softmax(b, dim=-1).add_(EPS)
    terms = p.mul_(_log((p / q).view(-1)).view(-1, w)).double()
    kl = torch.cumsum(terms, dim=1)[:, -1:].float()  # sequential in index order within the row
    return (m - b).abs_().mul_(kl).view(-1)


def _too_long(c: Chunk, n: int) -> str:
    """Why a 1-D tensor cut into chunks of `n` elements cannot be merged, and the fix: a larger
    block, unless the CPU's compute chunk (`CHUNK_ELEMS`, fixed) is what cut it."""
    where = f"arcee_fusion: tensor {c.tensor!r} is 1-D, one softmax vector of {c.numel} elements,"
    if c.device.type == "cpu" and n >= CHUNK_ELEMS:
        return f"{where} but a compute chunk holds at most {n}: merge this model with another method"
    return f"{where} but a block here holds {n}: raise --block-size so that one block holds it"


def order_key(x: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2**32) that order as the float32 values (−0 just below +0)."""
    u = x.view(torch.int32).long() & 0xFFFFFFFF
    return torch.where(u >= 1 << 31, 0xFFFFFFFF - u, u + (1 << 31))


def key_value(key: int) -> float:
    """The float32 value of an `order_key`."""
    u = key - (1 << 31) if key >= 1 << 31 else 0xFFFFFFFF - key
    return float(torch.tensor([u - (1 << 32) if u >= 1 << 31 else u], dtype=torch.int32).view(torch.float32))


def quantile_ranks(n: int) -> list[int]:
    """mergekit's sorted indices: (q as float32 · (n − 1)).long()."""
    return [int(i) for i in (torch.tensor(QUANTILES) * (n - 1)).long()]


def _bucket(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """(bin, rank inside it) of the 0-based `rank`-th smallest key counted in `hist`."""
    cum = hist.cumsum(0)
    b = int(torch.searchsorted(cum, torch.tensor([rank], dtype=cum.dtype), right=True))
    return b, rank - (int(cum[b - 1]) if b else 0)


class _HighPass(Reducer):
    """Pass 1: histogram of the importance keys' high 16 bits."""

    def start(self, p: TensorParams, stats: Stats, numel: int) -> Any:
        return {"hist": torch.zeros(_BINS, dtype=torch.int64), "n": numel}

    def chunk(
        self, acc: Any, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> None:
        acc["hist"] += torch.bincount(order_key(importance(base, models[0], c)) >> 16, minlength=_BINS)

    def finish(self, acc: Any, p: TensorParams, stats: Stats) -> dict[str, Any]:
        return {f"{THRESHOLD}/1": [_bucket(acc["hist"], r) for r in quantile_ranks(acc["n"])]}


class _LowPass(Reducer):
    """Pass 2: per wanted rank, histogram of the low 16 bits of the keys in its bucket; the
    quantiles' exact values, and the threshold from them in float32."""

    def start(self, p: TensorParams, stats: Stats, numel: int) -> Any:
        return {"want": stats[f"{THRESHOLD}/1"], "hists": [torch.zeros(_BINS, dtype=torch.int64) for _ in QUANTILES]}

    def chunk(
        self, acc: Any, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> None:
        key = order_key(importance(base, models[0], c))
        for (bucket, _), hist in zip(acc["want"], acc["hists"]):
            hist += torch.bincount(key[(key >> 16) == bucket] & 0xFFFF, minlength=_BINS)

    def finish(self, acc: Any, p: TensorParams, stats: Stats) -> dict[str, Any]:
        values = []
        for (bucket, rank), hist in zip(acc["want"], acc["hists"]):
            low, _ = _bucket(hist, rank)
            values.append(key_value(bucket << 16 | low))
        q1, median, q3 = (torch.tensor(v, dtype=torch.float32) for v in values)
        return {THRESHOLD: float(median + 1.5 * (q3 - q1))}  # float32 ops, as mergekit's


class ArceeFusion(Method):
    name = "arcee_fusion"
    params = ()
    min_models = 1
    max_models = 1
    row_aligned = True  # each softmax vector (a row's last-dim fibres) in one chunk

    def reducers(self, p: TensorParams) -> Sequence[Reducer]:
        return (_HighPass(), _LowPass())

    def apply(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> torch.Tensor:
        keep = importance(base, models[0], c) >= torch.tensor(stats[THRESHOLD], dtype=torch.float32)
        return models[0].sub_(base).mul_(keep.float().to(base.device)).add_(base)
