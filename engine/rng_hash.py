"""The per-element hash behind `engine.rng.KeyedRng`: ``word(key, i)`` from int32 torch ops.

The hash, which the tests' pure-Python reference reproduces (all arithmetic mod 2**32, ``>>``
logical)::

    hi, lo     = i >> 32, i & 0xFFFFFFFF
    k0, k1, k2 = block_keys(key, hi)        # splitmix64-derived, computed in Python per call
    x = (lo + k0) * 0x9E3779B9              # a Weyl sequence in lo
    x ^= x >> 16
    x = x * 0x7FEB352D + k1
    x ^= x >> 16
    x = x * 0x846CA68B + k2
    x ^= x >> 16
    word = x ^ 0x80000000

Why it looks like this:

* 64-bit indices: the high half of ``i`` is folded into the round keys in Python, so the
  per-element work is pure 32-bit; a chunk that crosses a 2**32 boundary is split there and
  each side hashed with its own keys. The result does not depend on chunking.
* Independent keys: the key enters three times (an offset before the first multiply and an
  additive round key before each later multiply), each followed by non-linear xorshift /
  multiply steps. Two keys give unrelated masks, not shifted copies of one sequence (which
  ``H(i + key)`` alone would give).
* Every step is a bijection of 32-bit words (odd multiply, add, xorshift), so within one
  2**32 block distinct indices get distinct words. The multipliers are those of Chris
  Wellons' ``lowbias32``; with the leading Weyl multiply this is ``lowbias32``'s shape with
  all shifts 16. Its avalanche is at sampling noise (max bit bias 0.006 over 32x32 bit
  pairs at 2**16 samples, as for ``lowbias32``); the cheaper two-round variant was rejected
  by the benchmark's quality gate (avalanche bias 0.33, adjacent-index correlation 12 sigma).
* All shifts are 16 so each ``x ^= x >> 16`` is the same three torch ops: an *arithmetic*
  shift into scratch, ``& 0xFFFF`` (making it logical: torch has no unsigned 32-bit shift or
  compare on CPU) and an in-place xor. The first multiply is folded into index generation
  (``base + j * M1`` by one broadcast add of a row and a column vector, cheaper than
  ``arange``); each later ``x * M + k`` is one fused ``torch.add(k, x, alpha=M)``.
* The final ``^ 0x80000000`` is part of the definition so that the hot path needs no extra
  op: unsigned ``word < t`` is signed ``x < t - 2**31`` on the pre-flip value ``x``.
  :meth:`KeyedRng.bits` pays one in-place xor to return ``word``.
* int32 multiply/add overflow wraps as two's complement; the tests check the CPU bits
  against a pure-Python ``& 0xFFFFFFFF`` reference, run the non-CPU code path (int scalars,
  unfused multiply-add, whole-chunk sub-blocks) on CPU, and compare CUDA with CPU when a GPU
  is present (`bench/gpu_check.py` on an H200: every method's merged output bit-identical).

Why the code is shaped the way it is (CPU speed): each elementwise torch op over 256K int32
elements is bound by cache bandwidth, and each call costs ~1-2 us of dispatch. So the hash
runs in sub-blocks of ``_BLOCK`` (64K) elements whose words and scratch stay in L2 (about 2x
faster than whole 256K chunks, which spill), constants are passed as 0-dim int32 tensors
made once per call (a Python int scalar costs an extra ~2 us per op to wrap), the comparison
writes into a uint8 view of the bool mask (~2.5x faster than producing bool directly), and
:meth:`KeyedRng.keep` replaces the final xorshift (three ops) by one xor with a constant
derived from the threshold, which is exact (see :func:`engine.rng._keep_constants`).

Performance: ``bench/bench_rng.py``, ``keep`` at density 0.1 on 256K-element chunks with a
reused ``out``, ns per element, median of 7 runs (results file
``bench/results/rng-20261126T195926Z.json``). Measured on this 2-core machine (Intel Xeon
Processor with AVX-512, torch 2.13.0+cpu), 2026-11-26, load average 0.4 at start; other jobs
on the machine move these figures by up to 2x, so compare only runs from one session::

    candidate            1 thread  2 threads  quality gate
    a  int64 + masks       10.09      4.09    pass (same hash)
    b  int32, naive         4.14      1.59    pass (same hash)
    c  int32, blocked       2.01      1.68    pass (same hash)
    c+ this module          1.87      1.53    pass (same hash; c + folded last xorshift)
    d  int16-view xorshift  2.48      1.71    pass (same hash)
    e  two rounds           1.49      1.22    FAIL: avalanche bias 0.33, adjacent bits 12 sigma
    f  x += x >> 16         1.70      1.32    FAIL: adjacent bits 804 sigma

c+ is the fastest candidate that passes, and meets the 2 ns/element target at one thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

__all__ = ["Hasher", "block_keys", "sub_block", "sub_block_size"]

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
SIGN = 0x80000000
TWO32 = 1 << 32
MAX_INDEX = 1 << 63  # flat indices are int64

# Multipliers (odd, so each multiply is a bijection mod 2**32).
_M1 = 0x9E3779B9  # golden-ratio Weyl increment
_M2 = 0x7FEB352D  # lowbias32
_M3 = 0x846CA68B  # lowbias32

_GOLDEN64 = 0x9E3779B97F4A7C15

# Elements per sub-block: words plus shift scratch (2 x 256 KiB) stay in L2 (see module doc).
_BLOCK = 1 << 16
# On a GPU the L2 argument does not hold and every sub-block costs ~15 kernel launches: a
# 64K-element sub-block kept the CPU thread launching while the GPU idled (dare_ties on an H200
# ran at the same 1.0 GB/s cold and warm). There one sub-block is a whole merge chunk.
_DEVICE_BLOCK = 1 << 24
# Columns of the broadcast add that generates the Weyl sequence; divides _BLOCK and _DEVICE_BLOCK.
_COLS = 1024


# A constant as the hash's torch ops take it: a 0-dim int32 CPU tensor on CPU, an int elsewhere.
_Const = torch.Tensor | int


def _s32(v: int) -> int:
    """The signed int32 with bit pattern ``v mod 2**32``.

    torch refuses Python scalars that do not fit the tensor's dtype, so every 32-bit constant
    is passed in its signed form; the arithmetic on the bit pattern is the same.
    """
    v &= _M32
    return v - TWO32 if v & SIGN else v


def _consts(values: Sequence[int], dev: torch.device) -> list[_Const]:
    """32-bit constants in the cheapest form for ops on ``dev``.

    On CPU a Python scalar is wrapped into a fresh tensor on every op (~2 us each), so the
    constants are made once per call as 0-dim int32 tensors (one allocation, then views).
    On other devices plain ints are used: they are passed to the kernel by value.
    """
    vals = [_s32(v) for v in values]
    if dev.type == "cpu":
        return list(torch.tensor(vals, dtype=torch.int32).unbind())
    return list(vals)


def _mix64(z: int) -> int:
    """splitmix64's finaliser (Stafford's Mix13): a 64-bit bijection with full avalanche.

    Used only in Python, once per 2**32 block per call, to derive the 32-bit round keys.
    """
    z &= _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def block_keys(key: int, hi: int) -> tuple[int, int, int]:
    """Round keys ``(k0, k1, k2)`` for the indices ``hi * 2**32 .. hi * 2**32 + 2**32 - 1``.

    Folding the high half of the index in here (rather than per element) keeps the per-element
    hash 32-bit while the word still depends on all 64 bits of the index.
    """
    s = _mix64(_mix64(key) + (hi + 1) * _GOLDEN64)
    t = _mix64(s + _GOLDEN64)
    return s & _M32, s >> 32, t & _M32


class Hasher:
    """One call's plan for hashing indices ``start .. start+n-1`` on one device.

    All per-call constants (shift, mask, every 2**32 block's round keys, and the caller's
    ``extra`` values) are made in a single tensor up front, because on CPU each small torch
    call costs about as much as hashing ten thousand elements.
    """

    def __init__(self, key: int, start: int, n: int, dev: torch.device, extra: Sequence[int] = ()) -> None:
        """Split the range at 2**32 index boundaries and derive each part's round keys."""
        self.dev = dev
        self.segments: list[tuple[int, int, int, int]] = []  # (pos, length, lo, k0)
        vals = [16, 0xFFFF, *extra]
        pos = 0
        while pos < n:
            i = start + pos
            lo = i & _M32
            seg_n = min(n - pos, TWO32 - lo)
            k0, k1, k2 = block_keys(key, i >> 32)
            self.segments.append((pos, seg_n, lo, k0))
            vals += [k1, k2]
            pos += seg_n
        c = _consts(vals, dev)
        self.s16, self.ff = c[0], c[1]
        self.extra = c[2 : 2 + len(extra)]
        self._round_keys = c[2 + len(extra) :]

    def blocks(
        self, dest: Callable[[int, int], torch.Tensor], scratch: torch.Tensor, *, last_xorshift: bool = True
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Hash sub-block by sub-block, lazily.

        For each sub-block ``[p, q)`` (positions relative to ``start``) the pre-flip words
        ``word ^ 0x80000000`` are written into ``dest(p, q)`` (a contiguous int32 tensor of
        ``q - p`` elements) and ``(p, q, that tensor)`` is yielded, so the caller consumes it
        while it is still in cache. ``scratch`` (int32, at least ``min(n, sub_block_size(dev))``
        elements, on the device) is the xorshift temporary. Splits are at 2**32 index boundaries
        (new round keys) and every ``sub_block_size(dev)`` elements; neither changes any value.

        With ``last_xorshift=False`` the final ``x ^= x >>> 16`` is skipped and the yielded
        values are ``y``, the state after the last multiply-add (``pre = y ^ (y >>> 16)``);
        :meth:`KeyedRng.keep` folds that step into one xor (see :func:`engine.rng._keep_constants`).
        """
        dev, s16, ff = self.dev, self.s16, self.ff
        cols = torch.arange(_COLS, dtype=torch.int32, device=dev).mul_(_s32(_M1))
        cols2d = cols.view(1, _COLS)
        for s, (pos, seg_n, lo, k0) in enumerate(self.segments):
            kk1, kk2 = self._round_keys[2 * s], self._round_keys[2 * s + 1]
            # x_j = (lo + j + k0) * M1 = base + j * M1, laid out as rows of _COLS columns:
            # row r starts at base + r * _COLS * M1 and column c adds c * M1.
            nrows = -(-seg_n // _COLS)
            rows = torch.arange(nrows, dtype=torch.int32, device=dev)
            rows = rows.mul_(_s32(_COLS * _M1)).add_(_s32((lo + k0) * _M1)).view(nrows, 1)
            step = sub_block_size(dev)
            for off in range(0, seg_n, step):
                m = min(step, seg_n - off)
                x = dest(pos + off, pos + off + m)
                t = scratch if scratch.numel() == m else scratch[:m]
                r0 = off // _COLS
                full = m - m % _COLS
                if full:
                    xf = x if full == m else x[:full]
                    torch.add(rows[r0 : r0 + full // _COLS], cols2d, out=xf.view(-1, _COLS))
                if full < m:
                    torch.add(cols[: m - full], rows[r0 + full // _COLS], out=x[full:])
                _xorshift16(x, t, s16, ff)
                _affine(x, _M2, kk1)
                _xorshift16(x, t, s16, ff)
                _affine(x, _M3, kk2)
                if last_xorshift:
                    _xorshift16(x, t, s16, ff)
                yield pos + off, pos + off + m, x


def _xorshift16(x: torch.Tensor, t: torch.Tensor, s16: _Const, ff: _Const) -> None:
    """``x ^= x >>> 16`` (logical shift) in place, with ``t`` (same shape) as temporary.

    torch's int32 ``>>`` is arithmetic; ``& 0xFFFF`` drops the sign-extension bits, which
    gives the logical shift on both CPU and CUDA.
    """
    torch.bitwise_right_shift(x, s16, out=t)
    t.bitwise_and_(ff)
    x.bitwise_xor_(t)


def _affine(x: torch.Tensor, mul: int, add: _Const) -> None:
    """``x = x * mul + add`` in place, wrapping mod 2**32.

    On CPU (``add`` a 0-dim tensor) one fused kernel, ``torch.add(add, x, alpha=mul)``;
    elsewhere two plain in-place ops, which give the same wrapped value.
    """
    if isinstance(add, torch.Tensor):
        torch.add(add, x, alpha=_s32(mul), out=x)
    else:
        x.mul_(_s32(mul)).add_(add)


def sub_block_size(dev: torch.device) -> int:
    """Elements hashed per step: L2-sized on the CPU, a whole chunk on a GPU (see _DEVICE_BLOCK)."""
    return _BLOCK if dev.type == "cpu" else _DEVICE_BLOCK


def sub_block(work: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    """A ``dest`` for :meth:`Hasher.blocks` that reuses ``work`` (one sub-block) for every sub-block."""
    size = work.numel()
    return lambda p, q: work if q - p == size else work[: q - p]
