"""Sums of float32 values and of products of float32 values in one fixed order, out of core.

Norms and dot products over a whole tensor (SLERP, model stock, DARE's norm rescale) are folded in
chunk by chunk. A float sum depends on the order and grouping of its terms, so a running sum, or
torch's own `sum`, would change with the block size, the device and the thread count. This one
cannot: the terms (float64, where float32 values and their products are exact) are added in one
order fixed by their flat index alone, a tree with GROUP children per node:

    while more than one term is left:
        zero-pad the terms to a multiple of GROUP and cut them into aligned groups;
        sum each group by halving (add its upper half onto its lower half until one is left);
        the group sums, in order, are the new terms

and `+ 0.0` at the end (a sum of negative zeros is +0.0, whatever the padding). Every add is one
IEEE float64 add, the same on every device; chunk boundaries only decide when an add happens,
never which. Like any pairwise sum its error is at most ~log2(n)·2**-53 of Σ|terms| (Higham, "The
accuracy of floating point summation", 1993), far below what the merge's float32 arithmetic sees.

How it streams: each level of the tree is a stage that keeps its last, unfinished group (fewer
than GROUP terms) until the next chunk completes it; a finished group is summed at once, as a
whole-tensor step, and its sum goes up a stage. The state is a few small tensors, nothing waits
for a GPU until `value()`, and chunks may be cut anywhere.

On the CPU the first level (products, widening and the GROUP-term groups) runs in C
(`engine.stats._fused`, one pass over the inputs, float32 or the bfloat16 read buffers themselves,
with the vectors' differences formed on the way; the same adds in the same order); the
torch path below does it on a GPU, in the head and tail of a chunk that cut a group, and where the
extension was not built. This replaced exact (correctly rounded) binned sums: 3.4-6 ns per
product on 2 cores, most of a SLERP or model stock merge (bench numbers in the README).
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import threading
from collections.abc import Hashable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from engine.cores import default_threads

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)
# The C's interface version (its module's ABI): raised with every change to its functions, so a
# stale build (a source checkout updated without rebuilding) is set aside, not called wrongly.
C_ABI = 2


def load_c(name: str = "engine.stats._fused") -> tuple[ModuleType | None, str]:
    """The C extension module, or None and why not (the torch path gives the same bytes, slower)."""
    try:
        module = importlib.import_module(name)
    except ImportError:
        return None, "the C extension is not built (no C compiler at install)"
    if getattr(module, "ABI", None) != C_ABI:
        return None, "the C extension was built from another version (rebuild it: pip install -e .)"
    return module, ""


_fused, _why_not = load_c()

GROUP = 1 << 12  # terms per group: a group's tree is 12 levels of whole-tensor adds
CPU_STEP = 1 << 18  # elements converted to float64 at once: 2 MiB per array
DEVICE_STEP = 1 << 22  # on a GPU a step costs ~15 kernel launches whatever its size
ALONE = -1  # the j of a pair (i, ALONE): the terms are vectors[i] itself, not a product
Pair = tuple[int, int]
# (a, b): the vector streams[a] − streams[b], one float32 subtraction per element (a model stock
# delta), or streams[a] itself where b is ALONE
Vector = tuple[int, int]
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the dtypes the C reads and writes


class PairwiseSums:
    """`batch` float64 sums of terms given in flat order, each by the tree over their index.

    The sums run side by side over the same flat positions (a tensor's norms and dot products),
    so every step is one whole-tensor op for all of them: the tree's small levels cost a launch
    each whatever their size, and a batch pays that once.
    """

    def __init__(self, batch: int = 1) -> None:
        self.batch = batch
        self._open: list[torch.Tensor] = []  # per stage: its unfinished group, (batch, < GROUP)

    def add(self, x: torch.Tensor) -> None:
        """Add the elements of the float32 tensor `x` (batch 1), which come next in flat order."""
        self.add_products([x], [(0, ALONE)])

    def add_products(
        self,
        streams: Sequence[torch.Tensor],
        pairs: Sequence[Pair],
        step: int | None = None,
        vectors: Sequence[Vector] | None = None,
    ) -> None:
        """Add vᵢₖ·vⱼₖ (or vᵢₖ where j is ALONE) for each (i, j) of `pairs`, the batch in order,
        where vᵢ is `vectors[i]` formed from `streams` (default: the streams themselves). The
        streams are tensors of one shape, next in flat order; the vectors are float32 (a float32 or
        bfloat16 stream is used as it is, read straight from its buffer by the C), so the
        products are exact in float64. `step` bounds the torch path's float64 temporaries
        (elements per step; default `step_size`)."""
        flat = [x.reshape(-1) for x in streams]
        vectors = tuple(vectors) if vectors is not None else tuple((a, ALONE) for a in range(len(flat)))
        n = flat[0].numel()
        head = min(n, -self.pending % GROUP)  # the terms that complete the open group
        kernel = fused_for(flat)
        fused = (n - head) // GROUP * GROUP if kernel else 0
        self._widened(flat, vectors, pairs, 0, head, step)
        if kernel and fused:
            sums = torch.empty(len(pairs), fused // GROUP, dtype=torch.float64)
            kernel.group_sums(
                tuple(as_buffer(x[head : head + fused]) for x in flat), vectors, tuple(pairs), sums.numpy(), c_threads()
            )
            self._push(1, sums)
        self._widened(flat, vectors, pairs, head + fused, n, step)

    @property
    def pending(self) -> int:
        """Terms added so far that do not fill a group yet (those of the open group of stage 0)."""
        return self._open[0].shape[1] if self._open else 0

    def add64(self, terms: torch.Tensor) -> None:
        """Add float64 terms, (batch, n), the next n positions of each sum. Overwrites `terms`."""
        self._push(0, terms)

    def values(self) -> list[float]:
        """Each tree's sum of every term added (0.0 for none). Closes the open groups: call it
        once, after the last add."""
        stage = 0
        while stage < len(self._open):
            rest = self._open[stage]
            if stage == len(self._open) - 1 and rest.shape[1] <= 1:
                return [(v[0] if v else 0.0) + 0.0 for v in rest.tolist()]
            if rest.shape[1]:  # the last group of this stage, zero-padded
                self._open[stage] = rest[:, :0]
                self._push(stage + 1, group_sums(torch.nn.functional.pad(rest, (0, GROUP - rest.shape[1]))))
            stage += 1
        return [0.0] * self.batch

    def value(self) -> float:
        """The sum, for a batch of 1."""
        (v,) = self.values()
        return v

    def _widened(
        self,
        flat: Sequence[torch.Tensor],
        vectors: Sequence[Vector],
        pairs: Sequence[Pair],
        a: int,
        b: int,
        step: int | None,
    ) -> None:
        """The torch path of `add_products` for flat positions [a, b): widen, multiply, `add64`."""
        if a >= b:  # the C took all of it (the usual case on the CPU)
            return
        device = flat[0].device
        step = step or step_size(device)
        used = sorted({i for pair in pairs for i in pair if i != ALONE})
        for s in range(a, b, step):
            n = min(step, b - s)
            wide = scratch("wide", (max(used) + 1, n), device)
            for i in used:  # to float64 once per vector
                x, y = vectors[i]
                v = flat[x][s : s + n]
                wide[i].copy_(v if y == ALONE else v.float() - flat[y][s : s + n].float())
            terms = scratch("terms", (len(pairs), n), device)
            for row, (i, j) in enumerate(pairs):
                if j == ALONE:
                    terms[row].copy_(wide[i])
                else:
                    torch.mul(wide[i], wide[j], out=terms[row])  # exact: 24 x 24 bits fit float64's 53
            self.add64(terms)

    def _push(self, stage: int, terms: torch.Tensor) -> None:
        """Append `terms` (batch, n) to a stage: finished groups are summed and go up one stage."""
        while stage >= len(self._open):
            self._open.append(terms.new_empty((self.batch, 0)))
        rest = self._open[stage]
        if rest.shape[1]:  # finish the open group first
            need = GROUP - rest.shape[1]
            rest = torch.cat([rest, terms[:, :need]], dim=1)
            terms = terms[:, need:]
            if rest.shape[1] < GROUP:
                self._open[stage] = rest
                return
            self._push(stage + 1, group_sums(rest))
        whole = terms.shape[1] // GROUP * GROUP
        if whole:
            self._push(stage + 1, group_sums(terms[:, :whole]))
        self._open[stage] = terms[:, whole:].clone()  # a copy: `terms` may be a view of a big buffer


def group_sums(terms: torch.Tensor) -> torch.Tensor:
    """The sum of each aligned group of GROUP terms, (batch, n) -> (batch, n / GROUP), by halving:
    the upper half of a group is added onto its lower half until one term is left. In place:
    `terms` is overwritten."""
    w, half = terms.view(terms.shape[0], -1, GROUP), GROUP // 2
    while half:
        w[..., :half].add_(w[..., half : 2 * half])
        half //= 2
    return w[..., 0].clone()  # a fresh copy: `terms` is scratch that the next step reuses


_local = threading.local()


def scratch(name: Hashable, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """A float64 tensor of `shape` in this thread's scratch array `name` on `device`, kept between calls.

    A fresh allocation of a step's float64 temporaries maps new pages each time: one SLERP merge of
    2.6 GB took 4M page faults and 8 s of system time on 2 cores before these were reused.
    """
    n = math.prod(shape)
    arrays: dict[tuple[Hashable, torch.device], torch.Tensor] = _local.__dict__.setdefault("arrays", {})
    buf = arrays.get((name, device))
    if buf is None or buf.numel() < n:
        buf = arrays[(name, device)] = torch.empty(n, dtype=torch.float64, device=device)
    return buf[:n].view(shape)


def release() -> None:
    """Free this thread's scratch arrays (at the end of a merge)."""
    _local.__dict__.pop("arrays", None)


@functools.cache
def say_if_slow() -> None:
    """Once per process, where the C is not in use (not built: no C compiler at install; or a
    stale build, set aside): the merge runs on the torch path, the same bytes several times slower."""
    if _fused is None:
        log.warning("leanmerge: %s: merging on the slower torch path", _why_not)


def fused_kernel(device: torch.device) -> ModuleType | None:
    """The C first level where it applies: built, for this GROUP (tests change it), on the CPU."""
    return _fused if _fused is not None and _fused.GROUP == GROUP and device.type == "cpu" else None


def fused_for(tensors: Sequence[torch.Tensor]) -> ModuleType | None:
    """The C where it can read (or write) every one of `tensors`: float32, bfloat16 or float16, on the CPU
    (`fused_kernel`)."""
    return fused_kernel(tensors[0].device) if all(x.dtype in FUSED_DTYPES for x in tensors) else None


def c_threads() -> int:
    """Threads of the C's pool one call may use: torch's compute threads (`--threads`), no more
    than the cores this process may use (`engine.cores`)."""
    return min(torch.get_num_threads(), default_threads())


def as_buffer(x: torch.Tensor) -> np.ndarray[Any, Any]:
    """`x`'s memory as the C reads it: float32 ('f'), float16 ('e'), or a bfloat16's bits ('h': numpy
    has no bfloat16)."""
    return (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy()


def step_size(device: torch.device) -> int:
    """Elements converted to float64 per step: cache-sized on the CPU, large on a GPU."""
    return CPU_STEP if device.type == "cpu" else DEVICE_STEP
