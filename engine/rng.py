"""Keyed, counter-based randomness for DARE drop masks (and DELLA keep probabilities).

Why counter-based: the merge engine streams tensors in cache-sized chunks, in any order, on
any number of threads, on CPU or CUDA, and may resume after a crash. The keep decision for
element ``i`` of tensor ``T`` of model ``m`` must therefore be a *pure function* of
``(seed, T, m, i)``. torch's sequential generators (``manual_seed`` + ``rand``) depend on how
many numbers were drawn before and differ between CPU and CUDA, and Python's ``hash()`` of a
string is salted per process, so neither is used. Instead:

* :func:`stream_key` turns ``(seed, tensor name, model index)`` into a 64-bit key with
  BLAKE2b, which is specified byte for byte and so stable across processes, platforms and
  Python versions.
* :class:`KeyedRng` maps a flat element index ``i`` (int64: tensors may exceed 2**32
  elements) to a 32-bit word ``word(key, i)`` with a small integer hash made only of torch ops
  that exist and give the same bits on CPU and CUDA (int32 wrapping multiply/add, xor, and,
  arithmetic shift, compare). No numpy and no custom kernels in the hot path.

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
derived from the threshold, which is exact (see :func:`_keep_constants`).

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

No global state: nothing here touches torch's global generator and there are no module-level
caches; each call builds its few constants and its scratch.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

__all__ = ["KeyedRng", "keep_threshold", "stream_key"]

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_SIGN = 0x80000000
_TWO32 = 1 << 32
_MAX_INDEX = 1 << 63  # flat indices are int64

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

_PERSON = b"leanmerge.rng.1"  # BLAKE2b personalisation: domain-separates these keys

# A constant as the hash's torch ops take it: a 0-dim int32 CPU tensor on CPU, an int elsewhere.
_Const = torch.Tensor | int


def _s32(v: int) -> int:
    """The signed int32 with bit pattern ``v mod 2**32``.

    torch refuses Python scalars that do not fit the tensor's dtype, so every 32-bit constant
    is passed in its signed form; the arithmetic on the bit pattern is the same.
    """
    v &= _M32
    return v - _TWO32 if v & _SIGN else v


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


def _block_keys(key: int, hi: int) -> tuple[int, int, int]:
    """Round keys ``(k0, k1, k2)`` for the indices ``hi * 2**32 .. hi * 2**32 + 2**32 - 1``.

    Folding the high half of the index in here (rather than per element) keeps the per-element
    hash 32-bit while the word still depends on all 64 bits of the index.
    """
    s = _mix64(_mix64(key) + (hi + 1) * _GOLDEN64)
    t = _mix64(s + _GOLDEN64)
    return s & _M32, s >> 32, t & _M32


def stream_key(seed: int, tensor: str, model: int) -> int:
    """The 64-bit key of one random stream: BLAKE2b-64 of ``(seed, tensor name, model index)``.

    BLAKE2b rather than ``hash()`` (salted per process) so that one merge spec gives the same
    masks on every machine and in every run. The fields are framed unambiguously
    (fixed-width integers, length-prefixed UTF-8 name) and the digest is personalised, so
    these keys cannot collide with other BLAKE2b uses.

    Args:
        seed: the merge's seed, ``0 <= seed < 2**64``.
        tensor: the tensor's name in the checkpoint.
        model: index of the model the mask applies to, ``0 <= model < 2**64``.

    Returns:
        An int in ``[0, 2**64)``.
    """
    if not 0 <= seed < (1 << 64):
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if not 0 <= model < (1 << 64):
        raise ValueError(f"model index must be in [0, 2**64), got {model}")
    name = tensor.encode("utf-8")
    h = hashlib.blake2b(digest_size=8, person=_PERSON)
    h.update(struct.pack("<QQQ", seed, model, len(name)))
    h.update(name)
    return int.from_bytes(h.digest(), "little")


def keep_threshold(density: float) -> int:
    """``round(density * 2**32)`` clamped to ``[0, 2**32]``: keep iff ``word < threshold``.

    With uniform 32-bit words ``P(keep) = threshold / 2**32``, within ``2**-33`` of
    ``density``; 1.0 keeps everything and 0.0 nothing. ``density * 2**32`` is exact in
    float64 and ``round`` is half-to-even, the rule ``torch.round`` uses in
    :meth:`KeyedRng.keep_where`, so the two agree for a constant probability.

    Raises:
        ValueError: if ``density`` is NaN or outside ``[0, 1]``.
    """
    d = float(density)
    if math.isnan(d) or not 0.0 <= d <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density!r}")
    return min(max(round(d * _TWO32), 0), _TWO32)


def _keep_constants(thr: int) -> tuple[int, int]:
    """``(g, t)`` such that, for ``0 < thr < 2**32``, ``word < thr`` (unsigned) iff ``(y ^ g) < t`` (signed).

    ``y`` is the hash state before the final ``x ^= x >>> 16`` and ``word = y ^ (y >>> 16) ^ 2**31``.
    Why it is exact: the final xorshift leaves the high half alone, so the high half of
    ``word`` is ``hi(y) ^ 0x8000`` and decides the comparison unless it equals ``H = thr >> 16``;
    in that tie the low half of ``word`` is ``lo(y) ^ H ^ 0x8000``, a constant xor of ``lo(y)``.
    Xoring ``y`` with ``g = H ^ 0x8000`` (low half only) therefore makes ``y ^ g ^ 2**31`` compare
    with ``thr`` exactly as ``word`` does, and the sign flip turns that unsigned comparison into
    a signed one against ``thr - 2**31``. This saves three elementwise passes on the hot path.
    """
    return (thr >> 16) ^ 0x8000, thr - _SIGN


class _Hasher:
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
            seg_n = min(n - pos, _TWO32 - lo)
            k0, k1, k2 = _block_keys(key, i >> 32)
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
        :meth:`KeyedRng.keep` folds that step into one xor (see :func:`_keep_constants`).
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


def _sub_block(work: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    """A ``dest`` for :meth:`_Hasher.blocks` that reuses ``work`` (one sub-block) for every sub-block."""
    size = work.numel()
    return lambda p, q: work if q - p == size else work[: q - p]


def _check_range(start: int, n: int) -> None:
    """Reject index ranges that are not valid int64 flat indices."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if start < 0 or start + n > _MAX_INDEX:
        raise ValueError(f"indices [{start}, {start + n}) are not valid int64 flat indices")


def _resolve_device(device: torch.device | str | None, buf: torch.Tensor | None) -> torch.device:
    """The device to compute on: ``buf``'s if given, else ``device``, else CPU.

    A ``device`` that contradicts ``buf`` is an error rather than a silent copy.
    """
    if buf is None:
        return torch.device("cpu" if device is None else device)
    if device is not None:
        want = torch.device(device)
        if want.type != buf.device.type or (want.index is not None and want != buf.device):
            raise ValueError(f"device {want} does not match the buffer's device {buf.device}")
    return buf.device


def _flat_buffer(buf: torch.Tensor | None, n: int, dtype: torch.dtype, dev: torch.device, name: str) -> torch.Tensor:
    """``buf`` viewed flat after checking it is contiguous ``dtype`` with ``n`` elements, or a new one."""
    if buf is None:
        return torch.empty(n, dtype=dtype, device=dev)
    if buf.dtype != dtype or buf.numel() != n or not buf.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous {dtype} tensor of {n} elements, got {buf.dtype} with {buf.numel()} elements"
        )
    return buf.view(-1)


@dataclass(frozen=True, slots=True)
class KeyedRng:
    """The random stream of one key: ``word(key, i)`` for any flat index ``i``.

    Immutable and holding only the key, so it is free to construct per (tensor, model) and
    safe to share between threads. Results never depend on chunking, order, thread count or
    device.
    """

    key: int

    def __post_init__(self) -> None:
        """Reject keys outside 64 bits, which would otherwise alias after masking."""
        if not 0 <= self.key < (1 << 64):
            raise ValueError(f"key must be in [0, 2**64), got {self.key}")

    def _work(self, n: int, dev: torch.device, out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A one-sub-block word buffer and the xorshift scratch, carved from ``out`` if it is big enough.

        Paths that consume each sub-block at once (keep, uniform, keep_where) need only one
        sub-block of words, which keeps the working set in L2 and avoids allocating.
        """
        b = min(n, sub_block_size(dev))
        have = 0 if out is None else out.numel()
        if out is not None and have >= 2 * b:
            return out[:b], out[b : 2 * b]
        if out is not None and have >= b:
            return out[:b], torch.empty(b, dtype=torch.int32, device=dev)
        both = torch.empty(2 * b, dtype=torch.int32, device=dev)  # out absent or too small to help
        return both[:b], both[b:]

    def bits(
        self, start: int, n: int, *, device: torch.device | str | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The words of flat indices ``start .. start+n-1`` as int32 holding the u32 bit pattern.

        int32 rather than uint32 because torch lacks unsigned 32-bit shifts and compares on
        CPU; ``w.to(torch.int64) & 0xFFFFFFFF`` recovers the unsigned values.

        Args:
            start: flat index of the first element (``0 <= start``, ``start + n <= 2**63``).
            n: number of words.
            device: where to compute; defaults to ``out``'s device, else CPU.
            out: optional contiguous int32 tensor of ``n`` elements to write into (returned
                flattened), so a chunk loop can reuse one buffer.
        """
        _check_range(start, n)
        dev = _resolve_device(device, out)
        words = _flat_buffer(out, n, torch.int32, dev, "out")
        if n == 0:
            return words
        scratch = torch.empty(min(n, sub_block_size(dev)), dtype=torch.int32, device=dev)
        h = _Hasher(self.key, start, n, dev, [_SIGN])
        (sign,) = h.extra
        for _, _, x in h.blocks(lambda p, q: words[p:q], scratch):
            x.bitwise_xor_(sign)
        return words

    def keep(
        self,
        start: int,
        n: int,
        density: float,
        *,
        device: torch.device | str | None = None,
        out: torch.Tensor | None = None,
        mask_out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """DARE keep mask: element ``i`` kept iff ``word(i) < keep_threshold(density)`` (unsigned).

        ``P(keep) = keep_threshold(density) / 2**32``. Density 1.0 keeps every element and 0.0
        none, without hashing.

        Args:
            start, n, device: as in :meth:`bits` (``device`` defaults to the buffers' device).
            density: fraction kept, in ``[0, 1]``.
            out: optional int32 scratch (any contiguous int32 tensor; its contents are
                overwritten and unspecified afterwards). Passing the same one for every chunk
                avoids allocating; ``2 * min(n, 65536)`` elements suffice.
            mask_out: optional contiguous tensor of ``n`` elements to receive the mask: bool, or
                float32 for a 0/1 mask that multiplies a delta 3x faster than a bool one.

        Returns:
            A flat bool tensor of ``n`` elements (``mask_out`` flattened, if given).
        """
        _check_range(start, n)
        thr = keep_threshold(density)
        dev = _resolve_device(device, mask_out if mask_out is not None else out)
        if out is not None and (out.dtype != torch.int32 or not out.is_contiguous() or out.device != dev):
            raise ValueError(f"out must be a contiguous int32 tensor on {dev}")
        as_float = mask_out is not None and mask_out.dtype == torch.float32
        mask = _flat_buffer(mask_out, n, torch.float32 if as_float else torch.bool, dev, "mask_out")
        if n == 0 or thr in (0, _TWO32):
            return mask.fill_(thr != 0)
        work, scratch = self._work(n, dev, None if out is None else out.view(-1))
        # The last xorshift is folded into one xor with a constant (exact, see _keep_constants).
        h = _Hasher(self.key, start, n, dev, _keep_constants(thr))
        fold, sthr = h.extra
        # Comparing into a uint8 view (0/1 are valid bools) is ~2.5x faster on CPU than into bool.
        mask_u8 = mask if as_float else mask.view(torch.uint8)
        for p, q, y in h.blocks(_sub_block(work), scratch, last_xorshift=False):
            y.bitwise_xor_(fold)
            torch.lt(y, sthr, out=mask_u8[p:q])
        return mask

    def uniform(self, start: int, n: int, *, device: torch.device | str | None = None) -> torch.Tensor:
        """float32 in ``[0, 1)``: ``(word >> 8) * 2**-24``, exact.

        The top 24 bits are used because float32 has a 24-bit significand: more bits would
        round some values up to 1.0 and make the grid uneven.
        """
        _check_range(start, n)
        dev = _resolve_device(device, None)
        u = torch.empty(n, dtype=torch.float32, device=dev)
        if n == 0:
            return u
        work, scratch = self._work(n, dev, None)
        h = _Hasher(self.key, start, n, dev, [8])
        (s8,) = h.extra
        for p, q, x in h.blocks(_sub_block(work), scratch):
            # word >> 8 (logical) == (pre >> 8) (arithmetic) + 2**23, because word = pre + 2**31;
            # both steps below are exact in float32 (|pre >> 8| < 2**23, results on a 2**-24 grid).
            x.bitwise_right_shift_(s8)
            torch.mul(x, 2.0**-24, out=u[p:q]).add_(0.5)
        return u

    def keep_where(self, start: int, prob: torch.Tensor) -> torch.Tensor:
        """Per-element keep: flat element ``j`` of ``prob`` (index ``start + j``) is kept iff
        ``word(start + j) < round(prob[j] * 2**32)`` (unsigned; round half to even).

        The scaling, rounding and comparison happen in float64, where all three are exact for
        float16/bfloat16/float32/float64 probabilities, so the rule holds bit-exactly on every
        device and, for a constant probability ``p``, equals ``keep(start, n, p)``. (Comparing
        ``uniform() < prob`` in float32 would only see 24 bits and disagree with :meth:`keep`.)
        Values ``<= 0`` and NaN keep nothing; values ``>= 1`` keep everything.

        Returns:
            A bool tensor shaped like ``prob``, on ``prob``'s device.
        """
        if not prob.is_floating_point():
            raise ValueError(f"prob must be a floating-point tensor, got {prob.dtype}")
        n = prob.numel()
        _check_range(start, n)
        dev = prob.device
        mask = torch.empty(n, dtype=torch.bool, device=dev)
        if n == 0:
            return mask.view(prob.shape)
        flat = prob.reshape(-1)
        work, scratch = self._work(n, dev, None)
        for p, q, x in _Hasher(self.key, start, n, dev).blocks(_sub_block(work), scratch):
            thr = torch.round(flat[p:q].to(torch.float64) * float(_TWO32)).sub_(float(_SIGN))
            torch.lt(x, thr, out=mask[p:q])  # int32 vs float64 compares in float64: exact
        return mask.view(prob.shape)
