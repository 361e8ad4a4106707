"""Defensive parsing of one safetensors header.

A safetensors file is `u64 little-endian N`, then N bytes of UTF-8 JSON, then the raw data.
We parse it ourselves rather than through `safe_open` because safetensors maps the whole file
privately and every touched page stays in RSS (see shared/DESIGN.md). Every field is checked
before it is trusted: the header is data from outside, and a bad value must end in a
`HeaderError` that names the file and the field, never another exception or a huge allocation.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.dtypes import DTYPES, itemsize
from engine.errors import HeaderError

# safetensors itself refuses headers over 100 MB; so do we, before allocating anything.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live. `offset` is absolute in `file`."""

    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        """Length of dim 0; a 0-D tensor is one row of one element."""
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        """Bytes per row (0 for an empty tensor)."""
        return self.nbytes // self.rows if self.rows else 0

    @property
    def row_numel(self) -> int:
        """Elements per row: a 1-D tensor has rows of one element."""
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1


@dataclass(frozen=True)
class Header:
    """A parsed header: tensors in data-offset order, the metadata, where data starts."""

    file: Path
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str]
    data_start: int


def read_header(path: Path) -> Header:
    """Parse and validate the header of the safetensors file at `path`.

    Raises:
        HeaderError: naming `path` and the bad field.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise HeaderError(f"{path}: file is {size} bytes, too short for a safetensors header (truncated?)")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise HeaderError(
                    f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit (not a safetensors file?)"
                )
            if 8 + n > size:
                raise HeaderError(f"{path}: header length {n} runs past the end of the {size}-byte file (truncated?)")
            raw = f.read(n)
    except OSError as e:
        raise HeaderError(f"{path}: cannot read: {e.strerror or e}") from None
    obj = _decode_json(path, raw)
    data_start = 8 + n
    return _validate(path, obj, data_start, size - data_start)


def _decode_json(path: Path, raw: bytes) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise HeaderError(f"{path}: header names {short_repr(k)} twice")
            out[k] = v
        return out

    try:
        text = raw.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=no_duplicates)
    except UnicodeDecodeError as e:
        raise HeaderError(f"{path}: header is not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise HeaderError(f"{path}: header is not valid JSON ({e.msg} at char {e.pos})") from None
    except HeaderError:
        raise
    except ValueError as e:  # e.g. an integer literal of thousands of digits
        raise HeaderError(f"{path}: header JSON has an unreadable value ({e})") from None
    except RecursionError:
        raise HeaderError(f"{path}: header JSON is nested too deeply") from None
    if not isinstance(obj, dict):
        raise HeaderError(f"{path}: header must be a JSON object, got {type(obj).__name__}")
    return obj


def _validate(path: Path, obj: dict[str, Any], data_start: int, data_len: int) -> Header:
    metadata = _metadata(path, obj.pop("__metadata__", None))
    infos = [_tensor(path, name, entry, data_start, data_len) for name, entry in obj.items()]
    infos.sort(key=lambda t: (t.offset, t.nbytes))
    for prev, cur in zip(infos, infos[1:]):
        if cur.offset < prev.offset + prev.nbytes:
            raise HeaderError(
                f"{path}: tensors {short_repr(prev.name)} and {short_repr(cur.name)} overlap "
                f"(data_offsets {prev.offset - data_start}..{prev.offset - data_start + prev.nbytes} "
                f"and {cur.offset - data_start}..)"
            )
    return Header(path, tuple(infos), metadata, data_start)


def _metadata(path: Path, meta: Any) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise HeaderError(f"{path}: __metadata__ must map strings to strings")
    return dict(meta)


def _is_int(v: Any) -> bool:
    """A JSON integer in u64 range (safetensors' own type), not a bool."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**64


def short_repr(v: Any) -> str:
    """repr() of a header value, cut short: it may be huge or unprintable (a 5000-digit int)."""
    try:
        text = repr(v)
    except ValueError:
        return "<an integer too large to print>"
    return text if len(text) <= 240 else text[:237] + "..."


def _tensor(path: Path, name: str, entry: Any, data_start: int, data_len: int) -> TensorInfo:
    where = f"{path}: tensor {short_repr(name)}"
    if not isinstance(entry, dict):
        raise HeaderError(f"{where}: entry must be an object with dtype, shape, data_offsets")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise HeaderError(f"{where}: unknown dtype {short_repr(dtype)} (known: {', '.join(DTYPES)})")
    shape = entry.get("shape")
    if not isinstance(shape, list) or len(shape) > 64 or not all(_is_int(d) for d in shape):
        raise HeaderError(f"{where}: shape {short_repr(shape)} must be a list of at most 64 non-negative integers")
    if math.prod(d for d in shape if d) >= 2**63:  # torch sizes are int64, even for empty tensors
        raise HeaderError(f"{where}: shape {short_repr(shape)} has more than 2**63 elements per slice")
    offsets = entry.get("data_offsets")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise HeaderError(f"{where}: data_offsets {short_repr(offsets)} must be two non-negative integers [begin, end]")
    begin, end = offsets
    if not begin <= end:
        raise HeaderError(f"{where}: data_offsets {offsets} must satisfy 0 <= begin <= end")
    if end > data_len:
        raise HeaderError(f"{where}: data_offsets {offsets} exceed the {data_len} data bytes in the file (truncated?)")
    nbytes = math.prod(shape) * itemsize(dtype)
    if end - begin != nbytes:
        needs = nbytes if nbytes < 2**64 else "more than 2**64"
        raise HeaderError(
            f"{where}: data_offsets {offsets} span {end - begin} bytes but shape {short_repr(shape)} x {dtype} needs {needs}"
        )
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, nbytes)
