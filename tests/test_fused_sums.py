"""The C first level of the fixed-order sums (`engine.stats._fused`): the same bits as the torch
path and the whole-tensor reference, wherever the chunks are cut, and clear errors on bad input."""

from __future__ import annotations

import shutil
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.stats import pairwise
from engine.stats.pairwise import ALONE, GROUP, Pair, PairwiseSums, Vector

from reference import pairwise_sum

fused: Any = pairwise._fused
needs_kernel = pytest.mark.skipif(fused is None, reason="engine.stats._fused was not built (no C compiler)")

PAIRS: list[Pair] = [(0, 0), (1, 1), (0, 1), (2, ALONE), (1, 2), (0, ALONE)]


def test_the_kernel_is_built_wherever_a_compiler_is() -> None:
    """A silent fall back to the torch path would cost SLERP and model stock most of their speed."""
    if shutil.which("cc") or shutil.which("gcc"):
        assert fused is not None, "a C compiler is here but engine.stats._fused is not: rerun `pip install -e .`"
    if fused is None:
        pytest.skip("built without a C compiler")
    assert fused.GROUP == GROUP
    assert pairwise.fused_kernel(torch.device("cpu")) is fused


def sums(
    streams: list[torch.Tensor], cuts: list[int], pairs: list[Pair], vectors: list[Vector] | None = None
) -> list[float]:
    acc = PairwiseSums(len(pairs))
    for a, b in zip(cuts, cuts[1:]):
        acc.add_products([v[a:b] for v in streams], pairs, vectors=vectors)
    return acc.values()


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(
    groups=st.integers(0, 5),
    extra=st.integers(0, GROUP - 1),
    splits=st.lists(st.integers(0, 6 * GROUP), max_size=5),
    spread=st.integers(0, 60),
    seed=st.integers(0, 1000),
)
def test_fused_sums_equal_the_torch_path_and_the_reference(
    groups: int, extra: int, splits: list[int], spread: int, seed: int
) -> None:
    """Magnitudes spread over 2**±spread (so another order would round differently), zeros and
    negative zeros, chunks cut anywhere (inside groups, so heads and tails take the torch path)."""
    g = torch.Generator().manual_seed(seed)
    n = groups * GROUP + extra
    scale = torch.exp2(torch.randint(-spread, spread + 1, (n,), generator=g).float())
    vectors = [torch.randn(n, generator=g) * scale for _ in range(3)]
    vectors[1][torch.rand(n, generator=g) < 0.3] = -0.0
    cuts = sorted({0, n, *(min(s, n) for s in splits)})
    got = sums(vectors, cuts, PAIRS)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(pairwise, "_fused", None)
        assert sums(vectors, cuts, PAIRS) == got
    wide = [v.double() for v in vectors]
    want = [pairwise_sum(wide[i] * wide[j] if j != ALONE else wide[i]) for i, j in PAIRS]
    assert got == want


@needs_kernel
def test_the_kernel_takes_whole_aligned_groups() -> None:
    x, y = torch.randn(2 * GROUP), torch.randn(2 * GROUP)
    out = torch.empty(2, 2, dtype=torch.float64)
    fused.group_sums((x.numpy(), y.numpy()), ((0, ALONE), (1, ALONE)), ((0, 1), (1, ALONE)), out.numpy())
    for g in range(2):
        part = slice(g * GROUP, (g + 1) * GROUP)
        assert out[0, g].item() == pairwise_sum(x[part].double() * y[part].double())
        assert out[1, g].item() == pairwise_sum(y[part].double())


ONE = ((0, ALONE),)


@needs_kernel
@pytest.mark.parametrize(
    ("streams", "vectors", "pairs", "out", "error", "match"),
    [
        ((np.zeros(GROUP),), ONE, ((0, 0),), np.zeros(1), TypeError, "format 'fhHe'"),
        ((np.zeros(GROUP, np.int32),), ONE, ((0, 0),), np.zeros(1), TypeError, "got 'i'"),
        ((np.zeros(GROUP, np.float32),), ONE, ((0, 0),), np.zeros(1, np.float32), TypeError, "format 'd'"),
        ((np.zeros(2 * GROUP, np.float32)[::2],), ONE, ((0, 0),), np.zeros(1), ValueError, "contiguous"),
        ((np.zeros(GROUP, np.float32), np.zeros(2 * GROUP, np.int16)), ONE, ((0, 0),), np.zeros(1), ValueError, "and"),
        ((np.zeros(GROUP + 1, np.float32),), ONE, ((0, 0),), np.zeros(1), ValueError, "multiple of 4096"),
        ((np.zeros(GROUP, np.float32),), ONE, ((0, 1),), np.zeros(1), IndexError, r"pair \(0, 1\) for 1"),
        ((np.zeros(GROUP, np.float32),), ONE, ((0, -2),), np.zeros(1), IndexError, "pair"),
        ((np.zeros(GROUP, np.float32),), ((0, 1),), ((0, 0),), np.zeros(1), IndexError, r"vector \(0, 1\) for 1"),
        ((np.zeros(GROUP, np.float32),), ((1, ALONE),), ((0, 0),), np.zeros(1), IndexError, "vector"),
        ((np.zeros(GROUP, np.float32),), ONE, ((0, 0),), np.zeros(2), ValueError, "out holds 2 items, want 1"),
        ((np.zeros(GROUP, np.float32),), ONE, ((0,),), np.zeros(1), TypeError, "exactly 2"),
        ((), ONE, ((0, 0),), np.zeros(1), ValueError, "no streams"),
        ((np.zeros(GROUP, np.float32),), (), ((0, 0),), np.zeros(1), ValueError, "no streams, vectors"),
    ],
)
def test_bad_arguments_raise(
    streams: tuple, vectors: tuple, pairs: tuple, out: np.ndarray, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        fused.group_sums(streams, vectors, pairs, out)


@needs_kernel
def test_a_read_only_out_is_refused() -> None:
    out = np.zeros(1)
    out.flags.writeable = False
    with pytest.raises((BufferError, ValueError)):
        fused.group_sums((np.zeros(GROUP, np.float32),), ONE, ((0, 0),), out)


def bfloat16_streams(n: int, count: int, seed: int, spread: int) -> list[torch.Tensor]:
    """bfloat16 tensors spread over 2**±spread, with equal elements (a zero delta) and negative
    zeros."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randint(-spread, spread + 1, (n,), generator=g).float())
    streams = [(torch.randn(n, generator=g) * scale).bfloat16() for _ in range(count)]
    for s in streams[1:]:
        same = torch.rand(n, generator=g) < 0.2
        s[same] = streams[0][same]
        s[torch.rand(n, generator=g) < 0.05] = -0.0
    return streams


@needs_kernel
@settings(max_examples=30, deadline=None)
@given(
    groups=st.integers(0, 4),
    extra=st.integers(0, GROUP - 1),
    splits=st.lists(st.integers(0, 5 * GROUP), max_size=4),
    spread=st.integers(0, 40),
    seed=st.integers(0, 1000),
    float32_base=st.booleans(),
)
def test_raw_streams_and_differences_equal_the_float32_copies(
    groups: int, extra: int, splits: list[int], spread: int, seed: int, float32_base: bool
) -> None:
    """What the statistics pass gives the C on the CPU (bfloat16 read buffers, the vectors as
    differences, model stock's) sums to the bits of what it gives the torch path elsewhere: the
    float32 copies, each model minus the base by `sub_`."""
    n = groups * GROUP + extra
    streams = bfloat16_streams(n, 4, seed, spread)
    if float32_base:
        streams[0] = streams[0].float()
    vectors = [(1, 0), (2, 0), (3, 0), (0, ALONE)]
    pairs: list[Pair] = [(0, 0), (0, 1), (1, 2), (2, 2), (3, 3), (1, ALONE)]
    cuts = sorted({0, n, *(min(s, n) for s in splits)})
    base, *models = (s.float() for s in streams)
    copies = [m.sub_(base) for m in models] + [base]
    want = [
        pairwise_sum(copies[i].double() * copies[j].double() if j != ALONE else copies[i].double()) for i, j in pairs
    ]
    assert sums(streams, cuts, pairs, vectors) == want


@needs_kernel
def test_the_sums_are_the_same_for_any_number_of_threads() -> None:
    """Threads share a call's groups (parts of at least 2**20 elements): each group is summed
    the same wherever its part begins, so the sums do not depend on their number."""
    g = torch.Generator().manual_seed(5)
    n = 5 * (1 << 20) + 3 * GROUP  # five parts and a bit: the last part is longer
    x = torch.randn(n, generator=g).bfloat16()
    y = torch.randn(n, generator=g)
    streams = (x.view(torch.int16).numpy(), y.numpy())
    vectors, pairs = ((0, ALONE), (1, 0)), ((0, 1), (1, 1), (0, ALONE))
    outs = []
    for threads in (1, 2, 3, 5, 8, 0):
        out = np.full(len(pairs) * n // GROUP, np.nan)
        fused.group_sums(streams, vectors, pairs, out, threads)
        outs.append(out)
    assert not np.isnan(outs[0]).any()
    for out in outs[1:]:
        assert out.tobytes() == outs[0].tobytes()
