"""Batch jobs that survive: killed runs resume to the same bytes; full disks and stale folders
are handled; `verify` catches damage."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from engine import MergeSpec, ModelRef, OutputError, ResumeError, merge
from engine.cli import main
from engine.io.checkpoint import open_checkpoint
from engine.io.fingerprint import fingerprint, input_change
from engine.io.output import temp_dir_for
from engine.io.record import header_sha256

from conftest import write_family
from reference import load_model

SHAPES = {f"layers.{i}.w": (257, 96) for i in range(12)} | {"norm": (96,), "scale": ()}


def digests(folder: Path) -> dict[str, str]:
    return {
        n: hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        for n, t in load_model(folder).items()
    }


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return write_family(tmp_path_factory.mktemp("resume"), 3, shapes=SHAPES, seed=1, base_shards=2)


def cli_args(family: tuple[Path, list[Path]], out: Path) -> list[str]:
    base, models = family
    return [
        "merge", "--method", "dare_ties", "--base", str(base), *(x for m in models for x in ("--model", f"{m}:0.4")),
        "--density", "0.5", "--seed", "3", "--block-size", "2KiB", "--sync-every", "4KiB", "-o", str(out),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(family: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("whole") / "out"
    result = CliRunner().invoke(main, cli_args(family, out))
    assert result.exit_code == 0, result.output
    return digests(out)


def kill_midway(args: list[str], log: Path, sig: int, rng: random.Random) -> int:
    """Start a real merge process, wait for a random number of finished tensors, send `sig`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", *args, "--log-json", str(log)], stderr=subprocess.PIPE, text=True
    )
    target, deadline = rng.randrange(0, len(SHAPES) - 1), time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count('"tensor"') > target:
            break
        time.sleep(0.002)
    time.sleep(rng.uniform(0, 0.01))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    return proc.returncode


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_runs_resume_to_identical_bytes(
    family: tuple[Path, list[Path]], uninterrupted: dict[str, str], tmp_path: Path, sig: int
) -> None:
    rng = random.Random(sig)
    interrupted = 0
    for trial in range(5):
        out = tmp_path / f"out{trial}"
        code = kill_midway(cli_args(family, out), tmp_path / f"log{trial}.jsonl", sig, rng)
        if not out.exists():  # else the run finished before the signal landed
            interrupted += 1
            assert code == (-9 if sig == signal.SIGKILL else 128 + signal.SIGTERM)
            assert (temp_dir_for(out) / "journal.jsonl").exists()
            result = CliRunner().invoke(main, [*cli_args(family, out), "--resume"])
            assert result.exit_code == 0, result.output
        assert digests(out) == uninterrupted
        assert not temp_dir_for(out).exists()
        assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0
    assert interrupted >= 3


def test_leftover_folder_needs_resume_and_spec_must_match(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, models = family
    out = tmp_path / "out"
    spec = MergeSpec("dare_linear", base, tuple(ModelRef(m, {"density": 0.5}) for m in models), {}, seed=1)
    stop_after = {"n": 0}

    def stop(e: dict[str, object]) -> None:
        if e["event"] == "tensor":
            stop_after["n"] += 1
            if stop_after["n"] == 4:
                raise KeyboardInterrupt  # a crash between blocks

    with pytest.raises(KeyboardInterrupt):
        merge(spec, out, block_bytes=2048, sync_every=1, on_event=stop)
    with pytest.raises(OutputError, match="--resume"):
        merge(spec, out, block_bytes=2048)
    other = MergeSpec("dare_linear", base, spec.models, {}, seed=2)
    with pytest.raises(ResumeError, match="spec changed.*seed"):
        merge(other, out, resume=True)
    report = merge(spec, out, resume=True, block_bytes=4096)  # another block size is fine
    assert report.resumed_tensors >= 3
    fresh = merge(spec, tmp_path / "fresh")
    assert digests(out) == digests(Path(fresh.output))


def test_verify_detects_damage(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, models = family
    out = tmp_path / "out"
    spec = MergeSpec("task_arithmetic", base, tuple(ModelRef(m, {}) for m in models), {})
    merge(spec, out)
    ok = CliRunner().invoke(
        main,
        [
            "verify",
            str(out),
            "--method",
            "task_arithmetic",
            "--base",
            str(base),
            *(x for m in models for x in ("--model", str(m))),
        ],
    )
    assert ok.exit_code == 0, ok.output
    other = CliRunner().invoke(
        main, ["verify", str(out), "--method", "task_arithmetic", "--base", str(base), "--model", str(models[0])]
    )
    assert other.exit_code != 0 and "different spec" in other.output
    shard = out / "model.safetensors"
    with open(shard, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"\x01\x02\x03")
    bad = CliRunner().invoke(main, ["verify", str(out)])
    assert bad.exit_code != 0 and "crc32" in bad.output


def test_second_writer_is_refused(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    from engine.io.lock import output_lock

    base, models = family
    out = tmp_path / "out"
    spec = MergeSpec("linear", base, tuple(ModelRef(m, {}) for m in models), {})
    with output_lock(out), pytest.raises(OutputError, match="another leanmerge process"):
        merge(spec, out)


@pytest.fixture
def small_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=72m", "tmpfs", str(mnt)], capture_output=True).returncode
    ):
        pytest.skip("needs root to mount a small tmpfs")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_midway_then_resume(family: tuple[Path, list[Path]], small_fs: Path, tmp_path: Path) -> None:
    base, models = family
    out = small_fs / "out"
    spec = MergeSpec("dare_ties", base, tuple(ModelRef(m, {"density": 0.3}) for m in models), {}, seed=5)
    filler = small_fs / "filler"

    def fill(e: dict[str, object]) -> None:
        if e["event"] == "tensor" and not filler.exists():
            free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
            with open(filler, "wb") as f:
                f.write(b"\0" * free)  # the disk is now full

    with pytest.raises(OutputError, match="--resume"):
        merge(spec, out, block_bytes=2048, sync_every=1, on_event=fill)
    assert not out.exists() and (temp_dir_for(out) / "journal.jsonl").exists()
    filler.unlink()
    merge(spec, out, block_bytes=2048, resume=True)
    assert digests(out) == digests(Path(merge(spec, tmp_path / "ref").output))


def test_journal_and_folder_record_hash_the_same_header_read_in_their_stored_forms(
    family: tuple[Path, list[Path]],
) -> None:
    """One reader of header bytes, two stored forms that must not change: a resume journal holds
    the header's sha256 without its 8-byte length (as journals always have), an output index the
    length and header (what `verify` compares)."""
    base, _ = family
    shard = sorted(base.glob("*.safetensors"))[0]
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    (first, *_) = fingerprint(open_checkpoint(base))
    assert first["file"] == str(shard)
    assert first["header_sha256"] == hashlib.sha256(raw[8 : 8 + n]).hexdigest()
    assert header_sha256(shard) == hashlib.sha256(raw[: 8 + n]).hexdigest()


def test_an_input_truncated_or_removed_since_it_was_read_is_named(tmp_path: Path) -> None:
    """Finalize and --resume fingerprint the inputs again: a shard cut below its length prefix or
    gone is a change told in one line (it was a struct.error / FileNotFoundError traceback)."""
    base, _ = write_family(tmp_path, 1, shapes={"w": (5, 3)}, seed=2)
    ckpt = open_checkpoint(base)
    before = fingerprint(ckpt)
    (shard,) = base.glob("*.safetensors")
    shard.write_bytes(shard.read_bytes()[:4])
    assert input_change(before, fingerprint(ckpt)) == f"input {shard} has another header or size"
    shard.unlink()
    assert input_change(before, fingerprint(ckpt)) == f"input {shard} can no longer be read (No such file or directory)"
