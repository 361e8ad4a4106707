"""`leanmerge verify`: re-read a merged folder and check every tensor against its recorded crc32,
each shard header and every other file the merge wrote against their recorded sha256 (see
`engine.io.record`), and, given the spec, that the folder is complete for it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.dtypes import byte_view
from engine.errors import CheckpointError
from engine.io.checkpoint import INDEX_NAME, Reader, open_checkpoint
from engine.io.crc import crc32
from engine.io.record import FILES_KEY, RECORD_KEYS, check_record
from engine.io.url import local_path, store_url
from engine.io.zarr_format import ZARR_DIR
from engine.io.zarr_reader import first_line
from engine.io.zarr_record import (
    ARRAYS_KEY,
    check_array,
    check_zarr_record,
    is_zarr_folder,
    is_zarr_model,
    zarr_record,
)
from engine.spec import MergeSpec

PIECE = 16 << 20  # bytes read at a time: verify runs in bounded memory too


@dataclass
class VerifyResult:
    tensors: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: int = 0  # shard headers and other files checked against their recorded sha256

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(folder: Path | str, against: MergeSpec | None = None) -> VerifyResult:
    """Check `folder`'s tensors against the checksums in its index (and `against`, if given).
    `folder` may be a store URL (engine.io.url; `file://` is a local path) of a zarr model.

    Raises:
        CheckpointError: the folder is not a readable model folder or has no leanmerge record.
    """
    url = store_url(folder)
    if url is not None:
        if not is_zarr_model(url):
            raise CheckpointError(
                f"{url}: no zarr model at this URL ({ZARR_DIR}/zarr.json is missing); "
                "verify reads safetensors folders from local paths only"
            )
        return _verify_zarr(url, against)
    folder = local_path(folder)
    if is_zarr_folder(folder):
        return _verify_zarr(folder, against)
    record = _record(folder)
    result = VerifyResult()
    result.problems, result.notes = check_record(folder, record)
    result.files = sum(len(v) for k, v in record.items() if k in RECORD_KEYS and isinstance(v, dict))
    try:
        ckpt = open_checkpoint(folder)
    except CheckpointError as e:
        if not result.problems:
            raise
        result.problems.append(str(e))  # an edited header may not even parse: say what changed first
        return result
    sums: dict[str, str] = record.get("tensor_crc32", {})
    buf = torch.empty(PIECE, dtype=torch.uint8)
    with Reader(ckpt) as reader:
        for name, info in ckpt.tensors.items():
            crc = 0
            for pos in range(0, info.nbytes, PIECE):
                piece = buf[: min(PIECE, info.nbytes - pos)]
                reader.read_bytes(info, pos, piece)
                crc = crc32(byte_view(piece), crc)
            result.tensors += 1
            result.bytes += info.nbytes
            if name not in sums:
                result.problems.append(f"{name}: no checksum recorded")
            elif f"{crc:08x}" != sums[name]:
                result.problems.append(f"{name}: crc32 {crc:08x} != recorded {sums[name]}")
    result.problems += [f"{n}: recorded but missing from the shards" for n in sums if n not in ckpt.tensors]
    if against is not None:
        result.problems += _against(ckpt.tensors.keys(), record, against)
    return result


def _verify_zarr(folder: Path | str, against: MergeSpec | None) -> VerifyResult:
    """`verify` for a zarr output (in a folder or at a store URL): every chunk against its crc32,
    each tensor against the group's record, each array's metadata and other file against their sha256."""
    try:
        group, record = zarr_record(folder)
    except Exception as e:  # zarr raises JSON, key and value errors for damaged metadata
        raise CheckpointError(f"{folder}/{ZARR_DIR}: cannot read the zarr metadata: {first_line(e)}") from None
    if not record.get("tensor_crc32"):
        raise CheckpointError(f"{folder}: the zarr group has no leanmerge record; was this folder made by leanmerge?")
    result = VerifyResult(problems=check_zarr_record(folder, record))
    result.files = len(record.get(ARRAYS_KEY, {})) + len(record.get(FILES_KEY, {}))
    sums: dict[str, str] = record["tensor_crc32"]
    names = []
    for _, arr in sorted(group.arrays(), key=lambda kv: str(kv[0])):
        name, crc, nbytes, problems = check_array(arr)
        names.append(name)
        result.tensors, result.bytes = result.tensors + 1, result.bytes + nbytes
        result.problems += problems
        if name not in sums:
            result.problems.append(f"{name}: no checksum recorded")
        elif not problems and f"{crc:08x}" != sums[name]:
            result.problems.append(f"{name}: crc32 {crc:08x} != recorded {sums[name]}")
    result.problems += [f"{n}: recorded but missing from the group" for n in sums if n not in names]
    if against is not None:
        result.problems += _against(names, record, against)
    return result


def _record(folder: Path) -> dict[str, Any]:
    try:
        index = json.loads((folder / INDEX_NAME).read_text())
        record = index["metadata"]["leanmerge"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(
            f"{folder / INDEX_NAME}: no metadata.leanmerge record; was this folder made by leanmerge?"
        ) from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{folder / INDEX_NAME}: metadata.leanmerge must be an object")
    return record


def _against(names: Any, record: dict[str, Any], spec: MergeSpec) -> list[str]:
    problems = []
    if record.get("spec_sha256") != spec.digest():
        problems.append("spec: the folder was merged from a different spec (method, models, parameters or seed differ)")
    base = open_checkpoint(spec.base)
    missing = [n for n in base.tensors if n not in set(names)]
    if missing:
        problems.append(f"incomplete: {len(missing)} tensor(s) of the base are missing, e.g. {missing[:3]}")
    return problems
