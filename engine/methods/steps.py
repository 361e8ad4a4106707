"""Merges that are a fixed sequence of float32 ops over their inputs, written once as data.

SLERP and model stock, once their statistics are known, merge each element with a handful of
scaled adds: θ = c0·θ_base + c1·θ₁, or θ = t·mean(θₘ) + (1 − t)·θ_base. Their `apply` runs such a
program with torch ops (`run`), on any device; on the CPU the C runs the same program over the
read buffers straight into the output buffer (`fused`), one pass over memory instead of one per
op plus the float32 copies of every input and the cast of the result (~3 s of a 7.5 s model
stock merge of `llama1b-embed` on 2 cores). The C does each op as one IEEE float32 op in the
program's order and rounds the result as torch's cast does, so both give the same bytes (tested).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.methods.base import div_, scale_
from engine.stats import pairwise

SET, ADD, DIV, MUL = 0, 1, 2, 3  # the C's op codes


@dataclass(frozen=True)
class Step:
    """One op: SET acc = x[stream] (· scale), ADD acc += x[stream] (· scale, rounded before the
    add), DIV acc /= scale, MUL acc *= scale. Streams: 0 the base, m the m-th model."""

    op: int
    stream: int = -1
    scale: float | None = None


def set_(stream: int, scale: float | None = None) -> Step:
    return Step(SET, stream, scale)


def add(stream: int, scale: float | None = None) -> Step:
    return Step(ADD, stream, scale)


def run(streams: Sequence[torch.Tensor], steps: Sequence[Step]) -> torch.Tensor:
    """The program with torch ops over float32 chunks (base first). The first step, a SET, works
    in place on its model's (scratch) chunk where no later step reads it; never on the base's."""
    acc = streams[0]
    read_later = {s.stream for s in steps[1:] if s.op in (SET, ADD)}
    for s in steps:
        if s.op == SET:
            x = streams[s.stream]
            if s.stream == 0 or s.stream in read_later:
                acc = x.clone() if s.scale is None else torch.mul(x, s.scale)
            else:
                acc = x if s.scale is None else scale_(x, s.scale)
        elif s.op == ADD:
            acc.add_(streams[s.stream] if s.scale is None else torch.mul(streams[s.stream], s.scale))
        elif s.op == DIV:
            acc = div_(acc, _number(s))
        else:
            acc = scale_(acc, _number(s))
    return acc


def fused(raw: Sequence[torch.Tensor], steps: Sequence[Step], out: torch.Tensor) -> bool:
    """Run the program in C from the read buffers `raw` (base first) into `out`, a view of the
    output buffer; False (nothing written) where the C does not apply: not built, not on the
    CPU, or a float16 input or output."""
    kernel = pairwise.fused_for([*raw, out])
    if kernel is None:
        return False
    program = tuple((s.op, s.stream, s.scale) for s in steps)
    kernel.combine(
        tuple(pairwise.as_buffer(x) for x in raw), program, pairwise.as_buffer(out), _nan_bits(), pairwise.c_threads()
    )
    return True


def _number(s: Step) -> float:
    if s.scale is None:
        raise ValueError(f"step {s} needs a scale")
    return s.scale


@functools.cache
def _nan_bits() -> int:
    """The bits torch gives a float32 NaN cast to bfloat16 (0xFFFF in torch 2.13): the C writes
    the same."""
    return int(torch.tensor([float("nan")] * 64).bfloat16().view(torch.int16)[0]) & 0xFFFF
