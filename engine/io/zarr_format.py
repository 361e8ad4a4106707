"""How a model is laid out as a zarr (format 3) group, shared by the writer, the reader and `convert`.

A model folder in this format holds `model.zarr/` (one group) beside its config and tokenizer
files. The group holds one array per tensor, chunked along dim 0 in bands of whole rows (a
merge's row blocks), each chunk compressed on its own (`--compress`). Every array's attributes
say what the raw bytes are: `leanmerge.dtype` (the safetensors name: bfloat16 is stored as its
raw 16 bits in a uint16 array, fp8 as uint8), `shape`, the tensor's `name` and, once complete,
the crc32 of each chunk's raw bytes. The group's attributes hold the folder record `verify`
checks (engine.io.zarr_record).

Tensor names become array names by percent-encoding every byte outside `[A-Za-z0-9._-]` (and a
leading `__`, `.` or `..`, which zarr reserves), so `unescape_name(escape_name(n)) == n` for
every name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from engine.errors import OutputError, SpecError

ZARR_DIR = "model.zarr"
ATTRS = "leanmerge"  # the attributes key, on the group and on each array
SAFE = "._-"  # besides ASCII letters and digits: kept as is in array names

# safetensors dtype -> the numpy dtype its raw bytes are stored as (little-endian).
STORED: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "uint16",  # raw bits: zarr has no bfloat16, and this keeps every bit (NaN payloads too)
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "F8_E4M3": "uint8",
    "F8_E5M2": "uint8",
}


def escape_name(name: str) -> str:
    """The zarr array name of tensor `name` (reversible; see the module docstring)."""
    key = quote(name, safe=SAFE)
    if key.startswith("__"):
        key = "%5F" + key[1:]
    if key in ("", ".", ".."):
        key = key.replace(".", "%2E") or "%00empty"
    return key


def unescape_name(key: str) -> str:
    """The tensor name of zarr array `key`."""
    return "" if key == "%00empty" else unquote(key, errors="strict")


@dataclass(frozen=True)
class Compression:
    """A `--compress` choice: `none`, `zstd[:LEVEL]` (LEVEL 1..22, default 3) or `blosc`
    (zstd inside blosc with byte shuffle: floats' exponent bytes side by side compress better)."""

    kind: str = "none"
    level: int = 3

    def __post_init__(self) -> None:
        if self.kind not in ("none", "zstd", "blosc"):
            raise SpecError(f"--compress {self.kind!r}: choose none, zstd[:LEVEL] or blosc")
        if not 1 <= self.level <= 22:
            raise SpecError(f"--compress {self.kind}:{self.level}: the zstd level must be 1..22")

    @classmethod
    def parse(cls, text: str | None) -> Compression:
        """`none`, `zstd`, `zstd:LEVEL` or `blosc`."""
        kind, _, level = (text or "none").strip().lower().partition(":")
        if level and kind != "zstd":
            raise SpecError(f"--compress {text!r}: only zstd takes a level (zstd:LEVEL)")
        if level and not level.isdigit():
            raise SpecError(f"--compress {text!r}: the zstd level must be a whole number 1..22")
        return cls(kind, int(level) if level else 3)

    def codecs(self, itemsize: int) -> Any:
        """zarr's `compressors` argument (None: chunks stored raw)."""
        from zarr.codecs import BloscCodec, ZstdCodec

        if self.kind == "zstd":
            return [ZstdCodec(level=self.level)]
        if self.kind == "blosc":
            return [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=itemsize)]
        return None

    def __str__(self) -> str:
        return f"zstd:{self.level}" if self.kind == "zstd" else self.kind


# Largest chunk (raw bytes, unless one row is larger). zarr allocates fresh buffers for every chunk
# it encodes; at 32 MiB glibc serves each from a new mapping (its mmap threshold tops out there), so
# every chunk paid page faults: writing 1.2 GB as 32 MiB chunks ran at 0.11 GB/s, as 8 MiB chunks at
# 0.96 GB/s (2-core VM under load; pwrite into a preallocated file 0.88 GB/s).
MAX_CHUNK_BYTES = 8 << 20


def chunk_rows_for(block_rows: int, row_bytes: int = 0) -> int:
    """Rows per chunk for a planned block of `block_rows` rows of `row_bytes`: the largest power of
    two not above it (nor above `MAX_CHUNK_BYTES`), so a resumed run whose budget moved a little
    plans the same chunks."""
    rows = min(block_rows, MAX_CHUNK_BYTES // row_bytes) if row_bytes else block_rows
    return 1 << (max(rows, 1).bit_length() - 1)


def chunk_shape(shape: tuple[int, ...], rows: int) -> tuple[int, ...]:
    """Chunks of `rows` whole rows (a 0-D tensor is one chunk; zarr wants every side >= 1)."""
    return (rows, *(max(d, 1) for d in shape[1:])) if shape else ()


# crc32 of one chunk from the running crc32s the journal records (before and after it): zlib's
# crc32_combine, inverted. crc(A + B) = x^(8|B|) * crc(A) ^ crc(B) (mod the crc polynomial).
_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _x8nmodp(n: int) -> int:
    """x^(8n) modulo the crc polynomial (reflected, as zlib keeps it: x^0 is bit 31)."""
    p, square = 1 << 31, 1 << 30  # x^0, x^1
    for _ in range(3):
        square = _multmodp(square, square)  # x^8 after three squarings
    while n:
        if n & 1:
            p = _multmodp(square, p)
        n >>= 1
        square = _multmodp(square, square)
    return p


def piece_crc(before: int, after: int, nbytes: int) -> int:
    """crc32 of the `nbytes` bytes that took a running crc32 from `before` to `after`."""
    return after ^ _multmodp(_x8nmodp(nbytes), before)


def chunk_crcs(blocks: list[tuple[int, int, int]], row_bytes: int) -> list[int]:
    """Each chunk's crc32 from a tensor's journaled blocks `(r0, r1, running crc)`, in row order."""
    out, before = [], 0
    for r0, r1, after in sorted(blocks):
        out.append(piece_crc(before, after, (r1 - r0) * row_bytes))
        before = after
    return out


def zarr_module() -> Any:
    """The zarr package, imported on first use (only zarr inputs and outputs need it)."""
    try:
        import zarr
    except ImportError:  # zarr 3 needs Python 3.11 or newer
        raise OutputError(
            "--format zarr needs the zarr package (3.x, Python >= 3.11): pip install 'zarr>=3.1'"
        ) from None
    return zarr


def chunk_exists(arr: Any, c: int) -> bool:
    """Whether chunk `c` (along dim 0) of `arr` is stored: zarr reads a missing one as zeros."""
    from zarr.core.sync import sync

    coords = (c, *([0] * (arr.ndim - 1))) if arr.ndim else ()
    key = f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}" if arr.path else arr.metadata.encode_chunk_key(coords)
    return bool(sync(arr.store.exists(key)))
