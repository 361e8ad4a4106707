"""The benchmark suite end to end on the tiniest family: every figure lands in the JSON.

Numbers are not asserted (they depend on the machine); their presence and shape are, and so is
the one property every RSS figure rests on: a child's peak RSS is its own, not the runner's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from bench.common import RunFailed, measured, run_mergekit, stats
from bench.naive_merge import naive_merge
from tools.make_synthetic import PRESETS, make_family

from reference import merge_folders

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"rss_vs_budget", "rss_vs_size", "throughput"}
MACHINE_KEYS = {
    "cpu",
    "cores",
    "ram_total",
    "disk",
    "python",
    "torch",
    "commit",
    "dirty",
    "device",
    "hostname",
    "timestamp",
}


def run_module(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m MODULE ARGS` from the repository root, as a user runs the benchmarks."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def assert_stats(fig: dict[str, Any]) -> None:
    assert {"min", "median", "max", "runs"} <= set(fig)
    assert fig["min"] <= fig["median"] <= fig["max"]


@pytest.mark.slow
def test_quick_run_writes_every_figure_and_cleans_up(tmp_path: Path) -> None:
    cache, results = tmp_path / "cache", tmp_path / "results"
    args = ["--quick", "--sizes", "tiny", "--methods", "task_arithmetic", "--budgets", "512MiB,1GiB"]
    done = run_module("bench", *args, "--cache", str(cache), "--results", str(results))
    assert done.returncode == 0, done.stderr[-3000:]

    (path,) = results.glob("*.json")
    data = json.loads(path.read_text())
    assert set(data["machine"]) >= MACHINE_KEYS
    assert data["machine"]["commit"] and data["machine"]["cpu"]
    assert data["mode"] == "quick"
    assert set(data["sections"]) == SECTIONS
    for sec in data["sections"].values():
        assert sec["runs"]
        for run in sec["runs"]:
            assert "error" not in run, run["error"]
            for fig in ("peak_rss", "wall_s", "wall_s_process", "gbps"):
                assert_stats(run[fig])
    budget_runs = data["sections"]["rss_vs_budget"]["runs"]
    assert {r["budget"] for r in budget_runs if r["tool"] == "leanmerge"} == {512 << 20, 1 << 30}
    assert all(isinstance(r["within_budget"], bool) for r in budget_runs if r["tool"] == "leanmerge")
    assert {"leanmerge", "naive"} <= {r["tool"] for r in data["sections"]["rss_vs_size"]["runs"]}
    tp = data["sections"]["throughput"]
    assert_stats(tp["read_limit_gbps"])
    assert_stats(tp["read_limit_all_gbps"])
    cold_runs = sum(r["cache"] == "cold" for r in tp["runs"])  # leanmerge's and naive's
    assert tp["read_limit_all_gbps"]["runs"] == 1 + cold_runs  # one up front, one before each cold run
    assert all(r["cache"] == "warm" or "read_limit_gbps" in r for r in tp["runs"])
    assert {(r["tool"], r["cache"]) for r in tp["runs"]} >= {
        ("leanmerge", "cold"),
        ("leanmerge", "warm"),
        ("naive", "cold"),
    }
    assert all("ratio" in r for r in tp["runs"])
    assert tp["scratch"] is None  # outputs beside the inputs unless --scratch
    for r in tp["runs"]:  # the disk's figure counts the output too: never below the input's
        if r["tool"] == "leanmerge":
            assert r["disk_ratio"]["median"] > r["ratio"]["median"]
    assert path.with_suffix(".txt").read_text().startswith("leanmerge bench")
    assert done.stdout.startswith("leanmerge bench")
    assert not (cache / "tmp").exists(), "merge outputs must be deleted after each run"

    assert run_module("bench", "--clean", "--cache", str(cache)).returncode == 0
    assert not cache.exists()


def test_child_peak_rss_excludes_the_runner(tmp_path: Path) -> None:
    """`wait4` from a big process reports that process's RSS for a tiny child (vfork + exec);
    the lean launcher must keep this process's ballast out of the child's figure."""
    ballast = b"\1" * (256 << 20)  # written, so resident
    figures = measured([sys.executable, "-c", "pass"], tmp_path, "noop")
    assert figures["returncode"] == 0
    assert figures["peak_rss"] < 100 << 20, figures
    del ballast


def test_a_run_past_its_timeout_is_killed_with_its_launcher(tmp_path: Path) -> None:
    """A hung merge must not spend a lent machine's budget: the command and the launcher between
    them both go (a child left behind would keep running), and the failure says why."""
    pid_file = tmp_path / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    with pytest.raises(RunFailed, match=r"sleeper timed out after 3 s and was killed"):
        measured([sys.executable, "-c", code], tmp_path, "sleeper", timeout_s=3)
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # gone and reaped (its parent, the launcher, died too)
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)


def test_naive_baseline_computes_the_real_merge(tmp_path: Path) -> None:
    """The baseline's cost means something only if it does the same work: task arithmetic equal
    to the whole-tensor reference."""
    base, models = make_family(tmp_path / "fam", PRESETS["tiny"], n_models=3)
    naive_merge("task_arithmetic", base, models, tmp_path / "out", density=1.0, seed=0)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = merge_folders("task_arithmetic", base, models)
    assert set(got) == set(want)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_stats() -> None:
    assert stats([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0, "runs": 3, "values": [3.0, 1.0, 2.0]}
    with pytest.raises(ValueError):
        stats([])


@pytest.mark.slow
def test_memory_check_reports_peak_against_the_ceiling(tmp_path: Path) -> None:
    args = ["--preset", "tiny", "--cache", str(tmp_path / "c"), "--results", str(tmp_path / "r")]
    done = run_module("bench.bench_memory", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = (tmp_path / "r").glob("memory-*.json")
    data = json.loads(path.read_text())
    assert data["ceiling"] == 1 << 30 and data["machine"]["commit"]
    assert {r["method"] for r in data["runs"]} == {"task_arithmetic", "dare_ties"}
    for r in data["runs"]:
        assert_stats(r["peak_rss"])
        assert r["within_budget"] is True


def test_mergekit_gets_the_same_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The peer column runs `mergekit-yaml` on the same inputs and weights; linear is given no
    base_model (mergekit 0.1.5 refuses one without a weight; leanmerge's linear ignores the base),
    slerp leanmerge's default t (mergekit requires one)."""

    fake = tmp_path / "bin" / "mergekit-yaml"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\ncp "$1" "$2.config"\n')  # records the config it was given
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    base, models = tmp_path / "base", [tmp_path / "ft1", tmp_path / "ft2"]
    for method, params in [("linear", {}), ("dare_ties", {"density": 0.5})]:
        out = tmp_path / method
        r = run_mergekit(method, base, models, out, params)
        assert r is not None and r["tool"] == "mergekit" and r["peak_rss"] > 0
        config = yaml.safe_load(Path(f"{out}.config").read_text())
        assert config["merge_method"] == method
        assert ("base_model" in config) == (method != "linear")
        assert [m["model"] for m in config["models"]] == [str(m.resolve()) for m in models]
        assert all(m["parameters"] == {"weight": 1.0, **params} for m in config["models"])
        assert "parameters" not in config
    run_mergekit("slerp", base, models[:1], tmp_path / "slerp", {})  # mergekit has no default t
    assert yaml.safe_load(Path(f"{tmp_path / 'slerp'}.config").read_text())["parameters"] == {"t": 0.5}


def test_throughput_measures_only_the_cache_states_asked_for(tmp_path: Path) -> None:
    """`--caches cold` halves a long run: no warm entry, and no warm run behind one."""
    from bench.sections import Settings, throughput

    s = Settings(tmp_path, 1, "tiny", ("tiny",), methods=("linear",), baselines=(), caches=("cold",))
    section = throughput(s)
    assert [(r["tool"], r["method"], r["cache"]) for r in section["runs"]] == [("leanmerge", "linear", "cold")]
    assert section["read_hot_gbps"] is None  # the page-cache read is measured for warm runs only


def test_settings_refuse_unknown_cache_states(tmp_path: Path) -> None:
    from bench.sections import Settings

    for bad in [(), ("hot",)]:
        with pytest.raises(ValueError, match="caches must be among cold, warm"):
            Settings(tmp_path, 1, "tiny", ("tiny",), caches=bad)


def test_size_table_judges_flatness_on_models_larger_than_the_budget() -> None:
    """The flat-RSS claim is about models that outgrow the budget; a tiny model, whose whole
    tensors are smaller than one block, sits lower and must not make the line look steep."""
    from bench.report import size_table

    def run(preset: str, size: int, rss: int) -> dict[str, Any]:
        return {"tool": "leanmerge", "method": "task_arithmetic", "preset": preset, "input_bytes": size,
                "peak_rss": {"median": rss << 20}}  # fmt: skip

    sec = {"budget": 1 << 30, "runs": [run("tiny", 2 << 20, 230), run("mid", 5 << 30, 670), run("big", 24 << 30, 690)]}
    text = "\n".join(size_table(sec))
    assert "larger than the budget (5.37 GB to 25.8 GB): largest / smallest 1.03x" in text
    assert "smaller models never fill the block buffers" in text


def test_input_bytes_counts_what_each_method_reads(tmp_path: Path) -> None:
    """GB/s figures divide by the bytes a merge reads: linear skips the base, slerp takes one model."""
    from bench.families import Family, input_bytes

    fam = Family("p", tmp_path / "base", (tmp_path / "a", tmp_path / "b", tmp_path / "c"), 400, 100, 10)
    assert input_bytes(fam, "task_arithmetic") == 400
    assert input_bytes(fam, "linear") == 300
    assert input_bytes(fam, "slerp") == 200
    assert input_bytes(fam, "passthrough") == 100  # the base alone: it takes no fine-tunes


def test_outputs_go_under_scratch_and_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--scratch` takes the merge outputs off the inputs' disk; nothing is left behind there."""
    import bench.families as families

    seen: list[list[str]] = []

    def fake_run(args: list[str], events: Path) -> dict[str, Any]:
        out = Path(args[args.index("-o") + 1])
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"x")
        seen.append(args)
        return {"wall_s": 1.0}

    monkeypatch.setattr(families, "run_leanmerge", fake_run)
    fam = families.Family("p", tmp_path / "base", (tmp_path / "a",), 2, 1, 1)
    scratch = tmp_path / "scratch"
    assert families.run_tool("leanmerge", fam, "linear", scratch, budget=1 << 30) == {"wall_s": 1.0}
    (args,) = seen
    assert scratch in Path(args[args.index("-o") + 1]).parents
    assert not (scratch / "tmp").exists()


def test_unusable_scratch_is_refused_before_any_work(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = run_module("bench", "--quick", "--cache", str(tmp_path / "cache"), "--scratch", str(blocker / "sub"))
    assert done.returncode == 2
    assert "--scratch" in done.stderr and str(blocker / "sub") in done.stderr
    assert not (tmp_path / "cache").exists()


def run_fake_sections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **runners: Any) -> tuple[int, Path]:
    """`python -m bench` in-process with stand-in sections; its exit code and its results JSON."""
    from click.testing import CliRunner

    import bench.__main__ as bench_main

    for name, fn in runners.items():
        monkeypatch.setitem(bench_main.RUNNERS, name, fn)
    results = tmp_path / "results"
    args = ["--quick", "--sections", ",".join(runners), "--cache", str(tmp_path / "c"), "--results", str(results)]
    done = CliRunner().invoke(bench_main.main, args)
    (path,) = results.glob("*.json")
    assert not list(results.glob(".*.tmp")), "no temporary file is left beside the results"
    return done.exit_code, path


def empty_size_section(s: Any) -> dict[str, Any]:
    return {"budget": 1 << 30, "runs": [], "skipped": []}


def test_a_run_stopped_mid_way_keeps_the_sections_it_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Results are written after every section: a full run stopped in its third hour keeps the first two."""

    def interrupted(s: Any) -> dict[str, Any]:
        raise KeyboardInterrupt

    code, path = run_fake_sections(tmp_path, monkeypatch, rss_vs_size=empty_size_section, throughput=interrupted)
    assert code != 0
    data = json.loads(path.read_text())
    assert set(data["sections"]) == {"rss_vs_size"}
    assert data["unfinished"] == ["throughput"]
    assert "PARTIAL" in path.with_suffix(".txt").read_text()


def test_a_finished_run_is_not_marked_partial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, path = run_fake_sections(tmp_path, monkeypatch, rss_vs_size=empty_size_section)
    assert code == 0
    assert "unfinished" not in json.loads(path.read_text())
    assert "PARTIAL" not in path.with_suffix(".txt").read_text()


def test_a_method_without_fine_tunes_is_skipped_with_its_reason(tmp_path: Path) -> None:
    """passthrough takes no fine-tunes: every section lists it as skipped instead of failing (the
    RSS sections, asked for none of their own methods, take those of --methods)."""
    args = ["--quick", "--family", "tiny", "--sizes", "tiny", "--budgets", "512MiB", "--methods", "passthrough"]
    done = run_module("bench", *args, "--cache", str(tmp_path / "cache"), "--results", str(tmp_path / "results"))
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = (tmp_path / "results").glob("*.json")
    sections = json.loads(path.read_text())["sections"]
    assert set(sections) == {"rss_vs_budget", "rss_vs_size", "throughput"}
    for section in sections.values():
        assert section["runs"] == []
        assert [(s["method"], s["reason"]) for s in section["skipped"]] == [("passthrough", "it takes no fine-tunes")]


def test_a_bad_family_is_one_error_line() -> None:
    """`--family` names a preset: anything else is a usage error naming the choices, no traceback."""
    from click.testing import CliRunner

    from bench.__main__ import main

    for bad, says in (("llama9b", "unknown preset 'llama9b'; choose from tiny"), ("tiny,small", "one preset")):
        res = CliRunner().invoke(main, ["--family", bad])
        assert res.exit_code == 2 and says in res.output and "Traceback" not in res.output, res.output


@pytest.mark.parametrize("method", ["slerp", "model_stock"])
def test_two_pass_timing_takes_the_c_and_the_torch_path(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_steps times both passes on the path it names: the C where built, torch without it."""
    from bench.bench_steps import time_two_pass
    from engine.methods import steps
    from engine.methods.registry import METHODS
    from engine.stats import pairwise

    took: list[bool] = []  # what each merge pass's steps.fused returned: True where the C ran
    fused = steps.fused

    def watched(*args: Any) -> bool:
        took.append(fused(*args))
        return took[-1]

    monkeypatch.setattr(steps, "fused", watched)
    k = 1 if method == "slerp" else 3
    for module in (pairwise._fused, None):
        monkeypatch.setattr(pairwise, "_fused", module)
        took.clear()
        assert all(s > 0 for s in time_two_pass(METHODS[method], k, repeats=1))
        assert took == [module is not None] * 3  # 1 timed + 2 warm-up merge passes


def test_max_memory_sets_the_budget_of_the_timed_merges(tmp_path: Path) -> None:
    """`--max-memory` is the budget of rss_vs_size and throughput (1 GiB unless given); one size."""
    from click.testing import CliRunner

    from bench.__main__ import main, settings_for

    hidden: dict[str, Any] = dict.fromkeys(("sizes", "family", "budgets", "methods", "caches"))
    assert settings_for(True, tmp_path, None, {**hidden, "max_memory": None}).size_budget == 1 << 30
    assert settings_for(True, tmp_path, None, {**hidden, "max_memory": 4 << 30}).size_budget == 4 << 30
    res = CliRunner().invoke(main, ["--max-memory", "1GiB,2GiB"])
    assert res.exit_code == 2 and "one size, got '1GiB,2GiB'" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_top_k_pass_timing_runs_the_c_and_torch_to_the_same_cuts(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_steps' top-k passes run as the executor's: the C from the read buffers where built,
    torch over float32 chunk copies without it, and both find the same cuts."""
    from bench.bench_steps import bf16_family, cpu_mover, params_for, run_pass, time_top_k
    from engine.budget import CHUNK_ELEMS
    from engine.methods.registry import METHODS
    from engine.stats import pairwise

    m, k = METHODS[method], 2
    base, models = bf16_family(k, 2 * CHUNK_ELEMS + 5)  # three chunks on the torch path
    p = params_for(m, k)
    found = []
    for module in (pairwise._fused, None):
        monkeypatch.setattr(pairwise, "_fused", module)
        stats: dict[str, Any] = {}
        for r in m.reducers(p):
            stats = {**stats, **r.finish(run_pass(r, [base, *models], p, stats, cpu_mover(k)), p, stats)}
        found.append({name: v for name, v in stats.items() if "/" not in name})
        assert len(time_top_k(m, k, repeats=1, threads=1, n=1 << 16)) == 4  # pass 1 with windows, passes 1-3
    assert found[0] == found[1] and found[0]
