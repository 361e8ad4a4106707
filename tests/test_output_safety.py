"""The output folder: what --overwrite may replace, planted links, the lock, a stopped commit.

Each case runs the real CLI and asserts the exact one-line error, the exit code, that no file
under the test's folder changed, and where a merge completes, the same bytes as a fresh merge.
Cases that depend on the kernel (O_NOFOLLOW, a lock held by another process) run a real process.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from engine.cli import main
from engine.errors import OutputError
from engine.io.checkpoint import SINGLE_NAME
from engine.io.lock import lock_path
from engine.io.output import temp_dir_for
from engine.io.target import old_dir_for
from engine.merge import merge
from engine.spec import MergeSpec, ModelRef
from tests.conftest import MakeFamily

REPO = Path(__file__).resolve().parents[1]
REFUSE_FOREIGN = (
    "--overwrite replaces only a model folder (weights, index, config, tokenizer files) and this one also holds"
)


def snapshot(root: Path) -> dict[str, str | bytes]:
    """Every entry under `root` (links not followed): its bytes, or what a link or folder is."""
    out: dict[str, str | bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = f"link -> {os.readlink(p)}"
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = p.read_bytes()
    return out


def argv(base: Path, model: Path, out: Path | str, *extra: str) -> list[str]:
    return ["merge", "--method", "task_arithmetic", "--base", str(base), "--model", str(model), "-o", str(out), *extra]


def one_error(result: Result, line: str) -> None:
    """Exit 1, nothing on stdout, exactly `Error: line` on stderr."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"Error: {line}"], result.stderr


def real_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "engine.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


@pytest.fixture
def family(tiny_family: MakeFamily, tmp_path: Path) -> tuple[Path, Path, bytes]:
    """A base, one fine-tune, and the bytes a fresh merge of them writes."""
    base, (model,) = tiny_family(1)
    ref = tmp_path / "reference"
    assert CliRunner().invoke(main, argv(base, model, ref)).exit_code == 0
    return base, model, (ref / SINGLE_NAME).read_bytes()


def old_model(folder: Path) -> None:
    """A model folder an earlier merge (or a download) left: weights, index, config, tokenizer."""
    folder.mkdir()
    for name in (SINGLE_NAME, "model.safetensors.index.json", "config.json", "tokenizer.json"):
        (folder / name).write_text(f"old {name}")


def test_overwrite_refuses_anything_but_a_model_folder(family: tuple[Path, Path, bytes], tmp_path: Path) -> None:
    base, model, _ = family
    root = tmp_path / "out-root"
    root.mkdir()
    (root / "notamodel").mkdir()
    (root / "notamodel" / "precious.txt").write_text("keep me")
    proj = root / "proj"
    old_model(proj)
    for sub in ("src", ".git"):
        (proj / sub).mkdir()
        (proj / sub / "main.py").write_text("code")
    (proj / "notes.md").write_text("notes")
    (proj / "train.log").write_text("log")
    (root / "configonly").mkdir()
    (root / "configonly" / "config.json").write_text("{}")
    (root / "afile").write_text("a file")
    before = snapshot(tmp_path)
    cases = {
        "notamodel": f"{REFUSE_FOREIGN} precious.txt; move those out or choose another -o",
        "proj": f"{REFUSE_FOREIGN} .git/, notes.md, src/ (and 1 more); move those out or choose another -o",
        "configonly": "holds no model weights (*.safetensors); --overwrite replaces only a model folder",
        "afile": "exists and is not a folder; leanmerge replaces only model folders",
    }
    for name, why in cases.items():
        one_error(CliRunner().invoke(main, argv(base, model, root / name, "--overwrite")), f"{root / name}: {why}")
    one_error(
        CliRunner().invoke(main, argv(base, model, model, "--overwrite")),
        f"{model}: output overlaps input folder {model}; choose another output",
    )
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_a_model_folder_with_the_same_bytes(
    family: tuple[Path, Path, bytes], tmp_path: Path
) -> None:
    base, model, want = family
    out = tmp_path / "merged"
    old_model(out)
    (out / "model-00001-of-00002.safetensors").write_text("a stale shard name")
    result = CliRunner().invoke(main, argv(base, model, out))
    one_error(result, f"{out}: output already exists; pass --overwrite to replace it")
    result = CliRunner().invoke(main, argv(base, model, out, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert (out / SINGLE_NAME).read_bytes() == want
    assert not (out / "model-00001-of-00002.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    empty = tmp_path / "empty"  # an empty folder is taken as if absent
    empty.mkdir()
    assert CliRunner().invoke(main, argv(base, model, empty)).exit_code == 0
    assert (empty / SINGLE_NAME).read_bytes() == want


def test_never_the_working_directory_or_above(
    family: tuple[Path, Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, model, _ = family
    here = tmp_path / "work" / "here"
    here.parent.mkdir()
    old_model(here)  # a model folder by content: only being the working directory protects it
    monkeypatch.chdir(here)
    before = snapshot(tmp_path)
    for out, refused in ((".", here), ("..", here.parent), ("../here/", here)):
        result = CliRunner().invoke(main, argv(base, model, out, "--overwrite"))
        one_error(result, f"{refused}: is the working directory or a folder above it; choose a new folder as -o")
    assert snapshot(tmp_path) == before


def test_planted_lock_link_is_not_followed_in_a_real_process(family: tuple[Path, Path, bytes], tmp_path: Path) -> None:
    base, model, _ = family
    out = tmp_path / "merged"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    lock_path(out).symlink_to(victim)
    before = snapshot(tmp_path)
    proc = real_process(argv(base, model, out), tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"Error: {lock_path(out)}: a symbolic link where leanmerge keeps its lock file; remove it (it was not followed)"
    ]
    assert snapshot(tmp_path) == before


def test_planted_links_and_files_are_refused(family: tuple[Path, Path, bytes], tmp_path: Path) -> None:
    base, model, _ = family
    root = tmp_path / "out-root"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    old_model(elsewhere)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = root / "merged"

    def refused(extra: list[str], line: str, target: Path = out) -> None:
        before = snapshot(tmp_path)
        one_error(CliRunner().invoke(main, argv(base, model, target, *extra)), line)
        assert snapshot(tmp_path) == before

    os.link(victim, lock_path(out))
    refused(
        [],
        f"{lock_path(out)}: a hard link to another file where leanmerge keeps its lock file; remove it (it was left unchanged)",
    )
    lock_path(out).unlink()
    tmp = temp_dir_for(out)
    tmp.symlink_to(elsewhere)
    why = f"a symbolic link (to {elsewhere}) where leanmerge keeps its temporary folder"
    for extra in ([], ["--resume"]):
        refused(extra, f"{tmp}: {why}; remove the link (nothing was followed or written)")
    tmp.unlink()
    old_dir_for(out).symlink_to(elsewhere)
    refused([], f"{old_dir_for(out)}: not a folder leanmerge left (a link or a file at its reserved name); remove it")
    old_dir_for(out).unlink()
    out.symlink_to(tmp_path / "nowhere")
    link = f"{out}: is a symbolic link (to {tmp_path / 'nowhere'}, which does not exist)"
    refused([], f"{link}; give the real folder as -o, or remove the link")
    out.unlink()
    out.symlink_to(elsewhere)
    refused(
        ["--overwrite"], f"{out}: is a symbolic link (to {elsewhere}); give the real folder as -o, or remove the link"
    )


def test_a_held_lock_refuses_a_second_process(family: tuple[Path, Path, bytes], tmp_path: Path) -> None:
    base, model, _ = family
    out = tmp_path / "merged"
    fd = os.open(lock_path(out), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        before = snapshot(tmp_path)
        proc = real_process(argv(base, model, out, "--overwrite"), tmp_path)
        assert proc.returncode == 1 and proc.stdout == ""
        assert proc.stderr.splitlines() == [
            f"Error: {out}: another leanmerge process (pid {os.getpid()}) is writing this output"
        ]
        assert snapshot(tmp_path) == before
    finally:
        os.close(fd)


def test_output_that_appears_during_the_run_is_not_replaced(family: tuple[Path, Path, bytes], tmp_path: Path) -> None:
    """Checked under the lock at the start and again at commit: what appeared meanwhile (another
    program's folder) is kept, and so is the finished merge."""
    base, model, want = family
    out = tmp_path / "merged"
    tmp = temp_dir_for(out)

    def appear(files: dict[str, str]) -> Any:
        def on_event(e: dict[str, Any]) -> None:
            if e["event"] == "plan":
                out.mkdir()
                for name, text in files.items():
                    (out / name).write_text(text)

        return on_event

    spec = MergeSpec("task_arithmetic", base, (ModelRef(model, {}),), {})
    with pytest.raises(OutputError) as err:
        merge(spec, out, on_event=appear({"theirs.txt": "theirs"}))
    assert str(err.value) == (
        f"{out}: appeared while this merge ran; the finished merge is kept in {tmp}: move it where you want it "
        "(or remove what appeared and run the same command again)"
    )
    assert snapshot(out) == {"theirs.txt": b"theirs"}
    assert (tmp / SINGLE_NAME).read_bytes() == want
    for p in (out, tmp):
        for f in p.iterdir():
            f.unlink()
        p.rmdir()
    with pytest.raises(OutputError) as err:
        merge(spec, out, overwrite=True, on_event=appear({"theirs.txt": "theirs"}))
    assert str(err.value) == f"{out}: {REFUSE_FOREIGN} theirs.txt; move those out or choose another -o"
    assert snapshot(out) == {"theirs.txt": b"theirs"}


def test_a_commit_stopped_between_its_renames_is_undone(
    family: tuple[Path, Path, bytes], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Killed after `out -> .old`, before `tmp -> out`: the old model is the only copy and is put
    back; killed after both renames, before `.old` was removed: `.old` goes."""
    base, model, want = family
    out = tmp_path / "merged"
    old_model(old_dir_for(out))
    parked = snapshot(old_dir_for(out))
    result = CliRunner().invoke(main, argv(base, model, out))
    one_error(result, f"{out}: output already exists; pass --overwrite to replace it")
    assert caplog.messages == [
        f"{out}: put back the previous model from {old_dir_for(out)} (a run was stopped while replacing it)"
    ]
    assert snapshot(out) == parked and not old_dir_for(out).exists()
    old_model(old_dir_for(out))
    result = CliRunner().invoke(main, argv(base, model, out, "--overwrite", "--resume"))
    assert result.exit_code == 0, result.output
    assert (out / SINGLE_NAME).read_bytes() == want
    assert not old_dir_for(out).exists() and not temp_dir_for(out).exists()
    old_dir_for(out).mkdir()  # not what a commit parks there: left alone
    (old_dir_for(out) / "precious.txt").write_text("keep me")
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, argv(base, model, out, "--overwrite"))
    why = "holds more than the model a stopped --overwrite parks there; move it away (left unchanged)"
    one_error(result, f"{old_dir_for(out)}: {why}")
    assert snapshot(tmp_path) == before
