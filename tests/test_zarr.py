"""`--format zarr`: the same merge as safetensors, element for element, for every method; names,
dtypes and checksums kept; verify names damage; a killed run resumes to the same bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from engine import merge
from engine.cli import main
from engine.dtypes import DTYPES
from engine.errors import ResumeError, SpecError
from engine.io import zarr_writer
from engine.io.output import temp_dir_for
from engine.io.zarr_format import Compression, escape_name, piece_crc, unescape_name
from engine.io.zarr_writer import zarr_blocks
from engine.merge import prepare
from engine.methods.registry import METHODS
from engine.verify import verify

from conftest import valid_spec, write_family
from reference import load_model

SHAPES = {"layers.0.w": (37, 12), "layers.1/odd name%": (5, 3, 4), "norm": (12,), "scale": ()}
MERGING = sorted(m for m in METHODS if METHODS[m].min_models > 0)


def load_zarr(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a zarr output, read with zarr itself and viewed as its recorded dtype."""
    group = zarr.open_group(folder / "model.zarr", mode="r")
    out = {}
    for key, arr in group.arrays():
        attrs = arr.attrs["leanmerge"]
        assert unescape_name(key) == attrs["name"] and list(arr.shape) == attrs["shape"]
        data = torch.from_numpy(np.ascontiguousarray(arr[...]))
        out[attrs["name"]] = data.view(DTYPES[attrs["dtype"]]).reshape(attrs["shape"])
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    base, models = write_family(tmp_path_factory.mktemp("zfam"), 3, shapes=SHAPES, seed=5, base_shards=2)
    (base / "config.json").write_text('{"model_type": "llama"}')
    return base, models


@pytest.mark.parametrize("method", MERGING)
def test_zarr_merge_equals_safetensors_merge(method: str, family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    spec = valid_spec(method, *family)
    merge(spec, tmp_path / "st", block_bytes=200, handle_signals=False)
    merge(spec, tmp_path / "z", block_bytes=200, handle_signals=False, out_format="zarr", compress="zstd:5")
    want, got = load_model(tmp_path / "st"), load_zarr(tmp_path / "z")
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(
            got[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)
        ), name
    assert (tmp_path / "z" / "config.json").is_file()
    assert verify(tmp_path / "z", spec).ok


def test_uncompressed_chunks_written_directly_are_zarrs_own(
    family: tuple[Path, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = valid_spec("dare_linear", *family)
    merge(spec, tmp_path / "a" / "z", block_bytes=200, handle_signals=False, out_format="zarr")
    monkeypatch.setattr(zarr_writer, "RAW_WRITES", False)  # every chunk through zarr's array assignment
    merge(spec, tmp_path / "b" / "z", block_bytes=200, handle_signals=False, out_format="zarr")
    files = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    assert {p.relative_to(tmp_path / "b"): p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()} == files
    assert Path("z/model.zarr/layers.0.w/c/4/0") in files  # 37 rows in chunks of 8: an edge chunk, padded
    assert Path("z/model.zarr/scale/c") in files and verify(tmp_path / "a" / "z", spec).ok


def test_layout_attributes_and_chunks(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    spec = valid_spec("dare_ties", *family)
    merge(spec, tmp_path / "z", block_bytes=100, handle_signals=False, out_format="zarr", compress="blosc")
    group = zarr.open_group(tmp_path / "z" / "model.zarr", mode="r")
    arr = group["layers.1%2Fodd%20name%25"]
    attrs = arr.attrs["leanmerge"]
    assert arr.dtype == np.uint16 and attrs["dtype"] == "BF16" and attrs["shape"] == [5, 3, 4]
    assert arr.chunks == (4, 3, 4)  # 100 bytes / 2 = 50 elements = 4 rows of 12 (a power of two)
    assert group["norm"].chunks == (12,)  # 50 rows -> 32, but never past the tensor's 12 (zarr would store them)
    assert attrs["spec_sha256"] == spec.digest() == group.attrs["leanmerge"]["spec_sha256"]
    raw = np.ascontiguousarray(arr[...]).tobytes()
    assert attrs["chunk_crc32"] == [f"{zlib.crc32(raw[:96]):08x}", f"{zlib.crc32(raw[96:]):08x}"]
    assert group.attrs["leanmerge"]["tensor_crc32"]["layers.1/odd name%"] == f"{zlib.crc32(raw):08x}"
    assert json.loads((tmp_path / "z/model.zarr/layers.0.w/zarr.json").read_text())["codecs"][1]["name"] == "blosc"


def test_verify_names_a_damaged_chunk_and_a_missing_one(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    spec = valid_spec("task_arithmetic", *family)
    out = tmp_path / "z"
    merge(spec, out, block_bytes=200, handle_signals=False, out_format="zarr")
    chunk = out / "model.zarr/layers.0.w/c/1/0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 1
    chunk.write_bytes(bytes(data))
    (out / "model.zarr/norm/c/0").unlink()
    problems = verify(out).problems
    assert problems[0].startswith("layers.0.w: chunk 1 crc32 ")
    assert problems[1:] == ["norm: chunk 0 is missing"]
    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exit_code == 1 and "2 problem(s) in 4 tensors" in result.output


def test_overwrite_replaces_a_zarr_output_but_compress_needs_zarr(
    family: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    spec = valid_spec("linear", *family)
    out = tmp_path / "z"
    merge(spec, out, handle_signals=False, out_format="zarr")
    merge(spec, out, handle_signals=False, out_format="zarr", compress="zstd", overwrite=True)
    assert verify(out).ok
    with pytest.raises(SpecError, match=r"^--compress zstd: only --format zarr output is compressed"):
        merge(spec, tmp_path / "st", handle_signals=False, compress="zstd")
    assert not (tmp_path / "st").exists()


@pytest.mark.parametrize("name", ["a.b.c", "x/y", "100%", "__meta", ".", "..", "", "naïve key", "%2F"])
def test_names_escape_reversibly(name: str) -> None:
    key = escape_name(name)
    assert unescape_name(key) == name and "/" not in key and not key.startswith("__") and key not in ("", ".", "..")


def test_compress_parse() -> None:
    assert str(Compression.parse("zstd:7")) == "zstd:7" and str(Compression.parse(None)) == "none"
    for bad, msg in [("lz4", "choose none"), ("blosc:3", "only zstd takes a level"), ("zstd:0", "1..22")]:
        with pytest.raises(SpecError, match=msg):
            Compression.parse(bad)


def test_piece_crc_inverts_the_running_crc() -> None:
    a, b = os.urandom(1000), os.urandom(777)
    assert piece_crc(zlib.crc32(a), zlib.crc32(a + b), len(b)) == zlib.crc32(b)


@pytest.mark.slow
def test_killed_zarr_merge_resumes_to_the_same_bytes(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, models = family
    args = [
        "merge", "--method", "dare_ties", "--base", str(base), *(x for m in models for x in ("--model", f"{m}:0.4")),
        "--density", "0.5", "--seed", "3", "--block-size", "64", "--sync-every", "64", "--format", "zarr",
        "--compress", "zstd",
    ]  # fmt: skip
    whole = tmp_path / "a" / "m"  # the same name: the model card names it
    assert CliRunner().invoke(main, [*args, "-o", str(whole)]).exit_code == 0
    out = tmp_path / "b" / "m"
    tmp = temp_dir_for(out)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", *args, "-o", str(out)], env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill once some chunk is journaled
        journal = tmp / "journal.jsonl"
        if journal.is_file() and journal.read_text().count('"b"') >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tmp.is_dir() and not out.exists()
    result = CliRunner().invoke(main, [*args, "-o", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    files = {p.relative_to(whole): p.read_bytes() for p in (whole / "model.zarr").rglob("*") if p.is_file()}
    assert {p.relative_to(out): p.read_bytes() for p in (out / "model.zarr").rglob("*") if p.is_file()} == files
    assert verify(out).ok


def test_resume_removes_the_chunk_files_a_killed_write_left_half_written(
    family: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """A kill inside `_write_raw` (or zarr's own local write) leaves CHUNK.UUID.partial beside the
    chunks: --resume removes it, so it is never committed with the output."""
    spec = valid_spec("dare_ties", *family)
    merge(spec, tmp_path / "a" / "m", block_bytes=200, handle_signals=False, out_format="zarr")

    def stop(e: dict[str, object]) -> None:
        if e["event"] == "tensor":
            raise KeyboardInterrupt  # a crash after the first tensor

    out = tmp_path / "b" / "m"
    with pytest.raises(KeyboardInterrupt):
        merge(spec, out, block_bytes=200, sync_every=1, on_event=stop, handle_signals=False, out_format="zarr")
    chunk = next(p for p in (temp_dir_for(out) / "model.zarr").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.with_name(f"{chunk.name}.0123456789abcdef.partial").write_bytes(b"half a chunk")
    merge(spec, out, block_bytes=200, resume=True, handle_signals=False, out_format="zarr")
    whole = tmp_path / "a" / "m" / "model.zarr"
    files = {p.relative_to(whole): p.read_bytes() for p in whole.rglob("*") if p.is_file()}
    got = out / "model.zarr"
    assert {p.relative_to(got): p.read_bytes() for p in got.rglob("*") if p.is_file()} == files


def test_a_band_worker_leaves_the_chunk_files_others_are_writing(
    family: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """A Dask band reopens the group while other workers write chunks: a CHUNK.UUID.partial is
    another worker's write in flight and stays (removing it failed that worker's rename, or this
    one's unlink when the rename came first); a resume's reopen, with no writer left, removes it."""
    from engine.cluster.tasks import ZarrOutput

    plan = zarr_blocks(prepare(valid_spec("linear", *family), block_bytes=200)[1])
    digest = plan.spec.digest()
    zarr_writer.ZarrWriter(tmp_path, plan, digest, Compression()).close()
    array = tmp_path / "model.zarr" / "layers.0.w"
    part = array / "c" / "0" / "0.0123456789abcdef.partial"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(b"a chunk being written")
    ZarrOutput(tmp_path, digest, Compression()).open(plan).close()
    assert part.read_bytes() == b"a chunk being written"
    zarr_writer.ZarrWriter(tmp_path, plan, digest, Compression(), reopen=True).close()
    assert not part.exists() and array.is_dir()


def test_the_commit_removes_the_chunk_files_a_killed_writer_left(
    family: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """A Dask worker killed inside a chunk write leaves CHUNK.UUID.partial while its band is
    written again elsewhere: the commit removes it, so the output holds the chunks and nothing else."""
    spec = valid_spec("dare_ties", *family)
    merge(spec, tmp_path / "a" / "m", block_bytes=200, handle_signals=False, out_format="zarr")
    out = tmp_path / "b" / "m"
    planted: list[Path] = []

    def plant(e: dict[str, object]) -> None:
        if e["event"] == "tensor" and not planted:
            chunk = next(p for p in (temp_dir_for(out) / "model.zarr").rglob("*") if p.is_file() and "c" in p.parts)
            planted.append(chunk.with_name(f"{chunk.name}.0123456789abcdef.partial"))
            planted[0].write_bytes(b"half a chunk")

    merge(spec, out, block_bytes=200, on_event=plant, handle_signals=False, out_format="zarr")
    whole = tmp_path / "a" / "m" / "model.zarr"
    files = {p.relative_to(whole): p.read_bytes() for p in whole.rglob("*") if p.is_file()}
    got = out / "model.zarr"
    assert planted and {p.relative_to(got): p.read_bytes() for p in got.rglob("*") if p.is_file()} == files


def test_resume_takes_the_interrupted_runs_chunks_where_the_budget_allows(family: tuple[Path, list[Path]]) -> None:
    plan = prepare(valid_spec("linear", *family), block_bytes=200)[1]  # 100 elements: 8 rows of 12
    rows = {t.name: t.block_rows for t in zarr_blocks(plan).tensors}
    assert rows == {"layers.0.w": 8, "layers.1/odd name%": 5, "norm": 12, "scale": 1}
    assert zarr_blocks(plan, {"layers.0.w": 4}).tensors[0].block_rows == 4
    with pytest.raises(ResumeError, match=r"^layers.0.w: the interrupted run wrote chunks of 16 rows"):
        zarr_blocks(plan, {"layers.0.w": 16})


def test_sync_makes_each_chunk_file_and_each_new_folder_durable(
    family: tuple[Path, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: dict[str, list[str]] = {"file": [], "folder": []}  # by ZarrWriter.sync, before the journal records

    def fsync_all(files: Iterable[Path], folders: Iterable[Path]) -> None:
        files, folders = list(files), list(folders)
        real_fsync_all(files, folders)
        synced["file"] += [str(p).partition("/model.zarr/")[2] for p in files]
        synced["folder"] += [str(p).partition("/model.zarr/")[2] for p in folders]

    real_fsync_all = zarr_writer.fsync_all
    monkeypatch.setattr(zarr_writer, "fsync_all", fsync_all)
    out = tmp_path / "z"
    spec = valid_spec("linear", *family)
    merge(spec, out, block_bytes=200, sync_every=400, handle_signals=False, out_format="zarr")
    root = out / "model.zarr"
    chunks = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "zarr.json")
    assert sorted(synced["file"]) == chunks  # each once
    folders = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir()}
    assert set(synced["folder"]) == folders  # every chunk's folder and each new one above it
    again = {f for f, n in Counter(synced["folder"]).items() if n > 1}  # synced in more than one sync
    assert again and all(f.endswith("/c") for f in again)  # only where new chunk folders appeared
