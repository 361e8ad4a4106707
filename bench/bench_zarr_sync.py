"""How long a zarr merge spends making chunks durable: `ZarrWriter.sync` and the finalizing
fsyncs as they are (every chunk file and new folder fsync'd at once from a thread pool) next to
one fsync after another (each file, then every folder above it: the writer before the pool;
"in sync" times the chunk syncs only), in one process, runs alternated,
with the same merge written as safetensors for reference.

The merge is `linear` of a synthetic bf16 family (`--tensors` matrices of 2048 x 1024 and as
many norms) to `--format zarr`, uncompressed, in chunks of `--block` bytes, synced every
`--sync-every` bytes: small chunks and intervals show the per-fsync cost a large model pays.

`python -m bench.bench_zarr_sync [--runs 5]` prints the medians and the machine's load.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click
import torch
from safetensors.torch import save_file

from engine import MergeSpec, ModelRef, merge
from engine.io import zarr_record, zarr_writer
from engine.io.zarr_writer import ZarrWriter


def serial_sync(self: ZarrWriter) -> None:
    """The sync before the pool: each file, then every folder above each, one after another."""
    assert isinstance(self.root, Path)
    root = self.root
    folders = {d for p in self._paths for d in p.parents if d.is_relative_to(root) and d != root}
    for p in sorted(self._paths):
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    for d in sorted(folders):
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)
    self._paths.clear()
    self._new.clear()


def serial_fsync_all(files: Iterable[Path], folders: Iterable[Path]) -> None:
    """The finalizing fsyncs before the pool (engine.io.zarr_record): one after another."""
    for path, flags in [*((f, os.O_RDONLY) for f in files), *((d, os.O_RDONLY | os.O_DIRECTORY) for d in folders)]:
        fd = os.open(path, flags)
        os.fsync(fd)
        os.close(fd)


def family(root: Path, n_tensors: int) -> tuple[Path, list[Path]]:
    """A base and two fine-tunes: `n_tensors` bf16 matrices of 2048 x 1024 and as many norms."""
    g = torch.Generator().manual_seed(0)
    folders = []
    for name in ("base", "ft1", "ft2"):
        tensors = {}
        for i in range(n_tensors):
            tensors[f"layers.{i}.w"] = torch.randn(2048, 1024, generator=g).to(torch.bfloat16)
            tensors[f"layers.{i}.norm"] = torch.randn(1024, generator=g).to(torch.bfloat16)
        (root / name).mkdir(parents=True)
        save_file(tensors, root / name / "model.safetensors")
        folders.append(root / name)
    return folders[0], folders[1:]


def timed(spec: MergeSpec, out: Path, block: int, sync_every: int, fmt: str = "zarr") -> tuple[float, float]:
    """(merge wall seconds, seconds inside `sync`)."""
    shutil.rmtree(out, ignore_errors=True)
    spent = [0.0]
    inner = ZarrWriter.sync

    def sync(self: ZarrWriter) -> None:
        t = time.perf_counter()
        inner(self)
        spent[0] += time.perf_counter() - t

    ZarrWriter.sync = sync  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        merge(spec, out, block_bytes=block, sync_every=sync_every, handle_signals=False, out_format=fmt)
        return time.perf_counter() - t0, spent[0]
    finally:
        ZarrWriter.sync = inner  # type: ignore[method-assign]


@click.command()
@click.option("--runs", default=5, show_default=True, help="Runs of each, alternated.")
@click.option("--tensors", default=32, show_default=True, help="Matrices (4 MiB each) in the model.")
@click.option("--block", default=1 << 20, show_default=True, help="Block (= chunk) bytes.")
@click.option("--sync-every", default=32 << 20, show_default=True, help="Bytes between syncs.")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=None, help="Scratch folder.")
def main(runs: int, tensors: int, block: int, sync_every: int, work: Path | None) -> None:
    root = Path(tempfile.mkdtemp(prefix="zsync-", dir=work))
    try:
        base, models = family(root, tensors)
        spec = MergeSpec("linear", base, tuple(ModelRef(m, {"weight": 0.5}) for m in models), {})
        pooled, pooled_all = zarr_writer.ZarrWriter.sync, zarr_record.fsync_all
        results: dict[str, list[tuple[float, float]]] = {"pooled": [], "serial": [], "safetensors": []}
        print(f"load before: {os.getloadavg()}")
        for _ in range(runs):
            for name, impl, finalize in (("serial", serial_sync, serial_fsync_all), ("pooled", pooled, pooled_all)):
                ZarrWriter.sync = impl  # type: ignore[method-assign]
                zarr_record.fsync_all = finalize
                results[name].append(timed(spec, root / "out", block, sync_every))
            results["safetensors"].append(timed(spec, root / "out", block, sync_every, "safetensors"))
        ZarrWriter.sync = pooled  # type: ignore[method-assign]
        zarr_record.fsync_all = pooled_all
        print(f"load after: {os.getloadavg()}")
        for name, rs in results.items():
            show: Any = [f"{w:.2f}/{s:.2f}" for w, s in rs]
            print(
                f"{name}: merge median {statistics.median(w for w, _ in rs):.2f} s, "
                f"in sync median {statistics.median(s for _, s in rs):.2f} s  (wall/sync per run: {show})"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
