"""Input fingerprints: what a resumed or finishing merge checks so that it never mixes two inputs.

Two fine-tunes of one architecture saved by the same tool have byte-identical headers, so a
fingerprint of names, sizes and headers cannot tell them apart. Each shard's fingerprint
therefore also holds its modification time and, per tensor, a crc32 of sampled bytes: the first,
middle and last `SAMPLE` bytes of its data. Another fine-tune differs in every trained tensor
(so in those samples); an edit in place changes the mtime.

Why samples rather than a checksum of everything read: a resumed run must compare against the
inputs the *finished* tensors were made from, and only a re-read of all of them (the cost of the
merge's reads again) could check those fully. Three page reads per tensor cost milliseconds
(see `bench/fingerprint_cost.py`), and the same fingerprint taken again at finalize catches an
input that changed while the merge was reading it, before anything is renamed into place. What
it cannot see: an edit that keeps size and mtime and spares the sampled pages.

The header bytes are read by the same function as the output's folder record
(`engine.io.record.read_header`); the two stored hashes differ on purpose and must stay as they
are, because each is compared with hashes written by earlier runs: a resume journal's
`header_sha256` is of the header without its 8-byte length (the form journals have always held),
an output index's `shard_header_sha256` (what `leanmerge verify` checks) of the length and header.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from engine.io.checkpoint import Checkpoint
from engine.io.crc import crc32
from engine.io.header import TensorInfo
from engine.io.lora import ADAPTER_CONFIG, LoraCheckpoint
from engine.io.record import read_header
from engine.io.torch_bin import directory_bytes
from engine.io.zarr_reader import ZarrCheckpoint, zarr_fingerprint

SAMPLE = 4096  # bytes per sampled piece: one page, one read


def fingerprint(ckpt: Checkpoint) -> list[dict[str, Any]]:
    """Per shard: name, size, mtime, sha256 of the header bytes and each tensor's sample crc32.

    A `.bin` shard's "header" is its zip directory (engine.io.torch_bin.directory_bytes).

    A LoRA adapter's config is fingerprinted by the values read from it: `lora_alpha`, `r` and
    the rest decide every delta.
    """
    if isinstance(ckpt, ZarrCheckpoint):
        return zarr_fingerprint(ckpt)
    out: list[dict[str, Any]] = []
    source = ckpt.adapter if isinstance(ckpt, LoraCheckpoint) else ckpt
    if isinstance(ckpt, LoraCheckpoint):
        config = json.dumps(ckpt.config, sort_keys=True, default=str).encode()
        out.append({"file": str(ckpt.folder / ADAPTER_CONFIG), "config_sha256": hashlib.sha256(config).hexdigest()})
    for shard in ckpt.shards:
        tensors = [t for t in source.tensors.values() if t.file == shard]
        try:
            out.append(_shard_fingerprint(shard, tensors))
        except OSError as e:  # gone or unreadable since it was opened: a change, told as one
            out.append({"file": str(shard), "unreadable": e.strerror or type(e).__name__})
    return out


def _shard_fingerprint(shard: Path, tensors: list[TensorInfo]) -> dict[str, Any]:
    with open(shard, "rb") as f:
        head = directory_bytes(f) if shard.suffix == ".bin" else read_header(f)[8:]  # journals' form
        st = os.fstat(f.fileno())
        samples = {t.name: f"{_sample_crc(f.fileno(), t):08x}" for t in tensors}
    return {
        "file": str(shard),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "header_sha256": hashlib.sha256(head).hexdigest(),
        "samples": samples,
    }


def _sample_crc(fd: int, t: TensorInfo) -> int:
    """crc32 of the first, middle and last `SAMPLE` bytes of `t` (all of it when small)."""
    starts = sorted({0, max(0, t.nbytes // 2 - SAMPLE // 2), max(0, t.nbytes - SAMPLE)})
    crc = 0
    for s in starts:
        crc = crc32(os.pread(fd, min(SAMPLE, t.nbytes - s), t.offset + s), crc)
    return crc


def input_change(old: Any, new: list[dict[str, Any]]) -> str | None:
    """What differs between two input fingerprint lists, naming the file (and tensor); None if
    nothing does."""
    if not isinstance(old, list) or len(old) != len(new):
        return f"{len(old) if isinstance(old, list) else 0} input shards before, {len(new)} now"
    for a, b in zip(old, new):
        if a == b:
            continue
        file = b.get("file", "?")
        if not isinstance(a, dict) or a.get("file") != file:
            return f"input {file} is not the shard that was read before"
        return f"input {file} {_shard_change(a, b)}"
    return None


def _shard_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The most telling difference in one shard's fingerprint: content first, then metadata."""
    if "unreadable" in new:
        return f"can no longer be read ({new['unreadable']})"
    if old.get("header_sha256") != new.get("header_sha256") or old.get("size") != new.get("size"):
        return "has another header or size"
    before, now = old.get("samples"), new.get("samples", {})
    if not isinstance(before, dict):
        return "was fingerprinted by an older leanmerge, without its content"
    changed = [n for n in now if before.get(n) != now[n]]
    if changed:
        return f"holds other data (tensor {changed[0]!r} differs)"
    if old.get("mtime_ns") != new.get("mtime_ns"):
        return "was modified (its mtime changed)"
    return "differs"
