"""Zarr models at fsspec URLs (`memory://`, `s3://` with s3fs installed, any fsspec protocol):
`leanmerge convert SRC URL --to zarr`.

Object storage has no rename, so the local rule (a temporary folder renamed when complete) becomes
a marker: the group is created with `attributes.leanmerge.writing`, and only the finished group
gets its record (tensor and chunk crc32s) in its place. A URL that holds anything else is never
written; one that holds an unfinished group of ours is written again from the start (so a killed
conversion is safely re-run). `file://` URLs are plain paths and take the local route.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec
import numpy as np
import torch

from engine import __version__
from engine.dtypes import byte_view, itemsize
from engine.errors import OutputError
from engine.io.checkpoint import open_checkpoint
from engine.io.crc import crc32
from engine.io.lora import open_reader
from engine.io.output import SIDE_FILES
from engine.io.zarr_format import (
    ATTRS,
    STORED,
    ZARR_DIR,
    Compression,
    chunk_rows_for,
    chunk_shape,
    escape_name,
    zarr_module,
)
from engine.io.zarr_writer import write_block


def is_url(text: str | Path) -> bool:
    """A fsspec URL other than `file://` (those are local paths: `local_path`)."""
    return "://" in str(text) and not str(text).startswith("file://")


def local_path(text: str | Path) -> Path:
    """`file:///abs/path` as a path; anything else unchanged."""
    s = str(text)
    return Path(urlparse(s).path) if s.startswith("file://") else Path(s)


def convert_to_url(src: Path, url: str, compression: Compression) -> int:
    """Write the model folder `src` as a zarr model at `url`; returns the tensors written.

    Raises:
        OutputError: `url` holds something this tool did not leave unfinished.
    """
    zarr = zarr_module()
    ckpt = open_checkpoint(src)
    base = url.rstrip("/")
    group = _open_fresh(zarr, base)
    sums: dict[str, str] = {}
    with open_reader(ckpt) as reader:
        for name, info in ckpt.tensors.items():
            rows = min(chunk_rows_for(info.rows, info.row_bytes), max(info.rows, 1))
            arr = group.create_array(
                escape_name(name),
                shape=info.shape,
                chunks=chunk_shape(info.shape, rows),
                dtype=STORED[info.dtype],
                compressors=compression.codecs(itemsize(info.dtype)),
                fill_value=0,
                attributes={ATTRS: {"name": name, "dtype": info.dtype, "shape": list(info.shape)}},
                config={"write_empty_chunks": True},
            )
            crc, chunks = _copy_tensor(reader, group, info, rows)
            sums[name] = f"{crc:08x}"
            arr.update_attributes({ATTRS: {**arr.attrs[ATTRS], "crc32": sums[name], "chunk_crc32": chunks}})
    _copy_side_files(src, base)
    group.update_attributes({ATTRS: {"version": __version__, "source": str(src), "tensor_crc32": sums}})
    return len(sums)


def _copy_tensor(reader: Any, group: Any, info: Any, rows: int) -> tuple[int, list[str]]:
    """Every chunk of one tensor read from `reader` and written; (crc32, chunk crc32s)."""
    buf = torch.empty(rows * info.row_bytes, dtype=torch.uint8)
    crc, chunks = 0, []
    for r0 in range(0, info.rows if info.numel else 0, rows):
        r1 = min(r0 + rows, info.rows)
        raw = byte_view(reader.read_rows(info.name, r0, r1, buf).reshape(-1).view(torch.uint8))
        crc, piece = crc32(raw, crc), crc32(raw)
        chunks.append(f"{piece:08x}")
        data = np.frombuffer(raw, dtype=STORED[info.dtype]).reshape(-1, *info.shape[1:])
        write_block(group, escape_name(info.name), r0, data)
    return crc, chunks


def _open_fresh(zarr: Any, base: str) -> Any:
    """The group at `base/model.zarr`, created where `base` is empty or holds our unfinished one."""
    fs, path = fsspec.core.url_to_fs(base)
    if fs.exists(path) and fs.ls(path):
        root = f"{base}/{ZARR_DIR}"
        try:
            attrs = zarr.open_group(root, mode="r").attrs.get(ATTRS)
        except Exception:
            attrs = None
        if not (isinstance(attrs, dict) and attrs.get("writing")):
            raise OutputError(
                f"{base}: already holds data; leanmerge writes only to an empty location (choose another)"
            )
    return zarr.open_group(f"{base}/{ZARR_DIR}", mode="w", zarr_format=3, attributes={ATTRS: {"writing": True}})


def _copy_side_files(src: Path, base: str) -> None:
    for name in SIDE_FILES:
        if (src / name).is_file():
            with fsspec.open(f"{base}/{name}", "wb") as f:
                f.write((src / name).read_bytes())
