"""Zarr models at store URLs: merges read inputs from and write outputs to `memory://` (and
`file://`, a local path) byte for byte as the local zarr merge; resume, --overwrite and damage
behave as they do for folders, and nothing is left behind where the store is not ours."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fsspec
import pytest
from click.testing import CliRunner
from test_convert import same_tensors

from engine import MergeSpec, ModelRef, merge
from engine.cli import main
from engine.convert import convert
from engine.errors import CheckpointError, OutputError, ResumeError, SpecError
from engine.io.output import temp_dir_for
from engine.verify import verify

from conftest import valid_spec, write_family

SHAPES = {"layers.0.w": (37, 12), "layers.1/odd name%": (5, 3, 4), "norm": (12,), "scale": ()}
MEM = fsspec.filesystem("memory")


def files_at(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def files_in_store(url: str) -> dict[str, bytes]:
    path = url.removeprefix("memory://")
    return {p[len(path) + 2 :]: MEM.cat_file(p) for p in MEM.find("/" + path)}


def fresh_url(name: str = "m") -> str:
    return f"memory://t-{uuid.uuid4().hex[:8]}/{name}"


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    base, models = write_family(tmp_path_factory.mktemp("zurl"), 2, shapes=SHAPES, seed=7, base_shards=2)
    (base / "config.json").write_text('{"model_type": "llama"}')
    return base, models


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The local work folder of URL outputs (journal, side files, lock): under tmp_path, via HOME."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home" / ".cache" / "leanmerge" / "stores"


def local_zarr(spec: MergeSpec, out: Path) -> dict[str, bytes]:
    merge(spec, out, block_bytes=200, handle_signals=False, out_format="zarr", compress="zstd")
    return files_at(out)


def test_merge_to_memory_and_file_urls_is_the_local_zarr_merge(
    family: tuple[Path, list[Path]], tmp_path: Path, work: Path
) -> None:
    spec = valid_spec("dare_ties", *family)
    want = local_zarr(spec, tmp_path / "a" / "m")  # the same name: the model card names it
    url = fresh_url()
    report = merge(spec, url, block_bytes=200, handle_signals=False, out_format="zarr", compress="zstd")
    assert report.output == url and files_in_store(url) == want
    assert MEM.find("/" + url[9:].rpartition("/")[0]) == [f"/{url[9:]}/{k}" for k in sorted(want)]  # no temp left
    assert not any(work.iterdir())  # journal, side files and lock gone
    base, models = family
    args = ["merge", "--method", "dare_ties", "--base", str(base), *(x for m in models for x in ("--model", str(m))),
            "--density", "0.5", "--block-size", "200", "--format", "zarr", "--compress", "zstd"]  # fmt: skip
    assert CliRunner().invoke(main, [*args, "-o", str(tmp_path / "b" / "m")]).exit_code == 0
    done = CliRunner().invoke(main, [*args, "-o", f"file://{tmp_path}/c/m"])
    assert done.exit_code == 0, done.output
    assert files_at(tmp_path / "c" / "m") == files_at(tmp_path / "b" / "m")


def test_a_url_input_merges_like_the_local_one_and_a_change_stops_resume(
    family: tuple[Path, list[Path]], tmp_path: Path, work: Path
) -> None:
    base, models = family
    url = fresh_url("ft")
    convert(models[0], url, "zarr", compress="blosc", handle_signals=False)
    params = {"density": 0.5}
    local = MergeSpec("dare_ties", base, (ModelRef(models[0], {"weight": 0.7}),), params)
    remote = MergeSpec("dare_ties", base, (ModelRef(Path(url), {"weight": 0.7}),), params)
    merge(local, tmp_path / "a" / "out", block_bytes=100)
    yaml = tmp_path / "m.yml"
    yaml.write_text(f"merge_method: dare_ties\nbase_model: {base}\nparameters: {{density: 0.5}}\n"
                    f"models:\n  - model: {url}\n    parameters: {{weight: 0.7}}\n")  # fmt: skip
    done = CliRunner().invoke(main, ["merge", str(yaml), str(tmp_path / "b" / "out"), "--block-size", "100"])
    assert done.exit_code == 0, done.output
    same_tensors(tmp_path / "a" / "out", tmp_path / "b" / "out")

    def stop(e: dict[str, object]) -> None:
        if e["event"] == "tensor":
            raise KeyboardInterrupt  # a crash after the first tensor

    with pytest.raises(KeyboardInterrupt):
        merge(remote, tmp_path / "c", block_bytes=100, sync_every=1, on_event=stop, handle_signals=False)
    key = f"{url[9:]}/model.zarr/norm/zarr.json"
    meta = json.loads(MEM.cat_file(key))
    meta["attributes"]["leanmerge"]["chunk_crc32"] = ["00000000"]  # rewritten: chunks and record replaced
    MEM.pipe_file(key, json.dumps(meta).encode())
    with pytest.raises(ResumeError, match=rf"the inputs changed .*input {url}/model.zarr/norm has another header"):
        merge(remote, tmp_path / "c", block_bytes=100, resume=True, handle_signals=False)


def test_a_killed_url_merge_resumes_and_overwrite_replaces_only_a_model(
    family: tuple[Path, list[Path]], tmp_path: Path, work: Path
) -> None:
    spec = valid_spec("ties", *family)
    want = local_zarr(spec, tmp_path / "a" / "m")
    url = fresh_url()
    kw = {"block_bytes": 200, "handle_signals": False, "out_format": "zarr", "compress": "zstd", "sync_every": 1}

    def stop(e: dict[str, object]) -> None:
        if e["event"] == "tensor":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge(spec, url, on_event=stop, **kw)  # type: ignore[arg-type]
    assert not MEM.exists("/" + url[9:])  # nothing at the target: the chunks are in the temporary location
    with pytest.raises(OutputError, match="an interrupted run left this folder; run the same command with --resume"):
        merge(spec, url, **kw)  # type: ignore[arg-type]
    report = merge(spec, url, resume=True, **kw)  # type: ignore[arg-type]
    assert report.resumed_tensors >= 1 and files_in_store(url) == want
    with pytest.raises(OutputError, match=f"^{url}: output already exists; pass --overwrite"):
        merge(spec, url, **kw)  # type: ignore[arg-type]
    other = valid_spec("linear", *family)
    merge(other, url, overwrite=True, **kw)  # type: ignore[arg-type]
    assert files_in_store(url) == local_zarr(other, tmp_path / "b" / "m")
    MEM.pipe_file(f"{url[9:]}/notes.txt", b"mine")
    with pytest.raises(
        OutputError, match="replaces only a leanmerge zarr model and this location also holds notes.txt"
    ):
        merge(spec, url, overwrite=True, **kw)  # type: ignore[arg-type]
    assert MEM.cat_file(f"{url[9:]}/notes.txt") == b"mine"
    foreign = fresh_url()
    MEM.pipe_file(f"{foreign[9:]}/config.json", b"x")  # a model file's name, but no model of ours
    with pytest.raises(OutputError, match="holds no finished leanmerge zarr model"):
        merge(spec, foreign, overwrite=True, **kw)  # type: ignore[arg-type]
    assert files_in_store(foreign) == {"config.json": b"x"}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda u: MEM.rm(f"{u[9:]}/model.zarr/layers.0.w/c/1/0"), "/model.zarr/layers.0.w: chunk 1 of tensor 'layers.0.w' is missing"),
        (lambda u: MEM.pipe_file(f"{u[9:]}/model.zarr/norm/zarr.json", b'{"shape": ['), "/model.zarr: cannot read the zarr metadata"),
        (lambda u: MEM.rm(f"{u[9:]}/model.zarr/zarr.json"), ": no zarr model at this URL (model.zarr/zarr.json is missing)"),
    ],
    ids=["missing-chunk", "bad-json", "no-group"],
)  # fmt: skip
def test_damaged_url_input_is_one_line_and_leaves_nothing(
    damage: object, message: str, family: tuple[Path, list[Path]], tmp_path: Path, work: Path
) -> None:
    base, models = family
    url = fresh_url("ft")
    convert(models[0], url, "zarr", handle_signals=False)
    damage(url)  # type: ignore[operator]
    out = fresh_url()
    args = ["merge", "--method", "task_arithmetic", "--base", str(base), "--model", url, "-o", out,
            "--format", "zarr", "--block-size", "100"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert f"Error: {url}" in result.output and message in result.output, result.output
    assert not MEM.exists("/" + out[9:].rpartition("/")[0])  # neither the output nor its temporary location
    assert not work.exists() or not any(work.iterdir())
    with pytest.raises(CheckpointError):
        merge(MergeSpec("task_arithmetic", base, (ModelRef(Path(url), {}),), {}), tmp_path / "o", block_bytes=100)
    assert not (tmp_path / "o").exists() and not temp_dir_for(tmp_path / "o").exists()


def test_url_errors_are_one_line(family: tuple[Path, list[Path]], tmp_path: Path, work: Path) -> None:
    spec = valid_spec("linear", *family)
    with pytest.raises(SpecError, match=r"^memory://x/m: a store URL takes --format zarr only: safetensors shards"):
        merge(spec, "memory://x/m")
    with pytest.raises(OutputError, match=r"^s3://bucket/m: s3:// URLs need .* pip install 'leanmerge\[s3\]'$"):
        merge(spec, "s3://bucket/m", out_format="zarr")
    s3_input = MergeSpec("linear", family[0], (ModelRef(Path("s3://bucket/ft"), {}),), {})
    with pytest.raises(CheckpointError, match=r"^s3://bucket/ft/model.zarr: s3:// URLs need .*leanmerge\[s3\]'$"):
        merge(s3_input, tmp_path / "o")
    with pytest.raises(OutputError, match=r"^memory://m: give a folder inside the store"):
        merge(spec, "memory://m", out_format="zarr")


@pytest.mark.slow
def test_a_killed_merge_to_a_file_url_resumes_to_the_same_bytes(
    family: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, models = family
    args = ["merge", "--method", "dare_ties", "--base", f"file://{base}", *(x for m in models for x in ("--model", f"{m}:0.4")),
            "--density", "0.5", "--seed", "3", "--block-size", "64", "--sync-every", "64", "--format", "zarr"]  # fmt: skip
    whole = tmp_path / "a" / "m"
    assert CliRunner().invoke(main, [*args, "-o", str(whole)]).exit_code == 0
    out = tmp_path / "b" / "m"
    journal = temp_dir_for(out) / "journal.jsonl"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", *args, "-o", f"file://{out}"], env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (journal.is_file() and journal.read_text().count('"b"') >= 3):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert journal.is_file() and not out.exists()
    result = CliRunner().invoke(main, [*args, "-o", f"file://{out}", "--resume"])
    assert result.exit_code == 0, result.output
    assert files_at(out) == files_at(whole)


def test_a_stopped_commit_is_finished_by_the_next_run(
    family: tuple[Path, list[Path]], tmp_path: Path, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = valid_spec("linear", *family)
    want = local_zarr(spec, tmp_path / "a" / "m")
    url = fresh_url()
    kw = {"block_bytes": 200, "handle_signals": False, "out_format": "zarr", "compress": "zstd"}
    merge(valid_spec("task_arithmetic", *family), url, **kw)  # type: ignore[arg-type]
    copied: list[str] = []
    real_copy = MEM.copy

    def copy_then_stop(src: str, dst: str) -> None:
        if len(copied) == 3:
            raise KeyboardInterrupt  # killed while copying the finished group into place
        copied.append(src)
        real_copy(src, dst)

    monkeypatch.setattr(MEM, "copy", copy_then_stop)
    with pytest.raises(KeyboardInterrupt):
        merge(spec, url, overwrite=True, **kw)  # type: ignore[arg-type]
    monkeypatch.setattr(MEM, "copy", real_copy)
    assert not MEM.exists(f"{url[9:]}/model.zarr/zarr.json")  # the old model's marker went first: no model there
    with pytest.raises(OutputError, match="output already exists"):  # after finishing the stopped commit
        merge(spec, url, **kw)  # type: ignore[arg-type]
    assert files_in_store(url) == want


def test_one_writer_per_url(family: tuple[Path, list[Path]], work: Path) -> None:
    from engine.io.lock import output_lock
    from engine.io.zarr_url import StoreTarget

    url = fresh_url()
    work.mkdir(parents=True)
    with output_lock(StoreTarget.of(url, work).anchor), pytest.raises(OutputError) as e:
        merge(valid_spec("linear", *family), url, out_format="zarr", handle_signals=False)
    assert str(e.value) == f"{url}: another leanmerge process (pid {os.getpid()}) is writing this output"
    assert not MEM.exists("/" + url[9:].rpartition("/")[0])


def test_verify_checks_a_zarr_model_at_a_url(family: tuple[Path, list[Path]], tmp_path: Path, work: Path) -> None:
    spec = valid_spec("task_arithmetic", *family)
    url = fresh_url()
    merge(spec, url, block_bytes=200, handle_signals=False, out_format="zarr")
    merge(spec, tmp_path / "m", block_bytes=200, handle_signals=False, out_format="zarr")
    assert verify(url, spec).ok and verify(f"file://{tmp_path}/m", spec).ok
    ok = CliRunner().invoke(main, ["verify", f"file://{tmp_path}/m"])
    assert ok.exit_code == 0 and ok.output.startswith(f"{tmp_path}/m: OK, 4 tensors"), ok.output
    chunk = f"{url[9:]}/model.zarr/layers.0.w/c/1/0"
    data = bytearray(MEM.cat_file(chunk))
    data[5] ^= 1
    MEM.pipe_file(chunk, bytes(data))
    MEM.pipe_file(f"{url[9:]}/config.json", b"{}")
    result = CliRunner().invoke(main, ["verify", url])
    lines = result.output.splitlines()
    assert result.exit_code == 1 and lines[-1] == f"Error: {url}: 2 problem(s) in 4 tensors", result.output
    assert lines[0].startswith("FAIL config.json: sha256 ") and lines[1].startswith("FAIL layers.0.w: chunk 1 crc32 ")
    missing = CliRunner().invoke(main, ["verify", fresh_url()])
    assert missing.exit_code == 1 and missing.output.endswith(
        ": no zarr model at this URL (model.zarr/zarr.json is missing); verify reads safetensors folders "
        "from local paths only\n"
    ), missing.output
