"""Merges written as programs of float32 ops (`engine.methods.steps`): the C over the read
buffers gives the bytes of the torch ops and torch's cast, for any inputs and scales."""

from __future__ import annotations

from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.methods import steps
from engine.methods.steps import ACC, ADD, DIV, MUL, SET, SUB, Step
from engine.stats import pairwise

fused_kernel: Any = pairwise._fused
needs_kernel = pytest.mark.skipif(fused_kernel is None, reason="engine.stats._fused was not built (no C compiler)")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SCALES = st.sampled_from([0.1, 1 / 3, 0.7, 1.0, -2.5, 1e-30, 3e38, 0.5000000001])


@st.composite
def programs(draw: st.DrawFn, n_streams: int) -> list[Step]:
    """A SET, then adds, divisions and multiplications of any streams by awkward scales."""
    first = Step(SET, draw(st.integers(0, n_streams - 1)), draw(st.one_of(st.none(), SCALES)))
    rest = draw(
        st.lists(
            st.one_of(
                st.builds(Step, st.just(ADD), st.integers(0, n_streams - 1), st.one_of(st.none(), SCALES)),
                st.builds(Step, st.sampled_from([DIV, MUL]), st.just(-1), SCALES),
            ),
            max_size=5,
        )
    )
    return [first, *rest]


def inputs(n: int, dtypes: list[torch.dtype], seed: int) -> list[torch.Tensor]:
    """Values over a wide range, with zeros, negative zeros, infinities, NaNs and values halfway
    between two bfloat16s (the rounding's ties)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for d in dtypes:
        x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-60, 60, (n,), generator=g).float())
        special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1.0 + 2**-8, 1.0 + 3 * 2**-8])
        x[torch.randint(0, n, (n // 8,), generator=g)] = special[torch.randint(0, len(special), (n // 8,), generator=g)]
        out.append(x.to(d))
    return out


def widened(x: torch.Tensor) -> torch.Tensor:
    """`x` as float32, as torch's vectorised cast gives it. Its scalar loop, which casts the last
    n mod 8 elements of a float16 tensor, makes every float16 NaN 0x7FFFFFFF, where the vectorised
    cast (and the C, everywhere) keeps the payload: 0x7E00 widens to 0x7FC00000."""
    pad = (-len(x)) % 64
    return torch.cat([x, x.new_zeros(pad)]).float()[: len(x)].clone()


def narrowed(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` cast to `dtype` as torch's vectorised cast does: its scalar loop (the last elements, or a
    short tensor) gives a float16 NaN other bits in some torch versions (2.5: 0x7FFF)."""
    pad = (-len(x)) % 64
    return torch.cat([x, x.new_zeros(pad)]).to(dtype)[: len(x)].clone()


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3000),
    program=programs(3),
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=3, max_size=3),
    out_dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 1000),
)
def test_the_c_gives_the_bytes_of_the_torch_ops(
    n: int, program: list[Step], dtypes: list[torch.dtype], out_dtype: torch.dtype, seed: int
) -> None:
    raw = inputs(n, dtypes, seed)
    want = narrowed(
        steps.run([widened(x) for x in raw], program), out_dtype
    )  # the eager path: float32 copies, the cast
    got = torch.empty(n, dtype=out_dtype)
    assert steps.fused(raw, program, got)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))  # NaNs too, bit for bit


def test_the_torch_ops_never_touch_the_base() -> None:
    base, model = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])
    for program in ([Step(SET, 0), Step(ADD, 1)], [Step(SET, 0, 2.0), Step(MUL, scale=3.0)], [Step(SET, 1, 0.5)]):
        steps.run([base, model.clone()], program)
        assert base.tolist() == [1.0, 2.0]


@needs_kernel
def test_every_float16_widens_as_torch_casts_it() -> None:
    """All 65536 bit patterns: normals, subnormals, infinities and NaNs with their payloads."""
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16)
    got = torch.empty(1 << 16)
    assert steps.fused([every], [Step(SET, 0)], got)
    assert torch.equal(got.view(torch.int32), every.float().view(torch.int32))


@needs_kernel
def test_float32_rounds_to_float16_as_torch_casts_it() -> None:
    """Random bit patterns (NaN payloads included), and every 997th float32 across float16's range
    from below its smallest subnormal to past its overflow, both signs: ties, subnormals, infinity."""
    g = torch.Generator().manual_seed(16)
    near = torch.arange(0x33000000 - 5000, 0x47800000 + 5000, 997, dtype=torch.int64)
    bits = torch.cat([torch.randint(-(2**31), 2**31 - 1, (1 << 20,), generator=g), near, near | (1 << 31)])
    values = bits.to(torch.int32).view(torch.float32)
    got = torch.empty(len(values), dtype=torch.float16)
    assert steps.fused([values], [Step(SET, 0)], got)
    assert torch.equal(got.view(torch.int16), values.half().view(torch.int16))


F = np.zeros(4, np.float32)


@needs_kernel
@pytest.mark.parametrize(
    ("streams", "program", "out", "error", "match"),
    [
        ((F,), ((SET, 0, None),), np.zeros(4), TypeError, "format 'fhHe'"),
        ((F,), ((SET, 0, None),), np.zeros(5, np.float32), ValueError, "out holds 5 items, want 4"),
        ((F, np.zeros(5, np.float32)), ((SET, 0, None),), F.copy(), ValueError, "streams of 4 and 5 items"),
        ((F,), ((ADD, 0, None),), F.copy(), ValueError, "step 0"),
        ((F,), ((SET, 0, None), (ADD, 0, None, 5)), F.copy(), ValueError, "step 1"),
        ((F,), ((SET, 1, None),), F.copy(), ValueError, "stream 1"),
        ((F,), ((SET, 0, None), (DIV, -1, None)), F.copy(), ValueError, "step 1"),
        ((F,), ((SET, 0, None), (9, 0, 1.0)), F.copy(), ValueError, "op 9"),
        ((F,), ((SET, 0, "x"),), F.copy(), TypeError, "real number"),
        ((), ((SET, 0, None),), F.copy(), ValueError, "streams and"),
    ],
)
def test_bad_arguments_raise(streams: tuple, program: tuple, out: np.ndarray, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        fused_kernel.combine(streams, program, out, 0xFFFF)


@needs_kernel
def test_the_merge_is_the_same_for_any_number_of_threads() -> None:
    """Threads share a call's elements (parts of at least 2**20): the bytes do not depend on
    their number, and a length that is no multiple of the C's tiles is written to its end."""
    g = torch.Generator().manual_seed(6)
    n = 4 * (1 << 20) + 1000 + 1
    a, b = (torch.randn(n, generator=g).bfloat16() for _ in range(2))
    streams = (a.view(torch.int16).numpy(), b.view(torch.int16).numpy())
    program = ((SET, 0, 0.25), (ADD, 1, 0.75), (DIV, -1, 3.0))
    outs = []
    for threads in (1, 2, 3, 4, 16, 0):
        out = np.full(n, 0x7FC1, np.int16)  # a NaN pattern the merge never writes
        fused_kernel.combine(streams, program, out, 0xFFFF, threads)
        outs.append(out)
    assert (outs[0] != 0x7FC1).all()
    for out in outs[1:]:
        assert out.tobytes() == outs[0].tobytes()


@st.composite
def register_programs(draw: st.DrawFn) -> tuple[int, list[Step]]:
    """k models' deltas in registers 1..k, then a mix as the delta methods write it (TIES's
    ELECT, or a sum of registers) and runs of adds of any length, all scaled or not or mixed,
    ending the program (the C writes the output from the run's loop) or followed by a step."""
    k = draw(st.integers(1, 6))
    program: list[Step] = []
    for m in range(1, k + 1):
        program += [Step(SET, m, reg=m), Step(SUB, 0, reg=m)]
        if draw(st.booleans()):
            program.append(Step(draw(st.sampled_from([DIV, MUL])), scale=draw(SCALES), reg=m))
    if draw(st.booleans()):
        weights = draw(st.lists(st.sampled_from([-0.5, 0.0, 1 / 3, 1.0, 2.5]), min_size=k, max_size=k))
        program.append(steps.elect(weights, draw(st.booleans())))
        acc = 0
    else:
        program += [Step(ACC, m, reg=1) for m in range(2, k + 1)]
        acc = 1
    adds = st.builds(Step, st.just(ADD), st.integers(0, k), st.one_of(st.none(), SCALES), st.just(acc))
    accs = st.builds(Step, st.just(ACC), st.integers(1, k).filter(lambda m: m != acc), st.just(None), st.just(acc))
    # torch's ELECT (disjoint_merge_) works in place on registers 1..k: none is read after it
    program += draw(st.lists(st.one_of(adds, accs) if k > 1 and acc == 1 else adds, max_size=5))
    program.append(Step(ADD, 0, reg=acc))
    if draw(st.booleans()):
        program.append(Step(MUL, scale=draw(SCALES), reg=acc))
    return k, program


def with_nan_payloads(raw: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """`raw` with NaNs of random signs and payloads at a shared set of elements, in about half the
    streams at each: where both operands of an add are NaNs, which NaN torch gives shows."""
    g = torch.Generator().manual_seed(seed)
    n = len(raw[0])
    at = torch.randint(0, n, (max(1, n // 16),), generator=g)
    out = []
    for x in raw:
        bits = {torch.float32: (torch.int32, 0x7F800000, 23), torch.bfloat16: (torch.int16, 0x7F80, 7)}
        int_dtype, exp, width = bits.get(x.dtype, (torch.int16, 0x7C00, 10))
        payload = torch.randint(1, 1 << width, (len(at),), generator=g)
        sign = torch.randint(0, 2, (len(at),), generator=g) << (31 if int_dtype == torch.int32 else 15)
        nan = (exp | payload | sign) - (sign << 1)  # the bits as a signed integer of the dtype's width
        y = x.clone().view(int_dtype)
        here = torch.rand(len(at), generator=g) < 0.5
        y[at[here]] = nan[here].to(int_dtype)
        out.append(y.view(x.dtype))
    return out


@needs_kernel
@settings(max_examples=120, deadline=None)
@given(
    case=register_programs(),
    n=st.integers(1, 3000),
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=7, max_size=7),
    out_dtype=st.sampled_from(DTYPES),
    f16_payload=st.booleans(),
    nan_payloads=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_the_c_gives_the_bytes_of_the_torch_ops_for_registers(
    case: tuple[int, list[Step]],
    n: int,
    dtypes: list[torch.dtype],
    out_dtype: torch.dtype,
    f16_payload: bool,
    nan_payloads: bool,
    seed: int,
) -> None:
    """The C's fused loops (a model's delta read from bfloat16 as it is, TIES's election of up
    to 4 models in one loop, a run of adds into the output) against torch's ops, NaNs in any
    lane, any length (the tiles' tails), and a float16 NaN written with its payload or without
    (as torch's vectorised or scalar cast). With `nan_payloads`, NaNs of any sign and payload in
    both operands of adds: the C adds without choosing torch's NaN where the output is bfloat16
    (every NaN is written as one pattern, and which NaN a value is never changes whether a result
    is one), and float32 and float16 outputs keep the NaN torch's add chose."""
    k, program = case
    raw = inputs(n, dtypes[: k + 1], seed)
    raw = with_nan_payloads(raw, seed) if nan_payloads else raw
    want = narrowed(steps.run([widened(x) for x in raw], program), out_dtype)
    if out_dtype == torch.float16 and not f16_payload:
        bits = want.view(torch.int16)
        want = torch.where(want.isnan(), (bits & -0x8000) | 0x7E00, bits).view(torch.float16)
    got = torch.empty(n, dtype=out_dtype)
    with mock.patch.object(steps, "_f16_nan_payload", lambda: f16_payload):
        assert steps.fused(raw, program, got)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))  # NaNs too, bit for bit


@needs_kernel
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("weights_kind", ["positive", "with_zero", "no_normalize"])
def test_elect_then_the_base_add_into_bfloat16_gives_the_bytes_of_the_torch_ops(k: int, weights_kind: str) -> None:
    """TIES's program end, ELECT then the base's add, is one loop into a bfloat16 output (each
    divisor rule, 1 to 4 models): torch's bytes at lengths around the tiles' edges, NaNs of any
    payload in some lanes."""
    weights = [0.5 + m for m in range(k)] if weights_kind != "with_zero" else [0.0] + [1.0] * (k - 1)
    for n in (1, 511, 512, 513, 1537):
        dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.bfloat16, torch.bfloat16][: k + 1]
        raw = with_nan_payloads(inputs(n, dtypes, n + k), n)
        program: list[Step] = []
        for m in range(1, k + 1):
            program += [Step(SET, m, reg=m), Step(SUB, 0, reg=m), Step(MUL, scale=weights[m - 1], reg=m)]
        program += [steps.elect(weights, weights_kind != "no_normalize"), Step(ADD, 0)]
        want = narrowed(steps.run([widened(x) for x in raw], program), torch.bfloat16)
        got = torch.empty(n, dtype=torch.bfloat16)
        assert steps.fused(raw, program, got)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), n
