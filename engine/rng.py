"""Keyed, counter-based randomness for DARE drop masks (and DELLA keep probabilities).

Why counter-based: the merge engine streams tensors in cache-sized chunks, possibly in any
order, on any number of threads, on CPU or CUDA, and may resume after a crash. The keep
decision for element ``i`` of tensor ``T`` of model ``m`` must therefore be a *pure function*
of ``(seed, T, m, i)``. torch's sequential generators (``torch.manual_seed`` + ``rand``) depend
on how many numbers were drawn before and differ between CPU and CUDA, and Python's ``hash()``
of a string is salted per process, so neither is used. Instead:

* :func:`stream_key` turns ``(seed, tensor name, model index)`` into a 64-bit key with
  BLAKE2b, which is specified byte-for-byte and so stable across processes, platforms and
  Python versions.
* :class:`KeyedRng` maps a flat element index ``i`` (any int64, tensors may exceed 2**32
  elements) to a 32-bit word ``word(key, i)`` with a small integer hash built from torch ops
  that exist and behave identically on CPU and CUDA (int32 wrapping multiply/add, xor, and,
  arithmetic shift, compare). No numpy and no custom kernels in the hot path.

The hash (the definition the tests' pure-Python reference reproduces; all arithmetic mod 2**32)::

    hi, lo     = i >> 32, i & 0xFFFFFFFF
    k0, k1, k2 = block_keys(key, hi)        # splitmix64-derived, computed in Python per call
    x = (lo + k0) * 0x9E3779B9              # Weyl sequence: consecutive lo differ by a constant
    x ^= x >> 16                            # logical shifts
    x = x * 0x7FEB352D + k1
    x ^= x >> 16
    x = x * 0x846CA68B + k2
    x ^= x >> 16
    word = x ^ 0x80000000

Design notes (the *why* behind each step):

* 64-bit indices: the high 32 bits of ``i`` are folded into the per-block keys in Python, so the
  per-element work is pure 32-bit; a chunk that crosses a 2**32 boundary is split there and
  each side hashed with its own keys. The result is the same whatever the chunking.
* Independence between keys: the key enters three times (an offset before the first multiply,
  and additive round keys before the second and third multiplies), each followed by a
  non-linear xorshift/multiply. Two keys therefore give unrelated sequences, not shifted
  copies of one (which ``H(i + key)`` alone would give).
* Every step is a bijection of 32-bit words (odd multiplier, add, xorshift), so within one
  2**32 block distinct indices give distinct words; the multipliers are those of Chris
  Wellons' ``lowbias32`` (with the 15-bit shift replaced by 16) after a golden-ratio Weyl step.
* All shifts are 16 so every ``x ^= x >>> 16`` is the same three torch ops: an *arithmetic*
  shift into a scratch buffer, ``& 0xFFFF`` (making it logical, since torch has no unsigned
  32-bit shift or compare on CPU), and an in-place xor. The first multiply is folded into the
  index generation (``x_j = base + j * M1`` built by one broadcast add of a row and a column
  vector, cheaper than ``arange``), and each later ``x * M + k`` is one fused
  ``torch.add(k, x, alpha=M)`` on CPU.
* The final ``^ 0x80000000`` is part of the definition so that the hot path (:meth:`keep`)
  needs no extra op: ``word < t`` unsigned is ``x < t - 2**31`` signed on the pre-flip value.
  :meth:`bits` pays one in-place xor to return ``word``.
* int32 multiply/add overflow wraps as two's complement on CPU and CUDA; the tests check the
  CPU result against a pure-Python ``& 0xFFFFFFFF`` reference.
* Work is done in sub-blocks of 64K elements so the word buffer and the shift scratch stay in
  L2; this was measurably faster than one pass over a 256K chunk (see ``bench/bench_rng.py``).

Performance (``bench/bench_rng.py``, ``keep`` on 256K-element chunks with a reused ``out``
buffer, median of 7 repeats), measured on this 2-core machine (Intel Xeon, AVX-512,
torch 2.13 CPU), 2025-11-26: see the figures below.

    PERF_PLACEHOLDER

No global state: nothing here touches torch's global generator, and there are no module-level
caches; every call allocates its own small scratch.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterator
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

# Elements hashed per sub-block: the int32 words plus the shift scratch (2 x 256 KiB) stay in L2.
_BLOCK = 1 << 17
# Columns of the broadcast add that generates the Weyl sequence; divides _BLOCK.
_COLS = 1024

_PERSON = b"leanmerge.rng.1"  # BLAKE2b personalisation: domain-separates these keys


def _s32(v: int) -> int:
    """The signed int32 with bit pattern ``v mod 2**32``.

    torch refuses Python scalars that do not fit the tensor's dtype, so every 32-bit constant
    is passed in its signed form; the arithmetic on the bit pattern is the same.
    """
    v &= _M32
    return v - _TWO32 if v & _SIGN else v


def _mix64(z: int) -> int:
    """splitmix64's finaliser (Stafford's Mix13): a 64-bit bijection with full avalanche.

    Used only in Python, once per call, to derive the 32-bit round keys of a 2**32 block.
    """
    z &= _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _block_keys(key: int, hi: int) -> tuple[int, int, int]:
    """Round keys ``(k0, k1, k2)`` for the indices ``hi * 2**32 .. hi * 2**32 + 2**32 - 1``.

    Folding the high half of the index in here (rather than per element) keeps the per-element
    hash 32-bit while still making the word depend on all 64 bits of the index.
    """
    s = _mix64(_mix64(key) + (hi + 1) * _GOLDEN64)
    t = _mix64(s + _GOLDEN64)
    return s & _M32, s >> 32, t & _M32


def stream_key(seed: int, tensor: str, model: int) -> int:
    """The 64-bit key of one random stream: BLAKE2b-64 of ``(seed, tensor name, model index)``.

    BLAKE2b is used (not ``hash()``, which is salted per process) so that the same merge spec
    gives the same masks on every machine and in every run. The fields are framed
    unambiguously (fixed-width integers, length-prefixed UTF-8 name) and the digest is
    personalised so these keys cannot collide with other BLAKE2b uses.

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

    With uniform 32-bit words, ``P(keep) = threshold / 2**32``, within ``2**-33`` of
    ``density``; 1.0 keeps everything and 0.0 nothing. ``density * 2**32`` is exact in
    float64 and ``round`` is half-to-even, the same rule ``torch.round`` uses in
    :meth:`KeyedRng.keep_where`, so the two agree for a constant probability.

    Raises:
        ValueError: if ``density`` is NaN or outside ``[0, 1]``.
    """
    d = float(density)
    if math.isnan(d) or not 0.0 <= d <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density!r}")
    return min(max(round(d * _TWO32), 0), _TWO32)


def _key_scalar(k: int, dev: torch.device) -> torch.Tensor | int:
    """A round key in the form :func:`_affine_` wants: a CPU 0-dim tensor, or an int elsewhere.

    Made once per 2**32 block (not per sub-block) because creating a tensor costs microseconds.
    """
    return torch.tensor(_s32(k), dtype=torch.int32) if dev.type == "cpu" else _s32(k)


def _affine_(x: torch.Tensor, mul: int, add: torch.Tensor | int) -> None:
    """``x = x * mul + add`` in place, wrapping mod 2**32.

    On CPU (``add`` a 0-dim tensor) this is one fused kernel, ``torch.add(add, x, alpha=mul)``;
    elsewhere two plain in-place ops, which compute the same wrapped value.
    """
    if isinstance(add, torch.Tensor):
        torch.add(add, x, alpha=_s32(mul), out=x)
    else:
        x.mul_(_s32(mul)).add_(add)


def _xorshift16_(x: torch.Tensor, scratch: torch.Tensor) -> None:
    """``x ^= x >>> 16`` (logical shift) in place, using ``scratch`` (same shape) as temporary.

    torch's int32 ``>>`` is arithmetic; masking with 0xFFFF discards the sign-extension bits,
    which gives the logical shift on both CPU and CUDA.
    """
    torch.bitwise_right_shift(x, 16, out=scratch)
    scratch.bitwise_and_(0xFFFF)
    x.bitwise_xor_(scratch)


class _Segment:
    """Per-call state for hashing indices that share one high half (one 2**32 block).

    Everything here is derived once per block of 2**32 indices and reused for every L2-sized
    sub-block, because on CPU each small torch call costs about as much as hashing thousands
    of elements.
    """

    __slots__ = ("cols", "k1", "k2", "lo0", "rows")

    def __init__(self, key: int, start: int, n: int, dev: torch.device) -> None:
        """Prepare indices ``start .. start+n-1``, all with the same ``start >> 32``."""
        k0, k1, k2 = _block_keys(key, start >> 32)
        self.lo0 = start & _M32
        # x_j = (lo0 + j + k0) * M1 = base + j * M1, laid out as rows of _COLS: row r starts at
        # base + r * _COLS * M1 and column c adds c * M1.
        self.cols = torch.arange(_COLS, dtype=torch.int32, device=dev).mul_(_s32(_M1))
        nrows = -(-n // _COLS)
        self.rows = torch.arange(nrows, dtype=torch.int32, device=dev)
        self.rows.mul_(_s32(_COLS * _M1)).add_(_s32((self.lo0 + k0) * _M1))
        self.k1 = _key_scalar(k1, dev)
        self.k2 = _key_scalar(k2, dev)

    def hash_(self, x: torch.Tensor, off: int, scratch: torch.Tensor) -> None:
        """Write ``word ^ 0x80000000`` of indices ``start+off ..`` into ``x`` (``off % _COLS == 0``)."""
        m = x.numel()
        full = m - m % _COLS
        r0 = off // _COLS
        if full:
            rows = self.rows[r0:r0 + full // _COLS].view(-1, 1)
            torch.add(rows, self.cols.view(1, -1), out=x[:full].view(-1, _COLS))
        if full < m:
            r = r0 + full // _COLS
            torch.add(self.cols[: m - full], self.rows[r:r + 1], out=x[full:])
        t = scratch[:m]
        _xorshift16_(x, t)
        _affine_(x, _M2, self.k1)
        _xorshift16_(x, t)
        _affine_(x, _M3, self.k2)
        _xorshift16_(x, t)


def _check_range(start: int, n: int) -> None:
    """Reject index ranges that are not valid int64 flat indices."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if start < 0 or start + n > _MAX_INDEX:
        raise ValueError(f"indices [{start}, {start + n}) are not valid int64 flat indices")


def _resolve_device(device: torch.device | str | None, out: torch.Tensor | None) -> torch.device:
    """The device to compute on: ``out``'s if given (a different ``device`` is an error), else ``device`` or CPU."""
    if out is None:
        return torch.device("cpu" if device is None else device)
    if device is not None:
        want = torch.device(device)
        if want.type != out.device.type or (want.index is not None and want != out.device):
            raise ValueError(f"device {want} does not match out's device {out.device}")
    return out.device


def _int32_buffer(n: int, dev: torch.device, out: torch.Tensor | None) -> torch.Tensor:
    """A flat contiguous int32 buffer of ``n`` elements: ``out`` viewed flat, or a new one."""
    if out is None:
        return torch.empty(n, dtype=torch.int32, device=dev)
    if out.dtype != torch.int32 or out.numel() != n or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous int32 tensor of {n} elements, "
                         f"got {out.dtype} with {out.numel()} elements")
    return out.view(-1)


@dataclass(frozen=True, slots=True)
class KeyedRng:
    """The random stream of one key: ``word(key, i)`` for any flat index ``i``.

    Immutable and holding only the key, so it is free to construct per (tensor, model) and
    safe to share between threads. Results never depend on chunking, order, thread count or
    device.
    """

    key: int

    def __post_init__(self) -> None:
        """Reject keys outside 64 bits, which would silently alias after masking."""
        if not 0 <= self.key < (1 << 64):
            raise ValueError(f"key must be in [0, 2**64), got {self.key}")

    def _fill_blocks(self, start: int, x: torch.Tensor) -> Iterator[tuple[int, int]]:
        """Fill flat int32 ``x`` with ``word ^ 0x80000000`` of indices ``start ..``, lazily.

        Yields each ``(begin, end)`` sub-block right after it is written, so a caller can
        consume it (compare, convert) while it is still in cache. The range is split at 2**32
        boundaries (each side gets its own round keys) and into L2-sized sub-blocks; neither
        split changes the values, only the speed.
        """
        n = x.numel()
        if n == 0:
            return
        scratch = torch.empty(min(n, _BLOCK), dtype=torch.int32, device=x.device)
        pos = 0
        while pos < n:
            i = start + pos
            seg_n = min(n - pos, _TWO32 - (i & _M32))
            seg = _Segment(self.key, i, seg_n, x.device)
            for off in range(0, seg_n, _BLOCK):
                m = min(_BLOCK, seg_n - off)
                seg.hash_(x[pos + off:pos + off + m], off, scratch)
                yield pos + off, pos + off + m
            pos += seg_n

    def _fill(self, start: int, x: torch.Tensor) -> None:
        """Fill ``x`` completely (see :meth:`_fill_blocks`)."""
        for _ in self._fill_blocks(start, x):
            pass

    def bits(self, start: int, n: int, *, device: torch.device | str | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """The words of flat indices ``start .. start+n-1`` as int32 holding the u32 bit pattern.

        int32 rather than uint32 because torch lacks unsigned 32-bit shifts and compares on
        CPU; ``w & 0xFFFFFFFF`` (or ``.to(int64) & 0xFFFFFFFF``) recovers the unsigned value.

        Args:
            start: flat index of the first element (``0 <= start``, ``start + n <= 2**63``).
            n: number of words.
            device: where to compute; defaults to ``out``'s device, else CPU.
            out: optional contiguous int32 tensor of ``n`` elements to write into (returned
                flattened), so a chunk loop can reuse one buffer.
        """
        _check_range(start, n)
        x = _int32_buffer(n, _resolve_device(device, out), out)
        self._fill(start, x)
        return x.bitwise_xor_(_s32(_SIGN))

    def keep(self, start: int, n: int, density: float, *, device: torch.device | str | None = None,
             out: torch.Tensor | None = None, mask_out: torch.Tensor | None = None) -> torch.Tensor:
        """DARE keep mask: element ``i`` kept iff ``word(i) < keep_threshold(density)`` (unsigned).

        ``P(keep) = keep_threshold(density) / 2**32``. For density 1.0 every element is kept and
        for 0.0 none, without hashing.

        Args:
            start, n, device: as in :meth:`bits`.
            density: fraction kept, in ``[0, 1]``.
            out: optional int32 scratch of ``n`` elements (its contents are overwritten with
                ``word ^ 0x80000000``); reusing it avoids an allocation per chunk.
            mask_out: optional bool tensor of ``n`` elements to receive the mask.

        Returns:
            A flat bool tensor of ``n`` elements (``mask_out`` flattened, if given).
        """
        _check_range(start, n)
        thr = keep_threshold(density)
        dev = _resolve_device(device, out if out is not None else mask_out)
        if mask_out is None:
            mask = torch.empty(n, dtype=torch.bool, device=dev)
        else:
            if mask_out.dtype != torch.bool or mask_out.numel() != n or not mask_out.is_contiguous():
                raise ValueError(f"mask_out must be a contiguous bool tensor of {n} elements")
            mask = mask_out.view(-1)
        if thr == 0 or thr == _TWO32:
            return mask.fill_(thr != 0)
        x = _int32_buffer(n, dev, out)
        # word < thr (unsigned)  <=>  (word ^ 2**31) < thr - 2**31 (signed); x holds word ^ 2**31.
        signed_thr = thr - _SIGN
        # Comparing into a uint8 view of the bool mask (0/1 are valid bools) is about twice as
        # fast on CPU as producing bool directly; each sub-block is compared while in cache.
        mask_u8 = mask.view(torch.uint8)
        for p, q in self._fill_blocks(start, x):
            torch.lt(x[p:q], signed_thr, out=mask_u8[p:q])
        return mask

    def uniform(self, start: int, n: int, *, device: torch.device | str | None = None) -> torch.Tensor:
        """float32 in ``[0, 1)``: ``(word >> 8) * 2**-24``, exact (24 bits fit float32's mantissa).

        The top 24 bits are used because float32 cannot represent more in ``[0, 1)`` without
        rounding some values up to 1.0.
        """
        _check_range(start, n)
        x = torch.empty(n, dtype=torch.int32, device=_resolve_device(device, None))
        self._fill(start, x)
        # word >> 8 (logical) == (pre >> 8) (arithmetic) + 2**23, since word = pre + 2**31.
        x.bitwise_right_shift_(8)
        u = x.to(torch.float32)
        return u.mul_(2.0**-24).add_(0.5)

    def keep_where(self, start: int, prob: torch.Tensor) -> torch.Tensor:
        """Per-element keep decision: flat element ``j`` of ``prob`` (index ``start + j``) kept iff
        ``word(start + j) < round(prob[j] * 2**32)`` (unsigned, round half to even).

        The product, the rounding and the comparison are done in float64, where all of them are
        exact for float16/bfloat16/float32/float64 probabilities, so the rule holds bit-exactly on
        every device; for a constant probability ``p`` it equals ``keep(start, n, p)``. Values
        ``<= 0`` (and NaN) keep nothing, values ``>= 1`` keep everything.

        Returns:
            A bool tensor shaped like ``prob``, on ``prob``'s device.
        """
        if not prob.is_floating_point():
            raise ValueError(f"prob must be a floating-point tensor, got {prob.dtype}")
        n = prob.numel()
        _check_range(start, n)
        x = torch.empty(n, dtype=torch.int32, device=prob.device)
        self._fill(start, x)
        thr = torch.round(prob.reshape(-1).to(torch.float64) * float(_TWO32)).sub_(float(_SIGN))
        return torch.lt(x.to(torch.float64), thr).view(prob.shape)
