"""Exact sums of float32 values and of products of float32 values, out of core.

Norms and dot products over a whole tensor (SLERP, model stock, DARE's L1 rescale) are folded in
chunk by chunk. A float sum depends on the order and grouping of its terms, so a plain running
float64 sum would change with the block size, the device and the thread count. This one cannot:
every term is added exactly, and the total is rounded once, at the end, to the nearest float64.

Why it is exact: a float32 value, or the product of two float32 values split into two parts,
is a float64 with at most 24 significant bits. Terms are binned by their float64 sign and
exponent; within one bin every term is a multiple of 2**(E-23) and below 2**(E+1), so up to 2**29
of them add up exactly in float64, in any order (`scatter_add_`'s order included). Before a bin
could hold more, the bins are spilled into a Python list. `math.fsum` of the bins is the
correctly rounded exact total.

Cost (2-core Xeon, 64K-element sub-chunks): ~2 ns per float32 value; per product ~3.4 ns for
bf16 weights, ~4.7 ns for their deltas, 5-6 ns for full float32 data. On a GPU the steps are 4M
elements and nothing waits for the device (no count of the zero low parts: zeros are spread).
"""

from __future__ import annotations

import functools
import math

import torch

_BINS = 4096  # float64 sign and exponent: 1 + 11 bits
# Each bin has this many lanes, taken in turn by consecutive terms: a run of terms with one
# exponent (zeros, say) would otherwise be a chain of dependent adds to one address, 3x slower.
_LANES = 8
SUB = 1 << 16  # elements per sub-chunk: its float64 temporaries stay in L2
# On a GPU there is no L2 to stay in and each sub-chunk costs ~15 kernel launches; 4M elements
# keep the float64 temporaries (~8 arrays, 256 MiB) inside the work arrays the GPU plan counts.
DEVICE_SUB = 1 << 22
# Zero terms add nothing wherever they land; on a GPU they are spread over this many lanes of
# their own, past the bins, so that a run of them does not queue atomic adds on one address.
_ZERO_LANES = 1 << 12
_MAX_TERMS = 1 << 29  # terms the bins may hold before a float64 bin sum could round
# Keeps the sign, the exponent and the top 23 fraction bits (a 24-bit significand).
_HIGH = -(1 << 29)


class ExactSum:
    """A running sum, exact until `value()`. Terms are float32 values or float32 products."""

    def __init__(self) -> None:
        self._bins: torch.Tensor | None = None  # float64 (4096 * 8,), made on the first chunk's device
        self._terms = 0
        self._spilled: list[float] = []

    def add(self, x: torch.Tensor) -> None:
        """Add every element of the float32 tensor `x`."""
        flat, step = x.reshape(-1), sub_size(x.device)
        for s in range(0, flat.numel(), step):
            self._bin(flat[s : s + step].double())

    def add_products(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add Σ xᵢ·yᵢ over the elements of two float32 tensors of one shape."""
        fx, fy, step = x.reshape(-1), y.reshape(-1), sub_size(x.device)
        for s in range(0, fx.numel(), step):
            self.add_products64(fx[s : s + step].double(), fy[s : s + step].double())

    def add_products64(self, x64: torch.Tensor, y64: torch.Tensor) -> None:
        """As `add_products`, for float64 copies of float32 data (convert once, pair many times)."""
        p = x64 * y64  # exact: 24 x 24 bits fit float64's 53
        high = (p.view(torch.int64) & _HIGH).view(torch.float64)
        self._bin(high)
        low = p.sub_(high)  # the low 24 bits, exact
        if _gpu(low.device):  # counting would wait for the GPU: spread the zeros instead
            self._bin(low)
            return
        # Products of bf16 weights fit in 24 bits, and of their deltas nearly all do: bin only
        # the low parts that are not zero (zeros add nothing, and cost the most: one address).
        some = int(torch.count_nonzero(low))
        if some:
            self._bin(low if some > low.numel() // 8 else low[low != 0])

    def _bin(self, v: torch.Tensor) -> None:
        """Add float64 terms of at most 24 significant bits into their sign-and-exponent bins."""
        if self._bins is None:
            self._bins = torch.zeros(_BINS * _LANES + _ZERO_LANES, dtype=torch.float64, device=v.device)
        if self._terms + v.numel() > _MAX_TERMS:
            self._spill()
        # int64 >> 52 is the exponent for positive terms and exponent - 2048 for negative ones.
        # One cached offsets tensor per device, a step long (a longer call grows it).
        size = max(sub_size(v.device), v.numel())
        lanes = _lane_offsets(size, v.device)[: v.numel()]
        index = torch.add(lanes, v.view(torch.int64) >> 52, alpha=_LANES)
        if _gpu(v.device):
            spread = _zero_lanes(size, _ZERO_LANES, v.device)[: v.numel()]
            index = torch.where(v == 0, spread, index)
        self._bins.scatter_add_(0, index, v)
        self._terms += v.numel()

    def _spill(self) -> None:
        assert self._bins is not None
        self._spilled += self._bins[self._bins != 0].tolist()
        self._bins.zero_()
        self._terms = 0

    def value(self) -> float:
        """The exact sum rounded to the nearest float64 (NaN if inf and -inf were both added)."""
        terms = self._spilled + ([] if self._bins is None else self._bins[self._bins != 0].tolist())
        try:
            return math.fsum(terms)
        except ValueError:  # inf + -inf
            return math.nan


def sub_size(device: torch.device) -> int:
    """Elements summed per step: L2-sized on the CPU, large on a GPU (see DEVICE_SUB)."""
    return DEVICE_SUB if _gpu(device) else SUB


def _gpu(device: torch.device) -> bool:
    """Whether to take the GPU's path (tests take it on the CPU)."""
    return device.type != "cpu"


@functools.lru_cache(maxsize=4)
def _zero_lanes(n: int, lanes: int, device: torch.device) -> torch.Tensor:
    """int64 (n,): the lane past the bins where zero term i is added (read only, shared)."""
    return torch.arange(n, device=device).remainder_(lanes).add_(_BINS * _LANES)


@functools.lru_cache(maxsize=4)
def _lane_offsets(n: int, device: torch.device) -> torch.Tensor:
    """int64 (n,): where the lanes of term i's bin start, less its exponent (read only, shared by
    every sum on `device`)."""
    return torch.arange(n, device=device).remainder_(_LANES).add_(_BINS // 2 * _LANES)
