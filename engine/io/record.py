"""The folder record: what `leanmerge verify` checks besides tensor bytes.

Tensor crc32s alone pass a header edited in place (a dtype F16 -> I16 or a transposed shape
keeps every byte of data) and a deleted or edited config or tokenizer. So the index also records
the sha256 of each shard's header bytes (names, dtypes, shapes and offsets) and of every other
file the merge wrote or copied into the folder. The index cannot record itself: an edit that
removes a shard together with all of its records goes unseen, but one that misses any of them
(the weight map, the tensor crc32s, the header record) fails.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from engine.io.header import MAX_HEADER_BYTES

SHARDS_KEY = "shard_header_sha256"
FILES_KEY = "file_sha256"
RECORD_KEYS = (SHARDS_KEY, FILES_KEY)
PIECE = 1 << 20


def folder_record(folder: Path, shards: Iterable[str], skip: Iterable[str]) -> dict[str, dict[str, str]]:
    """sha256 of each shard's header and of every other file in `folder` but those in `skip`."""
    shards = sorted(shards)
    others = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in {*shards, *skip})
    return {
        SHARDS_KEY: {s: header_sha256(folder / s) for s in shards},
        FILES_KEY: {f: file_sha256(folder / f) for f in others},
    }


def read_header(f: BinaryIO) -> bytes:
    """A safetensors file's 8-byte length and the header it announces, from the start of `f`
    (at most `MAX_HEADER_BYTES` of header; what there is when the file is shorter: never raises
    on a truncated or edited file, whose hash then simply differs).

    The one reader of header bytes for hashing: `header_sha256` (this folder record, checked by
    `leanmerge verify`) hashes all of it, and the input fingerprint (engine.io.fingerprint, in
    resume journals) hashes it without the 8-byte length.
    """
    head = f.read(8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
    return head + f.read(min(n, MAX_HEADER_BYTES))


def header_sha256(path: Path) -> str:
    """sha256 of a safetensors file's 8-byte length and header (all of it when shorter)."""
    with open(path, "rb") as f:
        return hashlib.sha256(read_header(f)).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(PIECE):
            h.update(chunk)
    return h.hexdigest()


def check_record(folder: Path, record: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(problems, notes) from comparing `folder` with its record; a folder written before the
    record existed gets a note, not a failure."""
    shards, files = record.get(SHARDS_KEY), record.get(FILES_KEY)
    if not isinstance(shards, dict) or not isinstance(files, dict):
        return [], [
            f"{folder}: written by a leanmerge that recorded only tensor checksums; "
            "shard headers and other files (config, tokenizer) are not checked"
        ]
    problems = []
    for name, want in sorted(shards.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: shard recorded by the merge is missing")
        elif header_sha256(path) != want:
            problems.append(f"{name}: header differs from the one written (tensor names, dtypes, shapes or offsets)")
    for name, want in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: written by the merge but missing")
        elif (got := file_sha256(path)) != want:
            problems.append(f"{name}: sha256 {got[:16]}... != recorded {str(want)[:16]}...; the file was edited")
    return problems, []


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (names created, renamed or removed in it) durable; a symlink is
    refused (ELOOP): only folders this process made are synced."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_files(folder: Path, names: Iterable[str]) -> None:
    """Make each file durable: the folder is renamed into place only after its files are."""
    for name in names:
        fd = os.open(folder / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
