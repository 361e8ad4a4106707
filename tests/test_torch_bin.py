"""`.bin` inputs (torch zip checkpoints) read through torch's weights-only loader: the same bytes
as their safetensors twins, and nothing in a pickle is ever run."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from engine import MergeSpec, ModelRef, merge
from engine.cli import main
from engine.errors import CheckpointError, ResumeError
from engine.io.checkpoint import Reader, open_checkpoint
from engine.io.fingerprint import fingerprint, input_change
from engine.io.torch_bin import BIN_SINGLE
from engine.verify import verify

from conftest import SHAPES, family_tensors, write_bin, write_checkpoint
from reference import load_model


def twins(root: Path, dtype: torch.dtype, shards: int, n_models: int = 2) -> tuple[list[Path], list[Path]]:
    """The same family written twice: as safetensors folders and as `.bin` folders."""
    # In name order, as safetensors' save_file lays out tensors of one dtype: the twins' shards
    # then list the same tensors in the same order, and so do the outputs.
    sets = [dict(sorted(s.items())) for s in family_tensors(SHAPES, n_models, seed=3, dtype=dtype)]
    st = [write_checkpoint(root / "st" / f"m{i}", s, shards) for i, s in enumerate(sets)]
    pt = [write_bin(root / "pt" / f"m{i}", s, shards) for i, s in enumerate(sets)]
    return st, pt


def merged(folders: list[Path], out: Path, method: str, **params: Any) -> dict[str, tuple[Any, bytes]]:
    refs = tuple(ModelRef(m, {"weight": w} if method != "slerp" else {}) for m, w in zip(folders[1:], (0.6, 0.4)))
    merge(MergeSpec(method, folders[0], refs, params, seed=5), out, block_bytes=512, model_card=False)
    return payload(out)


def payload(out: Path) -> dict[str, tuple[Any, bytes]]:
    """Each output shard's tensor entries and data bytes (its metadata holds the spec digest,
    which names the input folders)."""
    shards = {}
    for p in sorted(out.glob("*.safetensors")):
        raw = p.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        header.pop("__metadata__")
        shards[p.name] = (header, raw[8 + n :])
    return shards


@pytest.mark.parametrize(
    ("dtype", "shards", "method", "params"),
    [
        (torch.bfloat16, 2, "dare_ties", {"density": 0.5}),
        (torch.float16, 1, "task_arithmetic", {}),
        (torch.float32, 3, "ties", {"density": 0.6}),
        (torch.bfloat16, 1, "slerp", {"t": 0.3}),
    ],
)
def test_bin_merges_to_the_bytes_of_its_safetensors_twin(
    tmp_path: Path, dtype: torch.dtype, shards: int, method: str, params: dict[str, Any]
) -> None:
    st, pt = twins(tmp_path, dtype, shards, n_models=1 if method == "slerp" else 2)
    want = merged(st, tmp_path / "out_st", method, **params)
    got = merged(pt, tmp_path / "out_pt", method, **params)
    assert want and got == want
    assert verify(tmp_path / "out_pt", None).ok


def test_bin_tensors_read_as_safetensors_ones(tmp_path: Path) -> None:
    """Same names, dtypes, shapes and rows; tied weights (one storage) and a view with a storage
    offset are read at their own bytes."""
    tensors = family_tensors(SHAPES, 0, seed=1, dtype=torch.bfloat16)[0]
    tensors["tied.weight"] = tensors["embed.weight"]  # shares the storage, as tied embeddings do
    flat = torch.arange(40, dtype=torch.float32)
    tensors["tail"] = flat[25:]  # a contiguous view at storage offset 25
    ckpt = open_checkpoint(write_bin(tmp_path / "m", tensors))
    assert {n: (t.dtype, t.shape) for n, t in ckpt.tensors.items()} == {
        n: ({torch.bfloat16: "BF16", torch.float32: "F32"}[t.dtype], tuple(t.shape)) for n, t in tensors.items()
    }
    with Reader(ckpt) as reader:
        for name, t in tensors.items():
            info = ckpt.tensors[name]
            rows = reader.read_rows(name, 0, info.rows)
            assert torch.equal(rows.reshape(t.shape), t), name
            if info.rows > 2:
                assert torch.equal(reader.read_rows(name, 1, 3).flatten(), t[1:3].flatten()), name


def test_folder_with_both_reads_the_safetensors(tmp_path: Path) -> None:
    sets = family_tensors(SHAPES, 1, seed=2, dtype=torch.float16)
    folder = write_checkpoint(tmp_path / "m", sets[0])
    write_bin(folder, sets[1])  # other values: reading them would show
    ckpt = open_checkpoint(folder)
    assert ckpt.shards == (folder / "model.safetensors",)


def test_malicious_pickle_is_refused_and_never_run(tmp_path: Path) -> None:
    """A `.bin` whose pickle calls os.system: torch's weights-only loader refuses it, the marker
    file never appears, and the error is one line naming the file and the fix."""
    marker = tmp_path / "ran"
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"w": torch.zeros(2), "x": _System(f"touch {marker}")}, folder / BIN_SINGLE)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(folder)
    assert str(e.value) == (
        f"{folder / BIN_SINGLE}: refused by torch's weights-only loader (Trying to load unsupported GLOBAL "
        "posix.system whose module posix is blocked.); leanmerge never runs code from a checkpoint. If you trust "
        "the file, re-save it as safetensors where it was made (`model.save_pretrained(DIR, safe_serialization=True)`)"
    )
    assert not marker.exists()


class _System:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def _bad(folder: Path, how: str) -> None:
    path = folder / BIN_SINGLE
    if how in ("compressed", "short record"):
        mode = zipfile.ZIP_DEFLATED if how == "compressed" else zipfile.ZIP_STORED
        with zipfile.ZipFile(folder / "x.zip", "w", mode) as out, zipfile.ZipFile(path) as src:
            for i in src.infolist():
                data = src.read(i)
                out.writestr(i.filename, data[:8] if i.filename.endswith("/data/0") else data)
        (folder / "x.zip").replace(path)
    elif how == "truncated":
        os.truncate(path, os.path.getsize(path) - 200)
    elif how == "not a dict":
        torch.save([torch.zeros(3)], path)
    elif how == "non-tensor":
        torch.save({"w": torch.zeros(3), "step": 7}, path)
    elif how == "strided":
        torch.save({"w": torch.zeros(4, 6).t()}, path)
    elif how == "complex":
        torch.save({"w": torch.zeros(3, dtype=torch.complex64)}, path)


@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("compressed", "record 'pytorch_model/data/0' is compressed; convert it to safetensors"),
        ("truncated", "unreadable zip archive"),
        ("short record", "its storages do not match the archive's records (in size or first bytes)"),
        ("not a dict", "holds a list, not a state dict of tensors"),
        ("non-tensor", "entry 'step' is a int, not a named tensor"),
        ("strided", "tensor 'w': stored as a torch.strided tensor with strides [1, 6], not as row-major rows"),
        ("complex", "tensor 'w': dtype torch.complex64 is not one leanmerge reads"),
    ],
)
def test_bad_bin_is_one_line_naming_the_file(tmp_path: Path, how: str, says: str) -> None:
    folder = write_bin(tmp_path / "archive", {"w": torch.ones(3, 2)})
    _bad(folder, how)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(folder)
    msg = str(e.value)
    assert msg.startswith(f"{folder / BIN_SINGLE}: ") and says in msg and "\n" not in msg, msg


def test_fingerprint_of_a_bin_sees_another_model(tmp_path: Path) -> None:
    """--resume and finalize compare fingerprints: a .bin shard's is its zip directory (names,
    sizes, CRC-32s) and sampled bytes, read without a safetensors header."""
    sets = family_tensors(SHAPES, 1, seed=4, dtype=torch.bfloat16)
    folder = write_bin(tmp_path / "m", sets[0], shards=2)
    before = fingerprint(open_checkpoint(folder))
    assert [fp["file"] for fp in before] == sorted(str(p) for p in folder.glob("*.bin"))
    assert input_change(before, fingerprint(open_checkpoint(folder))) is None
    write_bin(folder, sets[1], shards=2)  # the other fine-tune, same names and shapes
    change = input_change(before, fingerprint(open_checkpoint(folder)))
    assert change is not None and change.startswith(f"input {folder / 'pytorch_model-00001-of-00002.bin'} ")


def test_a_killed_bin_merge_resumes_only_with_the_same_inputs(tmp_path: Path) -> None:
    """--resume fingerprints .bin inputs as it does safetensors: another file in a model's place
    is refused, naming it; the inputs back in place, it finishes to the safetensors twin's bytes."""
    st, pt = twins(tmp_path, torch.bfloat16, 2)
    out = tmp_path / "out"
    refs = tuple(ModelRef(m, {"weight": 0.5}) for m in pt[1:])
    spec = MergeSpec("dare_linear", pt[0], refs, {"density": 0.5}, seed=1)
    done = []

    def stop(e: dict[str, object]) -> None:
        if e["event"] == "tensor":
            done.append(e)
            if len(done) == 3:
                raise KeyboardInterrupt  # a crash between tensors

    with pytest.raises(KeyboardInterrupt):
        merge(spec, out, block_bytes=160, sync_every=1, on_event=stop, model_card=False)
    shard = pt[2] / "pytorch_model-00001-of-00002.bin"
    shard.rename(tmp_path / "kept.bin")
    torch.save(torch.load(pt[1] / shard.name, weights_only=True), shard)  # the other model's tensors
    with pytest.raises(ResumeError, match=f"input {shard} "):
        merge(spec, out, resume=True, block_bytes=160, model_card=False)
    (tmp_path / "kept.bin").rename(shard)
    report = merge(spec, out, resume=True, block_bytes=160, model_card=False)
    assert report.resumed_tensors >= 2
    twin = MergeSpec(
        "dare_linear", st[0], tuple(ModelRef(m, {"weight": 0.5}) for m in st[1:]), {"density": 0.5}, seed=1
    )
    merge(twin, tmp_path / "twin", block_bytes=160, model_card=False)
    assert payload(out) == payload(tmp_path / "twin")
    assert verify(out, spec).ok  # the output is the merge of these .bin inputs


def test_convert_turns_a_bin_folder_into_its_safetensors_twin(tmp_path: Path) -> None:
    """`leanmerge convert` reads a sharded `.bin` folder as any input: the tensors come out as
    its safetensors twin's, bit for bit, and the output verifies."""
    (st,), (pt,) = twins(tmp_path, torch.bfloat16, 2, n_models=0)
    result = CliRunner().invoke(main, ["convert", str(pt), str(tmp_path / "out"), "--to", "safetensors"])
    assert result.exit_code == 0, result.output
    got, want = load_model(tmp_path / "out"), load_model(st)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[n].reshape(-1).view(torch.uint8), want[n].reshape(-1).view(torch.uint8)) for n in want)
    assert verify(tmp_path / "out").ok
