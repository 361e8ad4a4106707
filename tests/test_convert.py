"""`leanmerge convert` both ways, bit for bit, and zarr folders as merge inputs (damage: one line)."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from engine import MergeSpec, ModelRef, merge
from engine.cli import main
from engine.convert import convert
from engine.errors import CheckpointError, OutputError
from engine.io.output import temp_dir_for
from engine.io.zarr_format import escape_name
from engine.io.zarr_reader import CHUNK_COPIES
from engine.merge import prepare
from engine.verify import verify

from conftest import family_tensors, write_checkpoint
from reference import load_model

SHAPES = {"emb": (41, 16), "layers.0.w": (16, 16), "norm": (16,), "scale": ()}


def raw(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def same_tensors(a: Path, b: Path) -> None:
    want, got = load_model(a), load_model(b)
    assert list(got) == list(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and raw(got[name]) == raw(t), name


@pytest.mark.parametrize(("dtype", "shards"), [(torch.bfloat16, 1), (torch.float16, 1), (torch.float32, 2)])
def test_round_trip_is_byte_identical(dtype: torch.dtype, shards: int, tmp_path: Path) -> None:
    tensors = family_tensors(SHAPES, 0, 3, dtype)[0] | {"ids": torch.arange(7, dtype=torch.int64)}
    src = write_checkpoint(tmp_path / "src", tensors, shards)
    convert(src, tmp_path / "z", "zarr", compress="zstd", handle_signals=False, max_memory=None)
    convert(tmp_path / "z", tmp_path / "back", "safetensors", handle_signals=False)
    same_tensors(src, tmp_path / "back")
    assert verify(tmp_path / "z").ok and verify(tmp_path / "back").ok


def test_convert_never_replaces_what_it_did_not_write(tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "src", family_tensors(SHAPES, 0, 1, torch.bfloat16)[0])
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["convert", str(src), str(dst), "--to", "zarr", "--overwrite"])
    assert result.exit_code == 1 and "also holds notes.txt" in result.output
    assert sorted(p.name for p in dst.iterdir()) == ["notes.txt"] and not temp_dir_for(dst).exists()
    done = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "z"), "--to", "zarr", "--compress", "zstd:3"])
    assert done.exit_code == 0 and done.output.startswith(f"{tmp_path / 'z'}: 4 tensors, "), done.output
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "z").rglob("*"))
    with pytest.raises(OutputError, match="output already exists; pass --overwrite"):
        convert(src, tmp_path / "z", "zarr", handle_signals=False)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "z").rglob("*")) == before


@pytest.fixture(scope="module")
def zarr_family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("zin")
    sets = family_tensors(SHAPES, 1, 4, torch.bfloat16)
    base, ft = write_checkpoint(root / "base", sets[0]), write_checkpoint(root / "ft", sets[1], 2)
    convert(ft, root / "ftz", "zarr", compress="blosc", handle_signals=False)
    return base, ft, root / "ftz"


def test_a_zarr_model_merges_like_its_safetensors_source(zarr_family: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, ft, ftz = zarr_family
    params = {"density": 0.5}
    merge(MergeSpec("dare_ties", base, (ModelRef(ft, {"weight": 0.7}),), params), tmp_path / "a", block_bytes=100)
    merge(MergeSpec("dare_ties", base, (ModelRef(ftz, {"weight": 0.7}),), params), tmp_path / "b", block_bytes=100)
    same_tensors(tmp_path / "a", tmp_path / "b")


def test_zarr_chunks_are_counted_by_the_planner(zarr_family: tuple[Path, Path, Path]) -> None:
    base, ft, ftz = zarr_family
    st = prepare(MergeSpec("task_arithmetic", base, (ModelRef(ft, {}),), {}), max_memory=1 << 30, baseline=0)[1]
    z = prepare(MergeSpec("task_arithmetic", base, (ModelRef(ftz, {}),), {}), max_memory=1 << 30, baseline=0)[1]
    # ftz's largest chunk: emb's, 41 rows -> 32 (a power of two) of 16 bf16 = 1024 bytes
    assert z.memory.reserve - st.memory.reserve == CHUNK_COPIES * 1024


def damaged_copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda z: (z / "model.zarr/emb/c/1/0").unlink(), "model.zarr/emb: chunk 1 of tensor 'emb' is missing"),
        (
            lambda z: _edit_attrs(z / "model.zarr/norm/zarr.json", shape=[15]),
            "model.zarr/norm/zarr.json: attributes.leanmerge.shape [15] != the array's shape [16]",
        ),
        (
            lambda z: (z / "model.zarr/layers.0.w/zarr.json").write_text('{"shape": [16, 16],'),
            "model.zarr: cannot read the zarr metadata",
        ),
    ],
    ids=["missing-chunk", "wrong-shape", "bad-json"],
)
def test_damaged_zarr_input_is_one_line(
    damage: object, message: str, zarr_family: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    base, _, ftz = zarr_family
    bad = damaged_copy(ftz, tmp_path / "bad")
    damage(bad)  # type: ignore[operator]
    out = tmp_path / "out"
    args = ["merge", "--method", "task_arithmetic", "--base", str(base), "--model", str(bad), "-o", str(out)]
    result = CliRunner().invoke(main, [*args, "--block-size", "100"])
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1 and message in result.output, result.output
    assert not out.exists() and not temp_dir_for(out).exists()
    with pytest.raises(CheckpointError):
        merge(MergeSpec("task_arithmetic", base, (ModelRef(bad, {}),), {}), tmp_path / "o2", block_bytes=100)


def _edit_attrs(path: Path, **changes: object) -> None:
    meta = json.loads(path.read_text())
    meta["attributes"]["leanmerge"].update(changes)
    path.write_text(json.dumps(meta))


def test_convert_to_a_url_and_never_over_foreign_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the URL output's journal and lock
    tensors = family_tensors(SHAPES, 0, 2, torch.float16)[0]
    src = write_checkpoint(tmp_path / "src", tensors, 2)
    (src / "config.json").write_text("{}")
    url = f"memory://zarr-test-{tmp_path.name}/m"
    done = CliRunner().invoke(main, ["convert", str(src), url, "--to", "zarr", "--compress", "zstd"])
    assert done.exit_code == 0 and done.output.startswith(f"{url}: 4 tensors, "), done.output
    group = zarr.open_group(f"{url}/model.zarr", mode="r")
    for name, t in tensors.items():
        arr = group[escape_name(name)]
        assert np.ascontiguousarray(arr[...]).tobytes() == raw(t) and arr.attrs["leanmerge"]["dtype"] == "F16"
    assert json.loads(fsspec.filesystem("memory").cat(url[9:] + "/config.json"))["dtype"] == "float16"
    again = CliRunner().invoke(main, ["convert", str(src), url, "--to", "zarr"])
    assert again.exit_code == 1 and "output already exists; pass --overwrite" in again.output
    assert CliRunner().invoke(main, ["convert", str(src), url, "--to", "zarr", "--overwrite"]).exit_code == 0
    back = CliRunner().invoke(main, ["convert", url, str(tmp_path / "back"), "--to", "safetensors"])
    assert back.exit_code == 0, back.output
    same_tensors(src, tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "float16"  # from the URL
    file_url = CliRunner().invoke(main, ["convert", str(src), f"file://{tmp_path}/local", "--to", "zarr"])
    assert file_url.exit_code == 0 and verify(tmp_path / "local").ok
