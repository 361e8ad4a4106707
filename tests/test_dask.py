"""The Dask executor: a local cluster of worker processes (loopback only) writes the same bytes as
the local executor, survives a killed worker, and a killed job resumes to the same bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from click.testing import CliRunner
from test_resume import digests

from engine import MergeSpec, ModelRef, merge
from engine.cli import main
from engine.io.output import temp_dir_for

from conftest import write_family

distributed = pytest.importorskip("distributed")
from engine.cluster.runner import DaskRunner  # noqa: E402

SHAPES = {f"layers.{i}.w": (257, 96) for i in range(6)} | {"embed": (37, 24), "norm": (96,), "scale": ()}
BLOCK = 2048  # 10 rows of 96 bf16 per block
BAND = 24 << 10  # 4 blocks of 3 streams (5760 bytes each) per task: 7 tasks for each big tensor
METHODS = {
    "dare_ties": {"density": 0.5},
    "ties": {"density": 0.3},
    "slerp": {"t": 0.3},
}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return write_family(tmp_path_factory.mktemp("dask"), 2, shapes=SHAPES, seed=5, base_shards=2)


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """One local cluster of 2 worker processes for the module (starting one takes seconds)."""
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


def spec_for(family: tuple[Path, list[Path]], method: str) -> MergeSpec:
    base, models = family
    weights = {} if method == "slerp" else {"weight": 0.6}
    return MergeSpec(method, base, tuple(ModelRef(m, weights) for m in models[: 1 if method == "slerp" else 2]),
                     METHODS[method], seed=11)  # fmt: skip


@pytest.fixture(scope="module")
def local(family: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """Each method merged by the local executor (holding tensors where it can)."""
    root = tmp_path_factory.mktemp("local")
    for method in METHODS:
        merge(spec_for(family, method), root / method, block_bytes=BLOCK)
    return {m: digests(root / m) for m in METHODS}


@pytest.mark.parametrize("method", list(METHODS))
def test_two_workers_write_the_local_bytes(
    method: str, family: tuple[Path, list[Path]], local: dict[str, dict[str, str]], client: Any, tmp_path: Path
) -> None:
    events: list[dict[str, Any]] = []
    report = merge(spec_for(family, method), tmp_path / "out", block_bytes=BLOCK, hold=False,
                   runner=DaskRunner(client, 1, BAND), on_event=events.append)  # fmt: skip
    assert digests(tmp_path / "out") == local[method]
    assert report.blocks == 6 * 26 + 3  # 26 blocks of 10 rows per layer; embed, norm and scale one each
    assert sorted(e["name"] for e in events if e["event"] == "tensor") == sorted(SHAPES)
    assert CliRunner().invoke(main, ["verify", str(tmp_path / "out")]).exit_code == 0


def test_two_workers_write_the_local_zarr_chunks(family: tuple[Path, list[Path]], client: Any, tmp_path: Path) -> None:
    """Workers write disjoint whole chunks of a zarr output: every file equals the local zarr merge's."""
    spec = spec_for(family, "dare_ties")
    merge(spec, tmp_path / "a" / "out", block_bytes=BLOCK, out_format="zarr", compress="zstd")
    merge(spec, tmp_path / "b" / "out", block_bytes=BLOCK, hold=False, runner=DaskRunner(client, 1, BAND),
          out_format="zarr", compress="zstd")  # fmt: skip
    want = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    assert {p.relative_to(tmp_path / "b"): p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()} == want
    assert len(want) > 6 * 26  # one file per chunk: 26 chunks of 8 rows per layer and more
    assert CliRunner().invoke(main, ["verify", str(tmp_path / "b" / "out")]).exit_code == 0


def test_a_killed_worker_is_replaced_and_the_bytes_stay(
    family: tuple[Path, list[Path]], local: dict[str, dict[str, str]], client: Any, tmp_path: Path
) -> None:
    pids = list(client.run(os.getpid).values())
    killed: list[int] = []

    def kill_one(e: dict[str, Any]) -> None:
        if e["event"] == "block" and not killed:  # the first band is in: the others are being written
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    merge(spec_for(family, "dare_ties"), tmp_path / "out", block_bytes=BLOCK, hold=False,
          runner=DaskRunner(client, 1, BAND), on_event=kill_one)  # fmt: skip
    assert killed and not psutil.pid_exists(killed[0])
    assert digests(tmp_path / "out") == local["dare_ties"]
    client.wait_for_workers(2, timeout=60)  # the nanny restarted it, for the next test


def cli_args(family: tuple[Path, list[Path]], out: Path) -> list[str]:
    base, models = family
    return [
        "merge", "--method", "dare_ties", "--base", str(base), *(x for m in models for x in ("--model", f"{m}:0.6")),
        "--density", "0.5", "--seed", "11", "--block-size", "2KiB", "--executor", "dask", "--band-size", "12KiB",
        "-o", str(out),
    ]  # fmt: skip


@pytest.mark.slow
def test_a_killed_job_resumes_to_the_same_bytes(
    family: tuple[Path, list[Path]], local: dict[str, dict[str, str]], client: Any, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    journal = temp_dir_for(out) / "journal.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", *cli_args(family, out), "--workers", "2"],
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count('"b":') >= 3:
            break
        time.sleep(0.005)
    workers = psutil.Process(proc.pid).children(recursive=True)  # the local cluster's processes
    proc.kill()
    proc.communicate(timeout=60)
    for w in workers:  # orphaned by the kill (on a real cluster they outlive the driver anyway)
        w.kill()
    assert not out.exists() and journal.exists(), "the job finished before it was killed"
    bands = 6 * 13 + 3  # 2 blocks per band (12 KiB of input), and one band for each small tensor
    journaled = journal.read_text().count('"b":')
    args = [*cli_args(family, out), "--scheduler", client.scheduler.address, "--resume"]
    with distributed.get_task_stream(client) as tasks:
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    redone = len({t["key"] for t in tasks.data if str(t["key"]).startswith("leanmerge-band-")})
    assert redone == bands - journaled  # only the bands the killed job had not journaled
    assert digests(out) == local["dare_ties"]
    assert not temp_dir_for(out).exists()


def test_flags_need_the_dask_executor_and_dask(family: tuple[Path, list[Path]], tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(main, [*cli_args(family, tmp_path / "o")[:-6], "--executor", "local", "--workers", "2",
                                       "-o", str(tmp_path / "o")])  # fmt: skip
    assert result.exit_code == 2 and "--workers need --executor dask" in result.output
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if not installed
    result = CliRunner().invoke(main, cli_args(family, tmp_path / "o"))
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "Error: --executor dask needs dask and distributed, which are not installed: pip install 'leanmerge[dask]'"
    )
    assert not (tmp_path / "o").exists()


def test_plan_shows_the_budget_per_worker(family: tuple[Path, list[Path]]) -> None:
    args = cli_args(family, Path("unused"))[:-2]
    result = CliRunner().invoke(main, ["plan", *args[1:], "--workers", "3", "--max-memory", "1GiB"])
    assert result.exit_code == 0, result.output
    assert "memory budget 1 GiB: " in result.output
    assert result.output.rstrip().endswith(
        "executor dask on 3 local worker processes: the memory budget and predicted peak RSS above are per worker"
    )


@pytest.mark.parametrize("executor", ["dask", "local"])
def test_sweep_points_are_the_single_merges(
    executor: str, family: tuple[Path, list[Path]], client: Any, tmp_path: Path
) -> None:
    merge_args = cli_args(family, tmp_path / "unused")[:-6]  # the merge command without its executor and output
    args = ["sweep", *merge_args[1:], "--grid", "density=0.3,0.6", "-o", str(tmp_path / "sweep")]
    if executor == "dask":
        (tmp_path / "scheduler.json").write_text(
            json.dumps({"address": client.scheduler.address})
        )  # as `dask scheduler --scheduler-file` writes it
        args += ["--executor", "dask", "--scheduler", str(tmp_path / "scheduler.json"), "--band-size", "24KiB"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["density=0.3", "density=0.6"]
    for density in ("0.3", "0.6"):
        alone = tmp_path / "alone" / f"density={density}"  # the same name: the model card titles it
        single = CliRunner().invoke(main, [*merge_args, "--density", density, "-o", str(alone)])
        assert single.exit_code == 0, single.output
        point = tmp_path / "sweep" / f"density={density}"
        assert digests(point) == digests(alone)
        assert (point / "README.md").read_text() == (alone / "README.md").read_text()


def test_sweep_grid_errors(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    args = ["sweep", *cli_args(family, tmp_path / "unused")[1:-6], "-o", str(tmp_path / "sweep")]
    result = CliRunner().invoke(main, [*args, "--grid", "size=1,2"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "Error: --grid 'size=1,2': 'size' cannot be swept; one of seed, weight, lambda, density, t, gamma, epsilon, "
        "normalize, rescale"
    )
    result = CliRunner().invoke(main, [*args, "--grid", "seed=1,x"])
    assert result.output.strip().splitlines()[-1].startswith("Error: --grid 'seed=1,x': value 'x' of seed: invalid")
    assert not (tmp_path / "sweep").exists()
