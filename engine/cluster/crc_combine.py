"""crc32 of two byte strings joined, from the crc32 of each and the second one's length.

Workers write bands of a tensor in any order and each returns the crc32 of its band; the driver
chains them, in row order, into the running crc32 the journal records (`engine.io.journal`)
without reading the bytes again. This is zlib's `crc32_combine` (not exposed by Python's zlib):
appending n zero bytes is a linear map on the crc register, applied as squarings of the one-bit
map over GF(2), O(log n) 32x32 bit-matrix products.
"""

from __future__ import annotations

import functools

POLY = 0xEDB88320  # reflected CRC-32 polynomial (zlib's)


def _times(mat: tuple[int, ...], vec: int) -> int:
    """The GF(2) matrix `mat` (32 column words) times the 32-bit vector `vec`."""
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _square(mat: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_times(mat, mat[n]) for n in range(32))


@functools.cache
def _zeros_op(bit: int) -> tuple[int, ...]:
    """The operator that appends 2**bit zero bytes to the crc register."""
    if bit == 0:  # one zero bit: the register shifted, the polynomial folded in; then to 8 bits
        one = (POLY, *(1 << (n - 1) for n in range(1, 32)))
        return _square(_square(_square(one)))
    return _square(_zeros_op(bit - 1))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """crc32(a + b) from crc1 = crc32(a), crc2 = crc32(b) and len2 = len(b).

    Example:
        >>> import zlib
        >>> crc32_combine(zlib.crc32(b"lean"), zlib.crc32(b"merge"), 5) == zlib.crc32(b"leanmerge")
        True
    """
    bit = 0
    while len2:
        if len2 & 1:
            crc1 = _times(_zeros_op(bit), crc1)
        len2 >>= 1
        bit += 1
    return crc1 ^ crc2
