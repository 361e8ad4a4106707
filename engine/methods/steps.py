"""Merges that are a fixed sequence of float32 ops over their inputs, written once as data.

Once its statistics are known, every elementwise method merges each element with a handful of
ops: SLERP and model stock scaled adds (θ = c0·θ_base + c1·θ₁, or t·mean(θₘ) + (1 − t)·θ_base),
linear a weighted sum, and the delta methods (task arithmetic, DARE, TIES, breadcrumbs) a delta
per model in its own register, sparsified (DARE's keyed keep test, a top-k cut), weighted, mixed
(a sum, or TIES sign election and disjoint mean) and added to the base. `Method.steps` writes
that program; torch runs it (`run`, the same ops as `apply`), on any device; on the CPU the C
runs it over the read buffers straight into the output buffer (`fused`), one pass over memory
instead of one per op plus the float32 copies of every input and the cast of the result. The C
does each op as one IEEE float32 op in the program's order (where both operands of an add are
NaNs, the NaN torch's add gives) and rounds the result as torch's cast does, so both give the
same bytes (tests/test_fused_methods.py). DELLA (per-row ranks) has no program: its `apply` runs
MagPrune, then its weights, mix and base's add as the delta methods' program end (`mix_steps`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.methods.base import Chunk, div_, scale_
from engine.methods.consensus import disjoint_merge_
from engine.rng import keep_threshold
from engine.stats import pairwise
from engine.stats.topk import Cut, in_top, magnitude_key

SET, ADD, DIV, MUL, SUB, KEEP, TOP, ACC, ELECT = range(9)  # the C's op codes
NO_NORMALIZE, CLAMPED, ZERO_AS_ONE = 0, 1, 2  # ELECT's divisor: none, clamped below, 0 taken as 1


@dataclass(frozen=True)
class Step:
    """One op on a register of float32 values (0 the accumulator, m the m-th model's), per element.

    SET r = x[stream] (· scale); ADD r += x[stream] (· scale, rounded before the add); SUB r -=
    x[stream]; DIV r /= scale; MUL r *= scale; KEEP r *= DARE's keep test of model `stream` at
    density `scale` (`ints`: its threshold, `keep_threshold`); TOP r *= in the top-k cut `ints[:2]`
    and not in the cut `ints[2:]` (`engine.stats.topk.Cut`s: TIES, breadcrumbs); ACC r +=
    register `stream`; ELECT r = TIES disjoint merge of registers 1..stream (`weights`; `ints`:
    the divisor rule, `scale` its clamp). Streams: 0 the base, m the m-th model. The program's
    result is the register of its last step."""

    op: int
    stream: int = -1
    scale: float | None = None
    reg: int = 0
    ints: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()


def set_(stream: int, scale: float | None = None, reg: int = 0) -> Step:
    return Step(SET, stream, scale, reg)


def add(stream: int, scale: float | None = None, reg: int = 0) -> Step:
    return Step(ADD, stream, scale, reg)


def run(streams: Sequence[torch.Tensor], steps: Sequence[Step], c: Chunk | None = None) -> torch.Tensor:
    """The program with torch ops over float32 chunks (base first), the ops the methods' `apply`
    runs; `c` places the chunk for KEEP and TOP. A SET works in place on its model's (scratch)
    chunk where no later step reads it; never on the base's."""
    regs: dict[int, torch.Tensor] = {}
    for i, s in enumerate(steps):
        if s.op == SET:
            x = streams[s.stream]
            read_later = any(t.stream == s.stream for t in steps[i + 1 :] if t.op in (SET, ADD, SUB))
            if s.stream == 0 or read_later:
                regs[s.reg] = x.clone() if s.scale is None else torch.mul(x, s.scale)
            else:
                regs[s.reg] = x if s.scale is None else scale_(x, s.scale)
        elif s.op == ELECT:
            terms = [regs[m] for m in range(1, s.stream + 1)]
            regs[s.reg] = disjoint_merge_(terms, s.weights, s.ints[0] != NO_NORMALIZE)
        else:
            regs[s.reg] = _run_on(regs, regs[s.reg], streams, s, c)
    return regs[steps[-1].reg]


def _run_on(
    regs: dict[int, torch.Tensor], r: torch.Tensor, streams: Sequence[torch.Tensor], s: Step, c: Chunk | None
) -> torch.Tensor:
    """One step that updates register `r` in place."""
    if s.op == ADD:
        return r.add_(streams[s.stream] if s.scale is None else torch.mul(streams[s.stream], s.scale))
    if s.op == SUB:
        return r.sub_(streams[s.stream])
    if s.op == DIV:
        return div_(r, _number(s))
    if s.op == MUL:
        return scale_(r, _number(s))
    if s.op == ACC:
        return r.add_(regs[s.stream])
    if c is None:
        raise ValueError(f"step {s} needs the chunk's place")
    if s.op == KEEP:
        return r.mul_(c.keep(s.stream, r.numel(), _number(s)))
    inner, outer = Cut(*s.ints[:2]), Cut(*s.ints[2:])
    key = magnitude_key(r)
    keep = in_top(key, inner, c.start)
    if outer != Cut.nothing():
        keep &= ~in_top(key, outer, c.start)
    return r.mul_(keep)


def keep(model: int, density: float, reg: int) -> Step:
    """DARE's keep test of `model`'s keyed stream at `density`, on register `reg`."""
    return Step(KEEP, model, density, reg, (keep_threshold(density),))


def top(inner: Cut, outer: Cut, reg: int) -> Step:
    """Keep what lies in the `inner` top-k cut and not in the `outer` one, on register `reg`."""
    return Step(TOP, reg=reg, ints=(inner.threshold, inner.last_tie, outer.threshold, outer.last_tie))


def elect(weights: Sequence[float], normalize: bool) -> Step:
    """TIES sign election and disjoint mean of registers 1..k into the accumulator
    (`engine.methods.consensus.disjoint_merge_`)."""
    if not normalize:
        return Step(ELECT, len(weights), None, 0, (NO_NORMALIZE,), tuple(weights))
    if min(weights) > 0:
        return Step(ELECT, len(weights), min(weights) / 2, 0, (CLAMPED,), tuple(weights))
    return Step(ELECT, len(weights), None, 0, (ZERO_AS_ONE,), tuple(weights))


def fused(
    raw: Sequence[torch.Tensor],
    steps: Sequence[Step],
    out: torch.Tensor,
    start: int = 0,
    keys: Sequence[int] = (),
) -> bool:
    """Run the program in C from the read buffers `raw` (base first) into `out`, a view of the
    output buffer, whose first element has flat index `start` (`keys`: the models' rng keys, for
    KEEP); False (nothing written) where the C does not apply: not built, or not on the CPU."""
    kernel = pairwise.fused_for([*raw, out])
    if kernel is None:
        return False
    program = tuple((s.op, s.stream, s.scale, s.reg, s.ints, s.weights) for s in steps)
    kernel.combine(
        tuple(pairwise.as_buffer(x) for x in raw),
        program,
        pairwise.as_buffer(out),
        _nan_bits(),
        pairwise.c_threads(),
        start,
        tuple(keys),
        _f16_nan_payload(),
    )
    return True


def streams_read(program: Sequence[Step]) -> set[int]:
    """The input streams a program reads."""
    return {s.stream for s in program if s.op in (SET, ADD, SUB)}


def _number(s: Step) -> float:
    if s.scale is None:
        raise ValueError(f"step {s} needs a scale")
    return s.scale


@functools.cache
def _f16_nan_payload() -> bool:
    """Whether torch's float32 -> float16 cast keeps a NaN's payload (its vectorised F16C cast
    does; its scalar one writes 0x7E00): the C does as this torch does."""
    nan = torch.tensor([0x7FA00000] * 64, dtype=torch.int32).view(torch.float32)
    return int(nan.half().view(torch.int16)[0]) & 0xFFFF == 0x7F00


@functools.cache
def _nan_bits() -> int:
    """The bits torch gives a float32 NaN cast to bfloat16 (0xFFFF in torch 2.13): the C writes
    the same."""
    return int(torch.tensor([float("nan")] * 64).bfloat16().view(torch.int16)[0]) & 0xFFFF
