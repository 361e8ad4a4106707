"""Every method written as a program (`Method.steps`): the C over the read buffers gives the bytes
of the eager path (`apply` on float32 copies, then torch's cast) and of the torch executor
(`steps.run`), for any shapes, dtypes, parameters, chunk cuts, thread counts and flat positions,
including DARE's keyed mask past 2**32."""

from __future__ import annotations

import sys
import types
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_steps import inputs, narrowed, needs_kernel, widened

from engine.methods import della, steps
from engine.methods.base import Chunk, Method, TensorParams
from engine.methods.breadcrumbs import CUTS
from engine.methods.registry import get_method
from engine.methods.rescale_norm import FACTORS
from engine.methods.ties import TRIM
from engine.rng import KeyedRng, stream_key
from engine.stats import pairwise
from engine.stats.topk import ALL_TIES, KEY_MAX, Cut

PROGRAMS = ["linear", "task_arithmetic", "dare_linear", "dare_ties", "ties", "breadcrumbs", "breadcrumbs_ties"]
WEIGHTS = st.sampled_from([-0.5, 0.0, 0.25, 1 / 3, 1.0, 1.5])
DENSITIES = st.sampled_from([0.0, 0.05, 0.3, 0.5, 0.9, 1.0])
STARTS = st.sampled_from([0, 12345, (1 << 32) - 700, 5 * (1 << 32) - 3, (1 << 40) + 17])
FP = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def cuts(draw: st.DrawFn, start: int, n: int) -> Cut:
    """A top-k cut with its threshold among typical delta keys and its last tie anywhere."""
    kind = draw(st.sampled_from(["everything", "nothing", "some"]))
    if kind != "some":
        return Cut.everything() if kind == "everything" else Cut.nothing()
    threshold = draw(st.sampled_from([0, 0x3C000000, 0x3F800000, 0x40000000, 0x7F800000, KEY_MAX]))
    last = draw(st.sampled_from([-1, start, start + n // 2, start + n - 1, ALL_TIES]))
    return Cut(threshold, last)


def params_for(method: Method, k: int, draw: st.DrawFn) -> TensorParams:
    per = []
    for _ in range(k):
        m: dict[str, Any] = {"weight": draw(WEIGHTS), "density": draw(DENSITIES)}
        m["gamma"] = draw(st.sampled_from([0.0, 0.05]))
        per.append({d.name: m[d.name] for d in method.params if d.per_model})
    g: dict[str, Any] = {
        "lambda": draw(st.sampled_from([1.0, 0.7, -2.0])),
        "normalize": draw(st.booleans()),
        "rescale": draw(st.booleans()),
    }
    return TensorParams({d.name: g.get(d.name, d.default) for d in method.params if not d.per_model}, tuple(per))


@st.composite
def cases(draw: st.DrawFn) -> tuple[Method, TensorParams, dict[str, Any], int, int, int]:
    name = draw(st.sampled_from(PROGRAMS))
    method = get_method(name)
    k = draw(st.integers(1, 4))
    n = draw(st.integers(1, 5000))
    start = draw(STARTS)
    p = params_for(method, k, draw)
    stats: dict[str, Any] = {}
    if name == "ties":
        stats[TRIM] = tuple(draw(cuts(start, n)) for _ in range(k))
    elif name.startswith("breadcrumbs"):
        stats[CUTS] = tuple(draw(cuts(start, n)) for _ in range(2 * k))
    elif name.startswith("dare") and draw(st.booleans()):
        stats[FACTORS] = tuple(draw(st.sampled_from([1.0, 0.75, 3.5])) for _ in range(k))
    return method, p, stats, k, n, start


@needs_kernel
@settings(max_examples=150, deadline=None)
@given(
    case=cases(),
    dtypes=st.lists(st.sampled_from(FP), min_size=5, max_size=5),
    out_dtype=st.sampled_from(FP),
    cut_at=st.lists(st.integers(0, 5000), max_size=3),
    threads=st.integers(1, 8),
    seed=st.integers(0, 1000),
)
def test_the_c_gives_the_bytes_of_apply_and_of_the_torch_steps(
    case: tuple[Method, TensorParams, dict[str, Any], int, int, int],
    dtypes: list[torch.dtype],
    out_dtype: torch.dtype,
    cut_at: list[int],
    threads: int,
    seed: int,
) -> None:
    method, p, stats, k, n, start = case
    raw = inputs(n, dtypes[: k + 1], seed)
    rngs = tuple(KeyedRng(stream_key(seed, "t", m)) for m in range(k))
    c = Chunk(rngs, start, n)
    program = method.steps(p, stats, k)
    assert program is not None
    want = narrowed(method.apply(widened(raw[0]), [widened(x) for x in raw[1:]], p, stats, c), out_dtype)
    by_steps = narrowed(steps.run([widened(x) for x in raw], program, c), out_dtype)
    got = torch.empty(n, dtype=out_dtype)
    bounds = sorted({0, n, *(min(x, n) for x in cut_at)})
    with mock.patch.object(pairwise, "c_threads", lambda: threads):
        for a, b in zip(bounds, bounds[1:]):  # the chunk cut anywhere
            assert steps.fused([x[a:b] for x in raw], program, got[a:b], start + a, [r.key for r in rngs])
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))  # NaNs too, bit for bit
    assert torch.equal(by_steps.view(torch.uint8), want.view(torch.uint8))


@needs_kernel
@pytest.mark.parametrize("method", ["dare_ties", "ties"])
def test_many_threads_and_pieces_give_the_same_bytes(method: str) -> None:
    """A call long enough for every thread of the pool to take pieces of it, across 2**32."""
    n, start = (1 << 20) + 4099, (1 << 32) - (1 << 19)
    raw = inputs(n, [torch.bfloat16] * 3, 3)
    m = get_method(method)
    p = TensorParams(
        {"lambda": 1.0, "normalize": True, "rescale": True, "rescale_norm": "density"},
        ({"weight": 0.5, "density": 0.3},) * 2,
    )
    stats = {TRIM: (Cut(0x3F000000, start + 77), Cut(0x3E000000, ALL_TIES))}
    program = m.steps(p, stats, 2)
    assert program is not None
    keys = [stream_key(1, "w", i) for i in range(2)]
    outs = []
    for threads in (1, 2, 3, 8):
        out = torch.empty(n, dtype=torch.bfloat16)
        with mock.patch.object(pairwise, "c_threads", lambda t=threads: t):
            assert steps.fused(raw, program, out, start, keys)
        outs.append(out.view(torch.int16))
    c = Chunk(tuple(KeyedRng(key) for key in keys), start, n)
    want = m.apply(raw[0].float(), [x.float().clone() for x in raw[1:]], p, stats, c).bfloat16().view(torch.int16)
    for out in outs:
        assert torch.equal(out, want)


def test_della_has_no_program() -> None:
    p = TensorParams(
        {"lambda": 1.0, "normalize": True, "rescale": True}, ({"weight": 1.0, "density": 0.5, "epsilon": 0.1},)
    )
    assert get_method("della").steps(p, {}, 1) is None


def key_inputs(n: int, dtypes: list[torch.dtype], seed: int) -> tuple[tuple[Any, ...], list[torch.Tensor]]:
    """The read buffers of a base and 1-3 models (base first), and the torch path's keys of each
    model: |model - base| of the float32 copies as int32 bits (NaN payloads kept)."""
    base, *models = inputs(n, dtypes, seed)
    keys = [widened(m).sub_(widened(base)).view(torch.int32).bitwise_and_(KEY_MAX) for m in models]
    return tuple(pairwise.as_buffer(x) for x in (base, *models)), keys


key_cases = given(
    n=st.integers(1, 250_000),
    dtypes=st.lists(st.sampled_from(FP), min_size=2, max_size=4),
    threads=st.integers(1, 8),
    seed=st.integers(0, 1000),
    order=st.randoms(use_true_random=False),
)


@needs_kernel
@settings(max_examples=40, deadline=None)
@key_cases
def test_key_histograms_in_c_equal_torch_bincount(
    n: int, dtypes: list[torch.dtype], threads: int, seed: int, order: Any
) -> None:
    """The top-k passes 1 and 2 counted by the C from the read buffers, every model's selections in
    one sweep (in any order, a model twice), equal the torch path's counts of the float32 copies'
    keys (NaNs' payloads included)."""
    streams, keys = key_inputs(n, dtypes, seed)
    kernel: Any = pairwise._fused
    picks = [order.randrange(len(keys)) for _ in range(order.randint(1, 5))]
    high = torch.zeros(len(picks), 1 << 15, dtype=torch.int64)
    kernel.key_histograms(streams, tuple((m + 1, -1) for m in picks), tuple(h.numpy() for h in high), threads)
    for row, m in zip(high, picks):
        assert torch.equal(row, torch.bincount(keys[m] >> 16, minlength=1 << 15))
    buckets = [int(keys[m][order.randrange(n)] >> 16) for m in picks]
    low = torch.zeros(len(picks), 1 << 16, dtype=torch.int64)
    kernel.key_histograms(
        streams, tuple((m + 1, b) for m, b in zip(picks, buckets)), tuple(h.numpy() for h in low), threads
    )
    for row, m, b in zip(low, picks, buckets):
        assert torch.equal(row, torch.bincount(keys[m][(keys[m] >> 16) == b] & 0xFFFF, minlength=1 << 16))


@needs_kernel
@settings(max_examples=40, deadline=None)
@key_cases
def test_key_windows_in_c_equal_torch(n: int, dtypes: list[torch.dtype], threads: int, seed: int, order: Any) -> None:
    """Pass 1 with its windows, as the C counts it: high-bits histograms and the low bits of a run
    of buckets around an element's (clamped to the key range), mixed in one sweep, equal the torch
    path's counts (`topk._counts`)."""
    from engine.stats.topk import _counts

    streams, keys = key_inputs(n, dtypes, seed)
    width = order.choice([1, 2, 4, 7])
    wanted = []
    for m in sorted(order.randrange(len(keys)) for _ in range(order.randint(1, 5))):
        wanted.append(
            (m, -1) if order.random() < 0.4 else (m, min(int(keys[m][order.randrange(n)] >> 16), (1 << 15) - width))
        )
    outs = [torch.full((1 << 15 if b < 0 else width << 16,), 7, dtype=torch.int64) for _, b in wanted]
    kernel: Any = pairwise._fused
    kernel.key_histograms(streams, tuple((m + 1, b) for m, b in wanted), tuple(h.numpy() for h in outs), threads, width)
    for got, (m, b) in zip(outs, wanted):  # added to what was there
        assert torch.equal(got - 7, _counts(keys[m], b, width))


@needs_kernel
@settings(max_examples=40, deadline=None)
@key_cases
def test_key_ties_in_c_equal_torch(n: int, dtypes: list[torch.dtype], threads: int, seed: int, order: Any) -> None:
    """The top-k pass 3 by the C, every selection in one sweep: the count of keys equal to a
    threshold and the flat position of the need-th of them, as the torch path finds them, for any
    number of threads. A threshold is the most common key (infinities', NaNs': thousands of ties)
    or one element's."""
    streams, keys = key_inputs(n, dtypes, seed)
    wanted, want = [], []
    for _ in range(order.randint(1, 5)):
        m = order.randrange(len(keys))
        common = order.random() < 0.5
        threshold = int(torch.mode(keys[m]).values) if common else int(keys[m][order.randrange(n)])
        ties = torch.nonzero(keys[m] == threshold).flatten()
        need = round(order.uniform(-0.1, 1.1) * ties.numel())
        wanted.append((m + 1, threshold, need))
        want.append((ties.numel(), int(ties[need - 1]) if 1 <= need <= ties.numel() else -1))
    kernel: Any = pairwise._fused
    assert list(kernel.key_ties(streams, tuple(wanted), threads)) == want


def test_an_install_without_the_c_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(pairwise, "_fused", None)
    monkeypatch.setattr(pairwise, "_why_not", pairwise.load_c("no_such_fused_module")[1])
    pairwise.say_if_slow.cache_clear()
    try:
        pairwise.say_if_slow()
        pairwise.say_if_slow()
    finally:
        pairwise.say_if_slow.cache_clear()
    assert [r.getMessage() for r in caplog.records] == [
        "leanmerge: the C extension is not built (no C compiler at install): merging on the slower torch path"
    ]


def test_a_stale_or_missing_c_build_is_set_aside_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """A C module of another interface version (a checkout updated without a rebuild) is not
    called: the merge runs on the torch path and says why; so does a missing one."""
    stale = types.ModuleType("stale_fused")
    stale.ABI = pairwise.C_ABI - 1  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "stale_fused", stale)
    assert pairwise.load_c("stale_fused") == (
        None,
        "the C extension was built from another version (rebuild it: pip install -e .)",
    )
    assert pairwise.load_c("no_such_fused_module") == (None, "the C extension is not built (no C compiler at install)")
    if pairwise._fused is not None:
        assert pairwise.load_c() == (pairwise._fused, "")


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(
    w=st.sampled_from([2, 3, 31, 32, 33, 100, 257, 1024]),
    rows=st.integers(1, 12),
    density=st.sampled_from([0.1, 0.3, 0.5, 0.9]),
    spread=st.sampled_from([0.0, 0.5, 0.99]),
    rescale=st.booleans(),
    start=STARTS,
    threads=st.integers(1, 8),
    seed=st.integers(0, 1000),
)
def test_della_magprune_in_c_equals_the_torch_ops(
    w: int, rows: int, density: float, spread: float, rescale: bool, start: int, threads: int, seed: int
) -> None:
    """DELLA's per-row ranks (ties among bfloat16-rounded deltas, NaNs, infinities, signed
    zeros), keep probabilities, keyed keep test (rows across a 2**32 boundary) and rescale: the
    C's bytes are the torch path's, for any number of threads."""
    (delta,) = inputs(rows * w, [torch.bfloat16], seed)
    epsilon = spread * min(density, 1 - density)
    c = Chunk((KeyedRng(stream_key(seed, "t", 0)),), start, rows * w, w)
    got, want = delta.float(), delta.float()
    with mock.patch.object(pairwise, "c_threads", lambda: threads):
        della.magprune_(got, 0, density, epsilon, rescale, c)
    with mock.patch.object(pairwise, "_fused", None):
        della.magprune_(want, 0, density, epsilon, rescale, c)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(["della", "della_linear"]),
    k=st.integers(1, 5),
    w=st.sampled_from([1, 7, 64]),
    rows=st.integers(1, 40),
    weights=st.lists(WEIGHTS, min_size=5, max_size=5),
    lam=st.sampled_from([1.0, 0.7]),
    normalize=st.booleans(),
    rescale=st.booleans(),
    threads=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_della_merges_in_c_with_the_bytes_of_the_torch_ops(
    name: str,
    k: int,
    w: int,
    rows: int,
    weights: list[float],
    lam: float,
    normalize: bool,
    rescale: bool,
    threads: int,
    seed: int,
) -> None:
    """DELLA's weights, mix (TIES's election, or the sum) and base's add after MagPrune: one pass
    of the C on the CPU, the bytes of torch's ops (NaNs, infinities, signed zeros included)."""
    method = get_method(name)
    per = tuple({"weight": x, "density": 0.5, "epsilon": 0.2} for x in weights[:k])
    p = TensorParams({"lambda": lam, "normalize": normalize, "rescale": rescale}, per)
    raw = inputs(rows * w, [torch.bfloat16] * (k + 1), seed)
    c = Chunk(tuple(KeyedRng(stream_key(seed, "t", m)) for m in range(k)), 12345, rows * w, w)
    with mock.patch.object(pairwise, "c_threads", lambda: threads):
        got = method.apply(raw[0].float(), [x.float() for x in raw[1:]], p, {}, c)
    with mock.patch.object(pairwise, "_fused", None):
        want = method.apply(raw[0].float(), [x.float() for x in raw[1:]], p, {}, c)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@needs_kernel
@pytest.mark.parametrize("last", [-1, 0, 1, 1022, 1023, 1024, 2046, 2047, 2048, 2999])
@pytest.mark.parametrize("outer", [False, True])
def test_top_cuts_with_their_last_tie_at_any_tile_edge(last: int, outer: bool) -> None:
    """Deltas equal to the cut's threshold in every tile (ties), the cut's last tie at and beside the
    C's tile edges (1024 elements): which ties are kept is torch's `in_top`, bit for bit."""
    n, start = 3000, 1 << 33
    g = torch.Generator().manual_seed(last)
    delta = torch.tensor([0.5, -0.5, 0.25, 1.0, -1.0])[torch.randint(0, 5, (n,), generator=g)]
    base = torch.randn(n, generator=g).bfloat16().float()
    model = base + delta  # exact: the deltas are 0.5, 0.25 and 1.0 in magnitude
    cut = Cut(0x3F000000, start + last)  # |delta| > 0.5, and the 0.5s up to the last tie
    inner, outer_cut = (Cut(0x3E800000, ALL_TIES), cut) if outer else (cut, Cut.nothing())
    program = [steps.set_(1, reg=1), steps.Step(steps.SUB, 0, reg=1), steps.top(inner, outer_cut, 1)]
    program.append(steps.Step(steps.ADD, 0, reg=1))
    c = Chunk((), start, n)
    want = steps.run([base, model.clone()], program, c)
    got = torch.empty(n)
    assert steps.fused([base, model], program, got, start)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
