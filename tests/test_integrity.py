"""Nothing lost, nothing mixed: a resumed run refuses changed inputs, survives a torn journal and
re-checks what it keeps; `verify` checks headers and every file; finalize is durable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from test_resume import SHAPES, digests

from engine import CheckpointError, MergeSpec, ModelRef, ResumeError, merge
from engine.cli import main
from engine.config import load_config
from engine.io.header import read_header
from engine.io.journal import JOURNAL_NAME, load_journal
from engine.io.output import temp_dir_for

from conftest import family_tensors, write_checkpoint

CONFIG = """merge_method: dare_ties
base_model: ./base
models:
  - model: ./ft1
    parameters: {weight: 0.4}
  - model: ./ft2
    parameters: {weight: 0.4}
parameters: {density: 0.5}
random_seed: 3
"""


@pytest.fixture
def job(tmp_path: Path) -> Path:
    """A dare_ties config over copies of a base and two fine-tunes (plus ft2b: another fine-tune
    of ft2's architecture, so its header is byte-identical)."""
    sets = family_tensors(SHAPES, 3, 1, torch.bfloat16)
    write_checkpoint(tmp_path / "base", sets[0], 2)
    write_checkpoint(tmp_path / "ft1", sets[1])
    write_checkpoint(tmp_path / "ft2", sets[2])
    write_checkpoint(tmp_path / "ft2b", family_tensors(SHAPES, 3, 2, torch.bfloat16)[3])
    (tmp_path / "merge.yaml").write_text(CONFIG)
    return tmp_path


def interrupt(job: Path, out: Path, after: int = 5) -> None:
    """Stop a merge of `job` after `after` finished tensors, journaling every block."""
    seen = {"n": 0}

    def stop(e: dict[str, object]) -> None:
        if e["event"] == "tensor":
            seen["n"] += 1
            if seen["n"] == after:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge(load_config(job / "merge.yaml"), out, block_bytes=2048, sync_every=1, on_event=stop)
    assert (temp_dir_for(out) / JOURNAL_NAME).is_file()


def resume_cli(job: Path, out: Path) -> subprocess.CompletedProcess[str]:
    args = ["merge", str(job / "merge.yaml"), "-o", str(out), "--block-size", "2KiB", "--resume"]
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True)


def reference(job: Path) -> dict[str, str]:
    return digests(Path(merge(load_config(job / "merge.yaml"), job / "reference").output))


def journal_lines(out: Path) -> list[bytes]:
    return (temp_dir_for(out) / JOURNAL_NAME).read_bytes().splitlines(keepends=True)


def test_resume_refuses_another_fine_tune_with_the_same_header(job: Path) -> None:
    out = job / "out"
    interrupt(job, out)
    shutil.copyfile(job / "ft2b" / "model.safetensors", job / "ft2" / "model.safetensors")
    before = {p: p.read_bytes() for p in (job / "ft2").iterdir()}
    done = resume_cli(job, out)
    tmp = temp_dir_for(out)
    assert done.returncode == 1
    assert done.stderr == (
        f"Error: {tmp}: cannot resume: the inputs changed since the interrupted run (input "
        f"{job / 'ft2' / 'model.safetensors'} holds other data (tensor 'layers.0.w' differs)); "
        f"run the original command again, or remove {tmp} to start over\n"
    )
    assert not out.exists() and (tmp / JOURNAL_NAME).is_file()
    assert before == {p: p.read_bytes() for p in (job / "ft2").iterdir()}


def test_an_input_changed_during_the_run_discards_the_output(job: Path) -> None:
    out, shard = job / "out", job / "ft2" / "model.safetensors"
    spec = load_config(job / "merge.yaml")

    def swap(e: dict[str, object]) -> None:
        if e["event"] == "tensor" and e.get("name") == "layers.3.w":
            with open(shard, "r+b") as f:  # in place: same header and size, other data
                f.write((job / "ft2b" / "model.safetensors").read_bytes())

    with pytest.raises(CheckpointError) as err:
        merge(spec, out, block_bytes=2048, on_event=swap)
    assert str(err.value) == (
        f"input {shard} holds other data (tensor 'layers.0.w' differs) since the merge started reading it; "
        "the output is discarded: run the merge again"
    )
    assert not out.exists() and not temp_dir_for(out).exists()


def test_resume_redoes_a_torn_record_and_a_damaged_finished_tensor(job: Path) -> None:
    """The tail is cut inside the last tensor's "t" record (its blocks are all journaled), and a
    byte of the first finished tensor is flipped on disk: resume rewrites both."""
    out = job / "out"
    interrupt(job, out)
    lines = journal_lines(out)
    last_t = max(i for i, line in enumerate(lines) if line.startswith(b'{"t"'))
    torn = b"".join(lines[:last_t]) + lines[last_t][:9]
    (temp_dir_for(out) / JOURNAL_NAME).write_bytes(torn)
    _flip_a_byte_of_the_first_finished_tensor(out, lines)
    done = resume_cli(job, out)
    assert done.returncode == 0, done.stderr
    assert digests(out) == reference(job)
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0


def _flip_a_byte_of_the_first_finished_tensor(out: Path, lines: list[bytes]) -> None:
    first = json.loads(next(line for line in lines if line.startswith(b'{"t"')))["t"]
    shard = next(temp_dir_for(out).glob("*.safetensors"))
    info = next(t for t in read_header(shard).tensors if t.name == first)
    with open(shard, "r+b") as f:
        f.seek(info.offset + 7)
        byte = f.read(1)
        f.seek(info.offset + 7)
        f.write(bytes([byte[0] ^ 0x40]))


def test_a_damaged_tensor_rewritten_on_resume_is_not_reported_as_resumed(job: Path) -> None:
    out = job / "out"
    interrupt(job, out)
    lines = journal_lines(out)
    _flip_a_byte_of_the_first_finished_tensor(out, lines)
    report = merge(load_config(job / "merge.yaml"), out, block_bytes=2048, resume=True)
    assert report.resumed_tensors == sum(line.startswith(b'{"t"') for line in lines) - 1
    assert digests(out) == reference(job)


@pytest.mark.parametrize(
    "tail",
    [
        lambda last: last[: len(last) // 2],  # cut mid-line
        lambda last: last[:-1],  # the whole record but its newline
        lambda last: b"\0" * 40,  # zeros where the append did not land
    ],
    ids=["mid-line", "no-newline", "zeros"],
)
def test_a_torn_journal_tail_is_discarded(job: Path, tail: object) -> None:
    out = job / "out"
    interrupt(job, out, after=3)
    lines = journal_lines(out)
    cut = tail(lines[-1])  # type: ignore[operator]
    (temp_dir_for(out) / JOURNAL_NAME).write_bytes(b"".join(lines[:-1]) + cut)
    merge(load_config(job / "merge.yaml"), out, block_bytes=2048, resume=True)
    assert digests(out) == reference(job)


JOURNAL_SAMPLE = (
    b'{"leanmerge_journal":1,"spec":{},"inputs":[],"layout":"x"}\n'
    b'{"b":"w","r0":0,"r1":4,"crc32":17}\n{"b":"w","r0":4,"r1":8,"crc32":99}\n{"t":"w","crc32":99}\n'
    b'{"b":"v","r0":0,"r1":2,"crc32":5}\n'
)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(
    cut=st.just(len(JOURNAL_SAMPLE)) | st.integers(0, len(JOURNAL_SAMPLE)),
    flips=st.lists(st.tuples(st.integers(0, len(JOURNAL_SAMPLE) - 1), st.integers(0, 255)), max_size=4),
    tail=st.binary(max_size=64) | st.sampled_from([b'{"b":[1],"r0":0,"r1":1,"crc32":1}\n', b'{"t":{},"crc32":1}\n']),
)
def test_a_damaged_journal_loads_its_good_prefix_or_is_one_error(
    cut: int, flips: list[tuple[int, int]], tail: bytes
) -> None:
    """Journal fuzz: cut anywhere, bytes changed, garbage or wrongly typed records appended. Loading
    keeps records up to the first damaged line and never raises anything but `ResumeError`."""
    data = bytearray(JOURNAL_SAMPLE[:cut])
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / JOURNAL_NAME).write_bytes(bytes(data) + tail)
        try:
            state = load_journal(Path(tmp))
        except ResumeError:
            return
    assert state is not None
    assert all(isinstance(n, str) for n in (*state.done, *state.blocks))
    assert all(isinstance(x, int) for rows in state.blocks.values() for b in rows for x in b)


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An F16 task_arithmetic merge in three shards, with the base's config and tokenizer."""
    root = tmp_path_factory.mktemp("verify")
    sets = family_tensors(SHAPES, 1, 4, torch.float16)
    base, ft = write_checkpoint(root / "base", sets[0]), write_checkpoint(root / "ft", sets[1])
    spec = MergeSpec("task_arithmetic", base, (ModelRef(ft, {}),), {})
    return Path(merge(spec, root / "out", shard_size=200_000).output)


def _edit_header(folder: Path, old: bytes, new: bytes) -> None:
    shard = folder / "model-00001-of-00003.safetensors"
    data = shard.read_bytes()
    assert len(old) == len(new) and old in data
    shard.write_bytes(data.replace(old, new, 1))


def _drop_shard(folder: Path) -> None:
    file = "model-00002-of-00003.safetensors"
    (folder / file).unlink()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    gone = [n for n, f in index["weight_map"].items() if f == file]
    for n in gone:
        del index["weight_map"][n], index["metadata"]["leanmerge"]["tensor_crc32"][n]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("damage", "line"),
    [
        (lambda f: (f / "tokenizer.json").unlink(), "FAIL tokenizer.json: written by the merge but missing"),
        (lambda f: (f / "config.json").unlink(), "FAIL config.json: written by the merge but missing"),
        (
            lambda f: (f / "config.json").write_text("{}"),
            "FAIL config.json: sha256 44136fa355b3678a... != recorded ",
        ),
        (
            lambda f: _edit_header(f, b'"F16"', b'"I16"'),
            "FAIL model-00001-of-00003.safetensors: header differs from the one written "
            "(tensor names, dtypes, shapes or offsets)",
        ),
        (
            lambda f: _edit_header(f, b"[257,96]", b"[96,257]"),
            "FAIL model-00001-of-00003.safetensors: header differs from the one written "
            "(tensor names, dtypes, shapes or offsets)",
        ),
        (_drop_shard, "FAIL model-00002-of-00003.safetensors: shard recorded by the merge is missing"),
    ],
    ids=["tokenizer-deleted", "config-deleted", "config-edited", "dtype-edited", "shape-transposed", "shard-dropped"],
)
def test_verify_checks_headers_and_every_file(merged: Path, tmp_path: Path, damage: object, line: str) -> None:
    folder = Path(shutil.copytree(merged, tmp_path / "copy"))
    ok = CliRunner().invoke(main, ["verify", str(folder)])
    assert ok.exit_code == 0 and ok.output.endswith("; 7 shard headers and files match their sha256\n"), ok.output
    damage(folder)  # type: ignore[operator]
    result = CliRunner().invoke(main, ["verify", str(folder)])
    assert result.exit_code == 1
    assert result.output.splitlines()[0].startswith(line), result.output


def test_verify_of_an_older_output_checks_tensors_with_a_note(merged: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(merged, tmp_path / "old"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    for key in ("shard_header_sha256", "file_sha256"):
        del index["metadata"]["leanmerge"][key]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "tokenizer.json").unlink()
    done = subprocess.run([sys.executable, "-m", "engine.cli", "verify", str(folder)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr == (
        f"note: {folder}: written by a leanmerge that recorded only tensor checksums; "
        "shard headers and other files (config, tokenizer) are not checked\n"
    )


def test_finalize_fsyncs_every_file_before_the_rename(job: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src: str | Path, dst: str | Path) -> None:
        events.append(("rename", str(src)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    out = job / "out"
    merge(load_config(job / "merge.yaml"), out)
    tmp = str(temp_dir_for(out))
    commit = events.index(("rename", tmp))
    synced = {path for kind, path in events[:commit] if kind == "fsync"}
    files = {str(Path(tmp) / p.name) for p in out.iterdir() if not p.name.endswith(".safetensors")}
    assert files == {
        f"{tmp}/{n}"
        for n in ("config.json", "tokenizer.json", "model.safetensors.index.json", "README.md", "mergekit_config.yml")
    }
    assert files | {tmp} <= synced
