"""bench/bench_threads.py: the scaling, same-bytes and target checks report failures (on made-up
figures), a crashed merge is recorded and the run goes on, and the whole tool runs end to end on
the tiny family at 1 and 2 threads, every count writing the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import bench.bench_threads as bt
from bench.common import RunFailed
from bench.families import ensure_family


def test_scaling_check_allows_the_tolerance_and_names_the_slower_step() -> None:
    assert bt.scaling_check({1: 1.0, 2: 1.9, 4: 3.5}) == {"ok": True, "tolerance": 0.05, "slower": []}
    assert bt.scaling_check({1: 1.0, 2: 0.96})["ok"] is True  # 4% slower: within 5%
    got = bt.scaling_check({1: 1.0, 2: 2.0, 4: 1.8, 8: 1.85})
    assert got["ok"] is False and got["slower"] == [{"from": 2, "to": 4, "gbps": [2.0, 1.8]}]
    assert bt.scaling_check({16: 1.0, 1: 2.0}, tolerance=0.0)["slower"] == [{"from": 1, "to": 16, "gbps": [2.0, 1.0]}]
    assert bt.scaling_check({1: 1.0})["ok"] is None  # nothing to compare


def test_target_check_evaluates_without_asserting() -> None:
    assert bt.target_check("dare_ties", 5.2) == {"target_gbps": 5.0, "gbps": 5.2, "verdict": "met"}
    assert bt.target_check("ties", 2.4)["verdict"] == "not met"  # type: ignore[index]
    assert bt.target_check("ties", None)["verdict"] == "not measured"  # type: ignore[index]
    assert bt.target_check("task_arithmetic", 9.0) is None


def test_settings_skip_counts_above_the_usable_cores() -> None:
    settings, skipped = bt.settings_for((16, 1, 2, 4, 8, 2), cores=4)
    assert settings == [1, 2, 4, "default"]
    assert skipped == [
        {"threads": 8, "reason": "only 4 usable cores"},
        {"threads": 16, "reason": "only 4 usable cores"},
    ]


def run(threads: int | str, gbps: float, sha: str = "aa", repeat: int = 0, method: str = "ties") -> dict[str, Any]:
    return {"method": method, "threads": threads, "repeat": repeat, "gbps": gbps, "wall_s": 1.0, "cpu_s": 2.0,
            "peak_rss": 1 << 20, "output_sha256": sha}  # fmt: skip


def test_summary_reports_slowdown_crash_and_differing_bytes() -> None:
    """ties: slower at 2 threads, one repeat at 4 wrote other bytes, the default crashed, then timed out."""
    runs = [run(1, 2.0), run(2, 1.5), run(4, 3.0), run(4, 3.2, sha="bb", repeat=1)]
    runs.append({"method": "ties", "threads": "default", "repeat": 0, "error": "exited -11", "returncode": -11})
    runs.append({"method": "ties", "threads": "default", "repeat": 1, "error": "timed out", "returncode": None})
    runs += [run(t, g, method="dare_ties") for t, g in ((1, 1.0), (2, 2.0), ("default", 6.0))]
    s = bt.summarize(runs)
    ties = s["ties"]
    assert ties["scaling"]["ok"] is False and ties["scaling"]["slower"] == [{"from": 1, "to": 2, "gbps": [2.0, 1.5]}]
    assert ties["cells"]["4"]["gbps"]["median"] == pytest.approx(3.1) and ties["cells"]["default"] == {}
    assert ties["same_bytes"] == {"ok": False, "sha256": {"1": ["aa"], "2": ["aa"], "4": ["aa", "bb"]}}
    assert ties["failed"] == [
        {"threads": "default", "repeat": 0, "returncode": -11},
        {"threads": "default", "repeat": 1, "returncode": None},
    ]
    assert ties["target"]["verdict"] == "not measured"
    dare = s["dare_ties"]
    assert dare["scaling"]["ok"] is True and dare["same_bytes"]["ok"] is True and dare["target"]["verdict"] == "met"

    res = {"machine": {"cpu": "X", "usable_cores": 4, "torch": "t", "timestamp": "now"}, "commit": "c" * 40,
           "plan": {"repeats": 2, "tolerance": 0.05}, "family": {"preset": "p", "n_models": 3, "input_bytes": 10**9},
           "settings_run": [1, 2, 4, "default"], "default_threads": 4, "threads_skipped": [], "skipped": [],
           "summary": s}  # fmt: skip
    md = bt.markdown(res)
    assert "| ties | 2.00 (1.0x) | 1.50 (0.8x) | 3.10 (1.6x) | - CRASH | **NO** | **NO** | not measured" in md
    assert "| dare_ties | 1.00 (1.0x) | 2.00 (2.0x) | - | 6.00 (6.0x) | yes | yes | met (>= 5.0 GB/s) |" in md
    assert "- ties: killed at the timeout at default threads #1" in md
    assert "- ties: exit -11 at default threads #0" in md and "- ties: outputs differ: 1: aa" in md


def test_a_crashed_merge_is_recorded_and_the_runs_go_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGSEGV at 2 threads: its entry has the exit code, signal and stderr tail; 1 and the default still run."""
    fam = ensure_family(tmp_path / "cache", "tiny", 3)

    def fake(args: list[str], log_json: Path, timeout_s: float | None = None) -> dict[str, Any]:
        assert timeout_s is not None and 30 <= timeout_s <= plan.run_timeout_s  # a hang would end in time
        if args[-2:] == ["--threads", "2"]:
            (log_json.parent / "leanmerge.measure.json").write_text(json.dumps({"returncode": -11, "wall_s": 0.5}))
            raise RunFailed("leanmerge exited -11: ...\nSegmentation fault")
        (log_json.parent / "out").mkdir()
        (log_json.parent / "out" / "model.safetensors").write_bytes(b"same")
        return {"wall_s": 0.2, "cpu_s": 0.3, "peak_rss": 1 << 20, "returncode": 0, "report": {"wall_s": 0.1}}

    monkeypatch.setattr(bt, "run_leanmerge", fake)
    plan = bt.Plan(cache=tmp_path / "cache", scratch=tmp_path, out=tmp_path / "r.json", methods=("ties",), repeats=1)
    res: dict[str, Any] = {"runs": [], "skipped": []}
    bt.timed_runs(plan, fam, [1, 2, "default"], res, lambda: None)
    assert [(r["threads"], r["returncode"]) for r in res["runs"]] == [(1, 0), (2, -11), ("default", 0)]
    crash = res["runs"][1]
    assert crash["signal"] == 11 and crash["wall_s"] == 0.5 and crash["error"].endswith("Segmentation fault")
    assert res["runs"][0]["output_sha256"] == res["runs"][2]["output_sha256"] is not None
    assert res["runs"][0]["resident"] == 1.0  # warmed just before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"], "scratch folders must be deleted"


@pytest.mark.slow
def test_end_to_end_tiny_one_and_two_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tool as the many-core machine runs it, on the tiny family; 2 counts even on a 1-core runner."""
    monkeypatch.setattr("engine.cores.usable_cores", lambda: 2)
    out = tmp_path / "threads.json"
    args = ["--out", str(out), "--cache", str(tmp_path / "cache"), "--scratch", str(tmp_path / "scratch")]
    bt.main.main([*args, "--preset", "tiny", "--methods", "dare_ties", "--threads", "1,2,4", "--repeats", "1"],
                 standalone_mode=False)  # fmt: skip
    res = json.loads(out.read_text())
    assert {"machine", "commit", "plan", "family", "runs", "skipped", "summary", "total_wall_s"} <= set(res)
    assert isinstance(res["c_extension"], bool)
    assert "unfinished" not in res and res["settings_run"] == [1, 2, "default"] and res["default_threads"] == 2
    assert res["threads_skipped"] == [{"threads": 4, "reason": "only 2 usable cores"}] and res["skipped"] == []
    assert [r["threads"] for r in res["runs"]] == [1, 2, "default"]
    for r in res["runs"]:
        assert "error" not in r, r["error"]
        assert r["returncode"] == 0 and r["gbps"] > 0 and r["cpu_s"] > 0 and r["peak_rss"] > 0
        assert r["resident"] == 1.0 and len(r["output_sha256"]) == 64
    assert len({r["output_sha256"] for r in res["runs"]}) == 1
    dare = res["summary"]["dare_ties"]
    assert dare["same_bytes"]["ok"] is True and dare["failed"] == []
    assert dare["target"]["verdict"] == "not met"  # tiny merges are start-up bound
    md = out.with_suffix(".md").read_text()
    assert "| method | 1 thr | 2 thr | default (2) | never slower (tol 5%) | same bytes | target |" in md
    assert md.count("| dare_ties |") == 1 and "- skipped 4 threads: only 2 usable cores" in md
    assert list((tmp_path / "scratch").iterdir()) == [], "merge outputs must be deleted"
