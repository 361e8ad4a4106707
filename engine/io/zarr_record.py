"""Finalizing a zarr output, and `leanmerge verify` for one.

The record mirrors the safetensors one (engine.io.record, engine.verify): each array's
attributes get its tensor crc32 and the crc32 of each chunk's raw bytes (derived from the
journal's running crc32s, nothing re-read); the group's attributes get every tensor's crc32,
the sha256 of each array's metadata (`zarr.json`: names, dtypes, shapes, chunks, codecs) and of
every other file in the model folder (config, tokenizer, model card). `verify_zarr` re-reads
every chunk and names the first chunk that differs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from engine import __version__
from engine.errors import CheckpointError, OutputError
from engine.io.crc import crc32
from engine.io.journal import JOURNAL_NAME, JournalState
from engine.io.record import FILES_KEY, PIECE, file_sha256, fsync_files
from engine.io.url import store_fs
from engine.io.zarr_format import ATTRS, ZARR_DIR, chunk_crcs, chunk_exists, escape_name, zarr_module
from engine.io.zarr_writer import fsync_all, remove_partials
from engine.plan import Plan

ARRAYS_KEY = "array_sha256"


def is_zarr_folder(folder: Path) -> bool:
    """A model folder holding a zarr group (`model.zarr/zarr.json`)."""
    return (folder / ZARR_DIR / "zarr.json").is_file()


def finalize_zarr(
    tmp: Path, plan: Plan, state: JournalState, checksums: dict[str, str], root: str | None = None
) -> None:
    """Write the arrays' and the group's records (after the side files are in `tmp`), fsync'd;
    `root`: the group's store URL (engine.io.zarr_url), else `tmp/model.zarr`."""
    zarr = zarr_module()
    if root is None:
        remove_partials(tmp / ZARR_DIR)
    group = zarr.open_group(root or tmp / ZARR_DIR, mode="r+")
    for t in plan.tensors:
        arr = group[escape_name(t.name)]
        row_bytes = t.out_nbytes // t.rows if t.rows else 0
        chunks = chunk_crcs(_chain(state.blocks.get(t.name, [])), row_bytes)
        arr.update_attributes(
            {ATTRS: {**arr.attrs[ATTRS], "crc32": checksums[t.name], "chunk_crc32": [f"{c:08x}" for c in chunks]}}
        )
    arrays = {escape_name(t.name): _metadata_sha256(tmp, root, escape_name(t.name)) for t in plan.tensors}
    others = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name != JOURNAL_NAME)
    record = {
        "version": __version__,
        "spec_sha256": plan.spec.digest(),
        "tensor_crc32": checksums,
        ARRAYS_KEY: arrays,
        FILES_KEY: {f: file_sha256(tmp / f) for f in others},
    }
    group.update_attributes({ATTRS: {**group.attrs[ATTRS], **record}})
    fsync_files(tmp, others)
    if root is not None:  # a store's objects are durable once written
        return
    group_dir = tmp / ZARR_DIR
    fsync_all(
        [group_dir / "zarr.json", *(group_dir / k / "zarr.json" for k in arrays)],
        [group_dir, *(group_dir / k for k in arrays)],
    )


def _metadata_sha256(tmp: Path, root: str | None, key: str) -> str:
    """sha256 of array `key`'s `zarr.json`, in `tmp/model.zarr` or at the store URL `root`."""
    if root is None:
        return file_sha256(tmp / ZARR_DIR / key / "zarr.json")
    fs, path = store_fs(root, OutputError)
    return hashlib.sha256(fs.cat_file(f"{path}/{key}/zarr.json")).hexdigest()


def _chain(blocks: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """The journaled blocks that run contiguously from row 0 (a resumed tensor's records)."""
    out: list[tuple[int, int, int]] = []
    for b in sorted(blocks):
        if b[0] == (out[-1][1] if out else 0):
            out.append(b)
    return out


def is_zarr_model(folder: Path | str) -> bool:
    """A model folder (or a store URL, engine.io.url) holding a zarr group (`model.zarr/zarr.json`)."""
    if isinstance(folder, Path):
        return is_zarr_folder(folder)
    fs, path = store_fs(folder, CheckpointError)
    return bool(fs.isfile(f"{path}/{ZARR_DIR}/zarr.json"))


def zarr_record(folder: Path | str) -> tuple[Any, dict[str, Any]]:
    """The group in `folder` (a path, or a store URL) and its leanmerge record (empty when it has none)."""
    root = folder / ZARR_DIR if isinstance(folder, Path) else f"{folder}/{ZARR_DIR}"
    group = zarr_module().open_group(root, mode="r")
    record = group.attrs.get(ATTRS)
    return group, record if isinstance(record, dict) else {}


def check_zarr_record(folder: Path | str, record: dict[str, Any]) -> list[str]:
    """Problems from comparing the arrays' metadata and the folder's other files with the record
    (`folder`: a path, or a store URL)."""
    from fsspec.implementations.local import LocalFileSystem

    fs, root = (LocalFileSystem(), str(folder)) if isinstance(folder, Path) else store_fs(folder, CheckpointError)
    problems = []
    for key, want in sorted(record.get(ARRAYS_KEY, {}).items()):
        got = _sha256(fs, f"{root}/{ZARR_DIR}/{key}/zarr.json")
        if got is None:
            problems.append(f"{key}: array recorded by the merge is missing")
        elif got != want:
            problems.append(f"{key}: array metadata differs from the one written (dtype, shape, chunks or codecs)")
    for name, want in sorted(record.get(FILES_KEY, {}).items()):
        got = _sha256(fs, f"{root}/{name}")
        if got is None:
            problems.append(f"{name}: written by the merge but missing")
        elif got != want:
            problems.append(f"{name}: sha256 {got[:16]}... != recorded {str(want)[:16]}...; the file was edited")
    return problems


def _sha256(fs: Any, path: str) -> str | None:
    """sha256 of the file `path` in the fsspec filesystem `fs`, read in pieces; None where there is none."""
    if not fs.isfile(path):
        return None
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while piece := f.read(PIECE):
            h.update(piece)
    return h.hexdigest()


def check_array(arr: Any) -> tuple[str, int, int, list[str]]:
    """(tensor name, crc32, bytes, problems) of one array, re-read chunk by chunk against its
    recorded chunk crc32s; a missing chunk file is named as such."""
    attrs = arr.attrs.get(ATTRS, {})
    name = attrs.get("name", arr.basename)
    want = attrs.get("chunk_crc32", [])
    problems: list[str] = []
    crc, nbytes = 0, 0
    step = arr.chunks[0] if arr.ndim else 1
    n = -(-arr.shape[0] // step) if arr.ndim else 1
    if arr.size == 0:
        n = 0
    for c in range(n):
        if not chunk_exists(arr, c):
            problems.append(f"{name}: chunk {c} is missing")
            continue
        try:
            data = arr[...] if arr.ndim == 0 else arr[c * step : (c + 1) * step]
        except Exception as e:  # a damaged compressed chunk
            problems.append(f"{name}: chunk {c} cannot be decoded ({type(e).__name__})")
            continue
        raw = data.tobytes()
        crc, nbytes = crc32(raw, crc), nbytes + len(raw)
        if c < len(want) and f"{crc32(raw):08x}" != want[c]:
            problems.append(f"{name}: chunk {c} crc32 {crc32(raw):08x} != recorded {want[c]}")
    return name, crc, nbytes, problems
