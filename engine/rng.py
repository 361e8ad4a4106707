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

The hash itself, why it looks the way it does and what it costs: `engine.rng_hash`.

No global state: nothing here touches torch's global generator and there are no module-level
caches; each call builds its few constants and its scratch.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import torch

from engine.rng_hash import MAX_INDEX, SIGN, TWO32, Hasher, sub_block, sub_block_size

__all__ = ["KeyedRng", "keep_threshold", "stream_key"]

_PERSON = b"leanmerge.rng.1"  # BLAKE2b personalisation: domain-separates these keys


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
    return min(max(round(d * TWO32), 0), TWO32)


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
    return (thr >> 16) ^ 0x8000, thr - SIGN


def _check_range(start: int, n: int) -> None:
    """Reject index ranges that are not valid int64 flat indices."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if start < 0 or start + n > MAX_INDEX:
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
        h = Hasher(self.key, start, n, dev, [SIGN])
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
        if n == 0 or thr in (0, TWO32):
            return mask.fill_(thr != 0)
        work, scratch = self._work(n, dev, None if out is None else out.view(-1))
        # The last xorshift is folded into one xor with a constant (exact, see _keep_constants).
        h = Hasher(self.key, start, n, dev, _keep_constants(thr))
        fold, sthr = h.extra
        # Comparing into a uint8 view (0/1 are valid bools) is ~2.5x faster on CPU than into bool.
        mask_u8 = mask if as_float else mask.view(torch.uint8)
        for p, q, y in h.blocks(sub_block(work), scratch, last_xorshift=False):
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
        h = Hasher(self.key, start, n, dev, [8])
        (s8,) = h.extra
        for p, q, x in h.blocks(sub_block(work), scratch):
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
        for p, q, x in Hasher(self.key, start, n, dev).blocks(sub_block(work), scratch):
            thr = torch.round(flat[p:q].to(torch.float64) * float(TWO32)).sub_(float(SIGN))
            torch.lt(x, thr, out=mask[p:q])  # int32 vs float64 compares in float64: exact
        return mask.view(prob.shape)
