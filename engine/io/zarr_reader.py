"""Zarr inputs: a model folder holding `model.zarr/` (the layout of engine.io.zarr_format) read as
row blocks through the same interface as safetensors shards.

`open_zarr` indexes the group from its metadata alone (every array's attributes checked against
its zarr shape and dtype: a damaged input is one error naming the array and field). `ZarrReader`
serves `read_rows` one chunk at a time, keeping only the last decoded chunk (the bound on what a
zarr input adds to RSS: one chunk per input stream); each chunk is checked to exist (zarr reads
a missing chunk as zeros, silently) and against its recorded crc32.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.dtypes import DTYPES, byte_view, itemsize
from engine.errors import CheckpointError
from engine.io.checkpoint import Checkpoint
from engine.io.crc import crc32
from engine.io.header import TensorInfo, short_repr
from engine.io.record import file_sha256
from engine.io.url import shown, store_fs
from engine.io.zarr_format import ATTRS, STORED, ZARR_DIR, chunk_exists, unescape_name, zarr_module

CHUNK_COPIES = 3


@dataclass(frozen=True)
class ZarrCheckpoint(Checkpoint):
    """A zarr model folder; `TensorInfo.file` is each array's folder, `offset` 0."""

    arrays: dict[str, Any] = field(kw_only=True, repr=False)  # tensor name -> zarr Array
    url: str | None = field(default=None, kw_only=True)  # the store URL of a model not on a local path


def open_zarr(folder: Path, url: str | None = None) -> ZarrCheckpoint:
    """Index the zarr group in `folder` (or at the store `url`) from its metadata.

    Raises:
        CheckpointError: no group there, unreadable metadata, or attributes that disagree with an array.
    """
    root: Path | str = folder / ZARR_DIR
    if url is not None:
        root = f"{url}/{ZARR_DIR}"
        fs, path = store_fs(root, CheckpointError)
        if not fs.exists(f"{path}/zarr.json"):
            raise CheckpointError(f"{url}: no zarr model at this URL ({ZARR_DIR}/zarr.json is missing)")
    try:
        group = zarr_module().open_group(root, mode="r")
        items = sorted(group.arrays(), key=lambda kv: str(kv[0]))
    except Exception as e:  # zarr raises JSON, key and value errors for damaged metadata
        raise CheckpointError(f"{shown(root)}: cannot read the zarr metadata: {first_line(e)}") from None
    tensors, arrays = {}, {}
    for key, arr in items:
        info = _tensor_info(Path(root), str(key), arr)
        tensors[info.name], arrays[info.name] = info, arr
    record = group.attrs.get(ATTRS)
    order = record.get("tensor_crc32") if isinstance(record, dict) else None
    if isinstance(order, dict) and set(order) == set(tensors):  # the order it was written in
        tensors = {n: tensors[n] for n in order}
    return ZarrCheckpoint(folder, tensors, tuple(t.file for t in tensors.values()), arrays=arrays, url=url)


def _tensor_info(root: Path, key: str, arr: Any) -> TensorInfo:
    where = f"{shown(root / key)}/zarr.json"
    attrs = arr.attrs.get(ATTRS)
    if not isinstance(attrs, dict):
        raise CheckpointError(f"{where}: no attributes.{ATTRS} (dtype, shape, name): not a leanmerge zarr model")
    dtype, shape, name = attrs.get("dtype"), attrs.get("shape"), attrs.get("name", unescape_name(key))
    if dtype not in STORED or str(arr.dtype) != STORED[dtype]:
        raise CheckpointError(
            f"{where}: attributes.{ATTRS}.dtype {short_repr(dtype)} does not fit data_type {arr.dtype}"
        )
    if not isinstance(shape, list) or tuple(shape) != tuple(arr.shape):
        raise CheckpointError(
            f"{where}: attributes.{ATTRS}.shape {short_repr(shape)} != the array's shape {list(arr.shape)}"
        )
    if not isinstance(name, str):
        raise CheckpointError(f"{where}: attributes.{ATTRS}.name must be the tensor's name, got {short_repr(name)}")
    if arr.ndim and arr.chunks[1:] != tuple(max(d, 1) for d in arr.shape[1:]):
        raise CheckpointError(
            f"{where}: chunks {list(arr.chunks)} are not bands of whole rows; convert it with leanmerge"
        )
    return TensorInfo(name, dtype, tuple(shape), root / key, 0, int(np.prod(shape)) * itemsize(dtype))


class ZarrReader:
    """`read_rows` from a `ZarrCheckpoint`, chunk by chunk, keeping the last decoded chunk."""

    def __init__(self, ckpt: ZarrCheckpoint) -> None:
        self.ckpt = ckpt
        self._last: tuple[str, int, memoryview] | None = None

    def read_rows(self, name: str, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows `[r0, r1)` of `name` as a `(r1 - r0, row_numel)` tensor of its dtype (see `Reader`)."""
        info = self.ckpt.tensors[name]
        row_bytes = info.row_bytes
        nbytes = (r1 - r0) * row_bytes
        buf = (out if out is not None else torch.empty(nbytes, dtype=torch.uint8)).view(-1)[:nbytes]
        dest = byte_view(buf)
        arr = self.ckpt.arrays[name]
        step = arr.chunks[0] if arr.ndim else 1
        pos = r0
        while pos < r1:
            c = pos // step
            chunk = self._chunk(info, arr, c, step)
            take = min(r1, (c + 1) * step) - pos
            src = (pos - c * step) * row_bytes
            dest[(pos - r0) * row_bytes : (pos - r0 + take) * row_bytes] = chunk[src : src + take * row_bytes]
            pos += take
        return buf.view(DTYPES[info.dtype]).view(r1 - r0, info.row_numel)

    def _chunk(self, info: TensorInfo, arr: Any, c: int, step: int) -> memoryview:
        if self._last is not None and self._last[:2] == (info.name, c):
            return self._last[2]
        where = f"{shown(info.file)}: chunk {c} of tensor {short_repr(info.name)}"
        if not chunk_exists(arr, c):
            raise CheckpointError(f"{where} is missing (zarr would read it as zeros); restore the file")
        try:
            decoded = np.ascontiguousarray(arr[...] if arr.ndim == 0 else arr[c * step : (c + 1) * step])
            data = decoded.reshape(-1).view(np.uint8).data
        except Exception as e:  # a damaged compressed chunk
            raise CheckpointError(f"{where} cannot be decoded: {first_line(e)}") from None
        want = arr.attrs[ATTRS].get("chunk_crc32")
        if isinstance(want, list) and c < len(want) and f"{crc32(data):08x}" != want[c]:
            raise CheckpointError(f"{where}: crc32 {crc32(data):08x} != recorded {want[c]}; the file is damaged")
        self._last = (info.name, c, data)
        return data

    def advise_rows(self, name: str, r0: int, r1: int) -> None:
        """No read-ahead hint for chunk stores."""

    def close(self) -> None:
        self._last = None

    def __enter__(self) -> ZarrReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def zarr_cache_bytes(ckpts: Sequence[Checkpoint]) -> int:
    """RSS a merge's zarr inputs take beyond the block buffers: per zarr stream, `CHUNK_COPIES`
    of its largest chunk (the compressed bytes, the decoded chunk, the one kept for the next block)."""
    total = 0
    for c in ckpts:
        if isinstance(c, ZarrCheckpoint):
            total += CHUNK_COPIES * max((_chunk_nbytes(c.tensors[n], a) for n, a in c.arrays.items()), default=0)
    return total


def _chunk_nbytes(info: TensorInfo, arr: Any) -> int:
    return (arr.chunks[0] if arr.ndim else 1) * info.row_bytes


def zarr_fingerprint(ckpt: ZarrCheckpoint) -> list[dict[str, Any]]:
    """Per array: the sha256 of its metadata and of its first, middle and last chunk files, and
    the newest mtime of its chunk folder (engine.io.fingerprint's role for safetensors shards);
    a model at a store URL: `_store_fingerprint`."""
    if ckpt.url is not None:
        return _store_fingerprint(ckpt, ckpt.url)
    out = []
    for name, info in ckpt.tensors.items():
        chunks = sorted(p for p in (info.file / "c").rglob("*") if p.is_file()) if (info.file / "c").exists() else []
        picks = sorted({0, len(chunks) // 2, len(chunks) - 1}) if chunks else []
        h = hashlib.sha256(b"".join(chunks[i].read_bytes() for i in picks))
        mtime = max((os.stat(p).st_mtime_ns for p in chunks), default=0)
        out.append(
            {
                "file": str(info.file),
                "size": sum(os.stat(p).st_size for p in chunks),
                "mtime_ns": mtime,
                "header_sha256": file_sha256(info.file / "zarr.json"),
                "samples": {name: h.hexdigest()[:8]},
                "chunks": len(chunks),
            }
        )
    return out


def _store_fingerprint(ckpt: ZarrCheckpoint, url: str) -> list[dict[str, Any]]:
    """Per array at a store URL: the sha256 of its metadata object (shape, dtype, codecs and the
    leanmerge attributes with every chunk's crc32, which the reader checks each chunk it decodes
    against), the count and total size of its chunk objects, and the sha256 of its first, middle
    and last chunk objects. Stores keep no comparable mtime, so a chunk rewritten in place with
    the same size and its metadata untouched is caught by the crc32 check when read, not here."""
    fs, root = store_fs(f"{url}/{ZARR_DIR}", CheckpointError)
    out = []
    for name, info in ckpt.tensors.items():
        key = info.file.name
        found = fs.find(f"{root}/{key}/c", detail=True)
        chunks = sorted(found)
        picks = sorted({0, len(chunks) // 2, len(chunks) - 1}) if chunks else []
        h = hashlib.sha256(b"".join(fs.cat_file(chunks[i]) for i in picks))
        out.append(
            {
                "file": f"{url}/{ZARR_DIR}/{key}",
                "size": sum(int(found[p].get("size") or fs.size(p)) for p in chunks),
                "header_sha256": hashlib.sha256(fs.cat_file(f"{root}/{key}/zarr.json")).hexdigest(),
                "samples": {name: h.hexdigest()[:8]},
                "chunks": len(chunks),
            }
        )
    return out


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
