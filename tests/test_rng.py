"""Tests of engine.rng: the DARE keep mask must be a pure, device- and chunking-independent
function of (seed, tensor, model, index), and statistically sound.

The hash is re-implemented here from its written definition (engine/rng.py docstring), once
per element in plain Python and once vectorised in int64, so any accidental change to the
shipped bits fails. Statistical bounds are derived from the statistics' sampling
distributions at 6 sigma with fixed keys, so the tests are deterministic and cannot flake,
and each statistic is shown to reject a bad generator so it cannot pass by accident.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import rng as rng_mod
from engine import rng_hash
from engine.rng import KeyedRng, keep_threshold, stream_key

M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF
TWO32 = 1 << 32
N_STAT = 1 << 20  # elements per statistical sample


# ------------------------------------------------------------------------------ reference


def _mix64(z: int) -> int:
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def ref_block_keys(key: int, hi: int) -> tuple[int, int, int]:
    """Round keys of the 2**32-index block ``hi``, as specified."""
    s = _mix64(_mix64(key) + (hi + 1) * 0x9E3779B97F4A7C15)
    t = _mix64(s + 0x9E3779B97F4A7C15)
    return s & M32, s >> 32, t & M32


def ref_word(key: int, i: int) -> int:
    """The u32 word of flat index ``i``: pure Python, ``& 0xFFFFFFFF`` after every step."""
    k0, k1, k2 = ref_block_keys(key, i >> 32)
    x = (((i & M32) + k0) * 0x9E3779B9) & M32
    x ^= x >> 16
    x = (x * 0x7FEB352D + k1) & M32
    x ^= x >> 16
    x = (x * 0x846CA68B + k2) & M32
    x ^= x >> 16
    return x ^ 0x80000000


def ref_words(key: int, start: int, n: int) -> torch.Tensor:
    """Vectorised reference (int64 lanes, values in [0, 2**32)) for long ranges."""
    parts = []
    pos = 0
    while pos < n:
        i = start + pos
        m = min(n - pos, TWO32 - (i & M32))
        k0, k1, k2 = ref_block_keys(key, i >> 32)
        x = torch.arange(i & M32, (i & M32) + m, dtype=torch.int64)
        x = ((x + k0) * 0x9E3779B9) & M32
        x ^= x >> 16
        x = (x * 0x7FEB352D + k1) & M32
        x ^= x >> 16
        x = (x * 0x846CA68B + k2) & M32
        x ^= x >> 16
        parts.append(x ^ 0x80000000)
        pos += m
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


def u32(t: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns as unsigned values in int64."""
    return t.to(torch.int64) & M32


KEY = stream_key(7, "model.layers.3.mlp.down_proj.weight", 1)


# ------------------------------------------------------------------------------ determinism


def test_python_reference_matches_vectorised_reference() -> None:
    for start in (0, 2**32 - 5, 2**40 + 3):
        want = [ref_word(KEY, start + j) for j in range(10)]
        assert ref_words(KEY, start, 10).tolist() == want


@settings(max_examples=60, deadline=None, database=None)
@given(
    key=st.integers(0, M64),
    start=st.integers(0, 2**40),
    n=st.integers(0, 48),
    cuts=st.lists(st.integers(0, 48), max_size=4),
)
def test_bits_match_reference_and_any_split(key: int, start: int, n: int, cuts: list[int]) -> None:
    r = KeyedRng(key)
    whole = r.bits(start, n)
    assert whole.dtype == torch.int32 and whole.shape == (n,)
    assert u32(whole).tolist() == [ref_word(key, start + j) for j in range(n)]
    points = sorted({0, n, *(c for c in cuts if c <= n)})
    pieces = [r.bits(start + a, b - a) for a, b in zip(points, points[1:], strict=False)]
    assert torch.equal(torch.cat(pieces) if pieces else whole, whole)


@settings(max_examples=20, deadline=None, database=None)
@given(key=st.integers(0, M64), hi=st.integers(0, 2**20), back=st.integers(1, 300), n=st.integers(1, 600))
def test_chunks_crossing_2_32_boundaries(key: int, hi: int, back: int, n: int) -> None:
    start = hi * TWO32 - back if hi else 0
    got = KeyedRng(key).bits(start, n)
    assert u32(got).tolist() == [ref_word(key, start + j) for j in range(n)]


def test_boundary_example_from_spec() -> None:
    start, n = 2**32 - 100, 300
    r = KeyedRng(KEY)
    got = u32(r.bits(start, n)).tolist()
    assert got == [ref_word(KEY, start + j) for j in range(n)]
    assert got == [u32(r.bits(start + j, 1)).item() for j in range(n)]


def test_long_ranges_with_sub_blocks_and_boundary() -> None:
    """Ranges longer than a sub-block, not multiples of it, crossing 2**32, match the reference."""
    r = KeyedRng(KEY)
    for start, n in [(0, 3 * 65536 + 1234), (2**32 - 70_001, 140_003), (5 * 2**32 + 17, 65536 + 1023)]:
        whole = r.bits(start, n)
        assert torch.equal(u32(whole), ref_words(KEY, start, n))
        # Different chunkings (sub-block sized, odd sized) give the same bits.
        for step in (65536, 99_991, 1024):
            parts = [r.bits(start + p, min(step, n - p)) for p in range(0, n, step)]
            assert torch.equal(torch.cat(parts), whole)


def test_int32_multiply_wraps_like_python() -> None:
    """torch's int32 multiply/add overflow wraps as two's complement on CPU."""
    vals = [0, 1, -1, 2**31 - 1, -(2**31), 123456789, -987654321]
    x = torch.tensor(vals, dtype=torch.int32)
    for mul in (0x9E3779B9, 0x7FEB352D, 0x846CA68B):
        got = u32(x * rng_hash._s32(mul)).tolist()
        assert got == [((v & M32) * mul) & M32 for v in vals]
        fused = x.clone()
        rng_hash._affine(fused, mul, torch.tensor(rng_hash._s32(0xDEADBEEF), dtype=torch.int32))
        plain = x.clone()
        rng_hash._affine(plain, mul, rng_hash._s32(0xDEADBEEF))
        assert u32(fused).tolist() == u32(plain).tolist() == [((v & M32) * mul + 0xDEADBEEF) & M32 for v in vals]


@pytest.mark.parametrize("sub_block", [None, 1 << 24, 3 * 1024])
def test_non_cpu_code_path_gives_same_bits(monkeypatch: pytest.MonkeyPatch, sub_block: int | None) -> None:
    """Off CPU the constants are Python ints, multiply-add is two ops and a sub-block is a whole
    chunk (16M elements, or any other size); run those paths on CPU."""
    r = KeyedRng(KEY)
    start, n = 2**32 - 40_000, 150_000
    prob = torch.rand(n, generator=torch.Generator().manual_seed(1))
    want = (r.bits(start, n), r.keep(start, n, 0.3), r.uniform(start, n), r.keep_where(start, prob))
    monkeypatch.setattr(rng_hash, "_consts", lambda values, dev: [rng_hash._s32(v) for v in values])
    if sub_block is not None:
        for module in (rng_mod, rng_hash):  # the word buffer (rng) and the hash loop (rng_hash)
            monkeypatch.setattr(module, "sub_block_size", lambda dev: sub_block)
    got = (r.bits(start, n), r.keep(start, n, 0.3), r.uniform(start, n), r.keep_where(start, prob))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_thread_count_does_not_change_bits() -> None:
    r = KeyedRng(KEY)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (r.bits(3, 300_000), r.keep(3, 300_000, 0.2))
        torch.set_num_threads(2)
        two = (r.bits(3, 300_000), r.keep(3, 300_000, 0.2))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    r = KeyedRng(KEY)
    start, n = 2**32 - 70_000, 300_000
    assert torch.equal(r.bits(start, n, device="cuda").cpu(), r.bits(start, n))
    assert torch.equal(r.keep(start, n, 0.37, device="cuda").cpu(), r.keep(start, n, 0.37))
    assert torch.equal(r.uniform(start, n, device="cuda").cpu(), r.uniform(start, n))
    prob = torch.rand(n, generator=torch.Generator().manual_seed(0))
    assert torch.equal(r.keep_where(start, prob.cuda()).cpu(), r.keep_where(start, prob))


def test_no_global_rng_state_touched() -> None:
    state = torch.get_rng_state()
    r = KeyedRng(KEY)
    r.bits(0, 1000)
    r.keep(0, 1000, 0.5)
    r.uniform(0, 1000)
    r.keep_where(0, torch.full((1000,), 0.5))
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------------------ keep rule


def _tie_thresholds(words: list[int], seed: int) -> Iterator[int]:
    """Thresholds equal to, one above, and sharing the high half of actual words.

    keep() folds the last xorshift into a threshold-dependent xor that is only exercised when
    a word's high half equals the threshold's, so these are the cases that matter.
    """
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(words), (16,), generator=g).tolist()
    lows = torch.randint(0, 65536, (16,), generator=g).tolist()
    yield from (1, 2**31, 2**32 - 1, 0x8000_0000 - 1, 0x0000_8000, 0xFFFF_0000)
    for j, low in zip(picks, lows, strict=True):
        w = words[j]
        yield from (w, min(w + 1, TWO32 - 1), (w & 0xFFFF0000) | low)


def test_keep_equals_word_below_threshold_exactly() -> None:
    r = KeyedRng(KEY)
    for start, n in [(0, 200_000), (2**32 - 70_000, 140_000)]:
        w = u32(r.bits(start, n))
        for thr in _tie_thresholds(w.tolist(), start & 0xFFFF):
            d = thr / TWO32
            assert keep_threshold(d) == thr
            assert torch.equal(r.keep(start, n, d), w < thr), thr


def test_keep_buffers_and_chunking() -> None:
    r = KeyedRng(KEY)
    n = 300_001
    want = r.keep(11, n, 0.25)
    out = torch.empty(n, dtype=torch.int32)
    mask = torch.empty(n, dtype=torch.bool)
    got = r.keep(11, n, 0.25, out=out, mask_out=mask)
    assert got.data_ptr() == mask.data_ptr() and torch.equal(got, want)
    small = torch.empty(1000, dtype=torch.int32)  # a scratch smaller than two sub-blocks also works
    assert torch.equal(r.keep(11, n, 0.25, out=small), want)
    parts = [r.keep(11 + p, min(65_537, n - p), 0.25) for p in range(0, n, 65_537)]
    assert torch.equal(torch.cat(parts), want)


def test_density_extremes() -> None:
    r = KeyedRng(KEY)
    assert bool(r.keep(5, 100_000, 1.0).all())
    assert not bool(r.keep(5, 100_000, 0.0).any())
    assert r.keep(5, 0, 0.5).shape == (0,)


def test_keep_threshold_rule() -> None:
    assert keep_threshold(0.0) == 0 and keep_threshold(1.0) == TWO32
    assert keep_threshold(0.5) == 2**31
    assert keep_threshold(2**-33) == 0  # exactly half: rounds to even
    assert keep_threshold(3 * 2**-33) == 2  # 1.5 -> 2
    assert keep_threshold(1 - 2**-40) == TWO32  # clamps by rounding, never above 2**32
    for bad in (-0.1, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            keep_threshold(bad)


def test_argument_errors() -> None:
    r = KeyedRng(KEY)
    with pytest.raises(ValueError):
        KeyedRng(-1)
    with pytest.raises(ValueError):
        KeyedRng(2**64)
    with pytest.raises(ValueError):
        r.bits(-1, 5)
    with pytest.raises(ValueError):
        r.bits(0, -5)
    with pytest.raises(ValueError):
        r.bits(2**63 - 2, 5)
    with pytest.raises(ValueError):
        r.bits(0, 5, out=torch.empty(4, dtype=torch.int32))
    with pytest.raises(ValueError):
        r.bits(0, 5, out=torch.empty(5, dtype=torch.int64))
    with pytest.raises(ValueError):
        r.keep(0, 5, 0.5, mask_out=torch.empty(5, dtype=torch.uint8))
    with pytest.raises(ValueError):
        r.keep_where(0, torch.ones(5, dtype=torch.int32))


def test_bits_out_buffer_reused() -> None:
    r = KeyedRng(KEY)
    out = torch.empty(2, 500, dtype=torch.int32)
    got = r.bits(99, 1000, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, r.bits(99, 1000))


# ------------------------------------------------------------------------------ uniform / keep_where


def test_uniform_is_top_24_bits_and_unbiased() -> None:
    r = KeyedRng(KEY)
    u = r.uniform(1000, N_STAT)
    assert u.dtype == torch.float32
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    w = u32(r.bits(1000, N_STAT))
    assert torch.equal(u.double() * 2**24, (w >> 8).double())
    sigma = math.sqrt(1 / 12 / N_STAT)
    assert abs(float(u.double().mean()) - 0.5) < 6 * sigma


def test_keep_where_rule() -> None:
    r = KeyedRng(KEY)
    n = 200_000
    start = 2**32 - 1000
    w = u32(r.bits(start, n))
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        prob = torch.rand(n, generator=g).to(dtype)
        thr = torch.round(prob.double() * TWO32).to(torch.int64)
        assert torch.equal(r.keep_where(start, prob), w < thr)
    # constant probability agrees with keep(); shape is preserved
    for d in (0.1, 0.5, 0.73):
        prob = torch.full((400, 500), d, dtype=torch.float64)
        got = r.keep_where(start, prob)
        assert got.shape == (400, 500)
        assert torch.equal(got.reshape(-1), r.keep(start, n, d))
    special = torch.tensor([0.0, -1.0, float("nan"), 1.0, 2.0, float("inf")])
    assert r.keep_where(0, special).tolist() == [False, False, False, True, True, True]


# ------------------------------------------------------------------------------ statistics


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def _chi2_bytes(words: torch.Tensor) -> float:
    w = u32(words)
    byts = torch.cat([(w >> s) & 0xFF for s in (0, 8, 16, 24)])
    hist = torch.bincount(byts, minlength=256).double()
    expect = byts.numel() / 256
    return float(((hist - expect) ** 2 / expect).sum())


# chi-square with 255 degrees of freedom: mean 255, sd sqrt(510); 6 sigma either side. A too
# *uniform* histogram (a counter) is as suspicious as a lumpy one, hence the lower bound.
CHI2_LO, CHI2_HI = 255 - 6 * math.sqrt(510), 255 + 6 * math.sqrt(510)
CORR_BOUND = 6 / math.sqrt(N_STAT)


@pytest.mark.parametrize("d", [0.01, 0.1, 0.5, 0.9, 0.99])
def test_kept_fraction_within_binomial_band(d: float) -> None:
    p = keep_threshold(d) / TWO32
    kept = int(KeyedRng(KEY).keep(12345, N_STAT, d).sum())
    assert abs(kept - N_STAT * p) < 6 * math.sqrt(N_STAT * p * (1 - p))


@pytest.mark.parametrize(
    "other",
    [
        stream_key(7, "model.layers.3.mlp.down_proj.weight", 2),  # another model
        stream_key(7, "model.layers.3.mlp.up_proj.weight", 1),  # another tensor
        stream_key(8, "model.layers.3.mlp.down_proj.weight", 1),  # another seed
    ],
)
@pytest.mark.parametrize("d", [0.1, 0.5])
def test_masks_of_different_streams_uncorrelated(other: int, d: float) -> None:
    a = KeyedRng(KEY).keep(0, N_STAT, d)
    b = KeyedRng(other).keep(0, N_STAT, d)
    assert abs(_corr(a, b)) < CORR_BOUND
    # also not a shifted copy: the best alignment over small shifts is still uncorrelated
    for shift in (1, 2, 3, 1024):
        assert abs(_corr(a[shift:], b[:-shift])) < 6 / math.sqrt(N_STAT - shift)


@pytest.mark.parametrize("d", [0.1, 0.5])
def test_adjacent_indices_uncorrelated(d: float) -> None:
    m = KeyedRng(KEY).keep(2**32 - N_STAT // 2, N_STAT, d)  # straddles a 2**32 boundary
    assert abs(_corr(m[:-1], m[1:])) < 6 / math.sqrt(N_STAT - 1)


def test_word_bits_serially_uncorrelated() -> None:
    n = N_STAT // 4
    w = u32(KeyedRng(KEY).bits(0, n))
    for b in range(32):
        bit = ((w >> b) & 1).to(torch.float32)
        assert abs(_corr(bit[:-1], bit[1:])) < 6 / math.sqrt(n - 1), b


def test_byte_histogram_chi_square() -> None:
    for key in (KEY, stream_key(0, "x", 0)):
        chi2 = _chi2_bytes(KeyedRng(key).bits(2**40, N_STAT))
        assert CHI2_LO < chi2 < CHI2_HI


def test_statistics_reject_bad_generators() -> None:
    """The bounds above are tight enough to catch structure, so passing them means something."""
    counter = torch.arange(N_STAT, dtype=torch.int64)
    assert _chi2_bytes(counter.to(torch.int32)) > CHI2_HI  # high bytes all zero
    weyl = (counter * 0x9E3779B9) & M32  # equidistributed bytes: too uniform to be random
    assert _chi2_bytes(weyl.to(torch.int32)) < CHI2_LO
    lumpy = weyl & 0x7F7F7F7F  # bytes never >= 128
    assert _chi2_bytes(lumpy.to(torch.int32)) > CHI2_HI
    a = KeyedRng(KEY).keep(0, N_STAT, 0.5)
    runs = a.repeat_interleave(2)[:N_STAT]  # each decision repeated twice
    assert abs(_corr(runs[:-1], runs[1:])) > CORR_BOUND
    # H(i + key) alone: two keys' masks are shifted copies, caught by the shift check.
    shifted = KeyedRng(KEY).keep(3, N_STAT, 0.5)
    assert abs(_corr(a[3:], shifted[:-3])) > 0.99


# ------------------------------------------------------------------------------ stream_key


def test_stream_key_is_personalised_blake2b() -> None:
    seed, name, model = 42, "lm_head.weight", 0
    raw = name.encode("utf-8")
    h = hashlib.blake2b(struct.pack("<QQQ", seed, model, len(raw)) + raw, digest_size=8, person=b"leanmerge.rng.1")
    assert stream_key(seed, name, model) == int.from_bytes(h.digest(), "little")


def test_stream_key_golden_values() -> None:
    """Pinned outputs: a change here silently changes every DARE mask ever produced."""
    assert stream_key(0, "model.layers.0.self_attn.q_proj.weight", 1) == 0xDF53512FCBB596EB
    assert stream_key(42, "lm_head.weight", 0) == 0x6B97CDCDE82026AB
    assert stream_key(2**64 - 1, "\u00fc", 7) == 0xA883984CD56E79B0


def test_stream_key_separates_fields() -> None:
    keys = {
        stream_key(1, "ab", 0),
        stream_key(1, "a", 0),
        stream_key(1, "b", 0),
        stream_key(0, "ab", 1),
        stream_key(1, "ab", 1),
        stream_key(2, "ab", 0),
    }
    assert len(keys) == 6
    for bad in ((-1, "a", 0), (2**64, "a", 0), (0, "a", -1)):
        with pytest.raises(ValueError):
            stream_key(*bad)


def test_golden_words() -> None:
    """Pinned words: the reference above could be edited along with the code; these cannot."""
    assert KEY == 0x146297289AACC6CB
    idx = (0, 1, 2**32, 2**40 + 5)
    want = [0x83BE65EE, 0xFA27C2E9, 0x8F25D127, 0x8D125AAE]
    assert [ref_word(KEY, i) for i in idx] == want
    assert u32(torch.cat([KeyedRng(KEY).bits(i, 1) for i in idx])).tolist() == want
