"""bench/gpu_check.py on a machine without a GPU: the comparison counts ulps right, the time budget
skips runs instead of overrunning, and the whole check runs end to end with both devices "cpu"
(where every output must be bit-identical).

The end-to-end test needs the engine's `--device` option; the others run no merge.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import bench.gpu_check as gc
from bench.families import ensure_family

ROOT = Path(__file__).resolve().parents[1]


def step(t: torch.Tensor, ulps: int) -> torch.Tensor:
    """`t` moved `ulps` representable values up (through the bit pattern; positive values only)."""
    ints = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[t.dtype]
    return (t.view(ints) + ulps).view(t.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_ulp_distance_counts_representable_values(dtype: torch.dtype) -> None:
    a = torch.tensor([1.0, 0.5, 3.0, 7.0], dtype=dtype)
    b = a.clone()
    b[1], b[3] = step(a[1:2], 1)[0], step(a[3:4], 5)[0]
    got = gc.compare_tensor(a, b)
    assert got == {"equal": False, "elements_differing": 2, "max_ulp": 5}
    assert gc.compare_tensor(a, a.clone()) == {"equal": True, "elements_differing": 0, "max_ulp": 0}


def test_ulp_distance_across_zero() -> None:
    """The smallest subnormals either side of zero are 2 ulps apart; +0 and -0 differ in bits, by 0 ulps."""
    tiny = torch.tensor([0.0], dtype=torch.bfloat16).view(torch.int16) + 1  # the smallest positive subnormal
    pos = tiny.view(torch.bfloat16)
    assert gc.compare_tensor(pos, -pos)["max_ulp"] == 2
    zeros = gc.compare_tensor(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert zeros == {"equal": False, "elements_differing": 1, "max_ulp": 0}


def test_compare_outputs_reads_every_shard(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    w = torch.linspace(0.5, 1.0, 12, dtype=torch.bfloat16).reshape(3, 4)
    for d in (a, b):
        d.mkdir()
        save_file({"x": torch.zeros(2, dtype=torch.float32)}, str(d / "model-00001-of-00002.safetensors"))
    save_file({"w": w}, str(a / "model-00002-of-00002.safetensors"))
    save_file({"w": step(w, 3), "extra": torch.ones(1)}, str(b / "model-00002-of-00002.safetensors"))
    got = gc.compare_outputs(a, b)
    assert got["tensors"] == 3 and got["tensors_equal"] == 1
    assert got["elements_differing"] == 12 and got["max_ulp"] == 3
    assert got["equal"] is False and got["only_in_one"] == ["extra"]
    assert list(got["worst"]) == ["w"]


def test_device_args() -> None:
    check = gc.Check(cache=Path("c"), scratch=Path("s"), out=Path("o.json"), max_gpu_memory=1 << 30)
    assert check.device_args("cpu") == ["--device", "cpu", "--seed", "0"]
    assert check.device_args("cuda:1") == ["--device", "cuda:1", "--seed", "0", "--max-gpu-memory", str(1 << 30)]
    with pytest.raises(ValueError, match="caches"):
        gc.Check(cache=Path("c"), scratch=Path("s"), out=Path("o.json"), caches=("hot",))


def test_time_budget_skips_the_runs_it_cannot_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A merge of 0.5 s under a 0.8 s budget: the first runs, and the forecast skips every other."""
    calls: list[list[str]] = []

    def fake_merge(args: list[str], log_json: Path) -> dict[str, Any]:
        calls.append(args)
        time.sleep(0.5)
        report = {"wall_s": 0.4, "device": "cpu", "peak_gpu_memory": 0}
        return {"wall_s": 0.5, "peak_rss": 1 << 20, "cpu_s": 0.5, "launcher_rss": 1, "report": report}

    monkeypatch.setattr(gc, "run_leanmerge", fake_merge)
    ensure_family(tmp_path / "cache", "tiny", 3)  # generated before the clock starts
    check = gc.Check(
        cache=tmp_path / "cache",
        scratch=tmp_path,
        out=tmp_path / "o.json",
        device_b="cpu",
        time_preset="tiny",
        time_methods=("linear", "task_arithmetic"),
        budget_s=0.8,
    )
    sec = gc.timing(check, lambda: None)
    assert len(calls) == 1 and calls[0][-4:-2] == ["--device", "cpu"]
    assert [(r["method"], r["cache"]) for r in sec["runs"]] == [("linear", "cold")]
    assert [(s["method"], s["cache"]) for s in sec["skipped"]] == [
        ("linear", "warm"),
        ("task_arithmetic", "cold"),
        ("task_arithmetic", "warm"),
    ]
    assert all("time budget" in s["reason"] for s in sec["skipped"])


def test_end_to_end_tiny_cpu_vs_cpu(tmp_path: Path) -> None:
    """The whole script as the GPU machine runs it, with both devices "cpu": every method equal."""
    out = tmp_path / "gpu.json"
    args = ["--out", str(out), "--cache", str(tmp_path / "cache"), "--device-a", "cpu", "--device-b", "cpu"]
    args += ["--equal-preset", "tiny", "--equal-methods", "dare_ties,slerp,passthrough"]
    args += ["--time-preset", "tiny", "--time-methods", "linear,dare_ties", "--caches", "cold", "--budget-s", "60"]
    gc.main.main(args, standalone_mode=False)

    res = json.loads(out.read_text())
    assert {"machine", "commit", "torch", "gpu", "equality", "copy", "timing", "total_wall_s"} <= set(res)
    assert "unfinished" not in res and res["gpu"] is None
    assert res["copy"]["h2d_gbps"] is None and res["copy"]["d2h_gbps"] is None
    eq = res["equality"]
    assert [r["method"] for r in eq["runs"]] == ["dare_ties", "slerp"]
    assert [s["method"] for s in eq["skipped"]] == ["passthrough"]  # it takes no fine-tunes
    for r in eq["runs"]:
        assert "error" not in r, r["error"]
        assert r["equal"] and r["tensors"] == r["tensors_equal"] > 0
        assert r["elements_differing"] == 0 and r["max_ulp"] == 0
        assert r["reported_devices"] == ["cpu", "cpu"] and r["peak_gpu_memory"] == [0, 0]
    assert res["all_equal"] is True
    tm = res["timing"]
    assert tm["read_limit_gbps"] > 0 and not tm["skipped"]
    assert [(r["method"], r["device"], r["cache"]) for r in tm["runs"]] == [
        ("linear", "cpu", "cold"),
        ("dare_ties", "cpu", "cold"),
    ]
    for r in tm["runs"]:
        assert "error" not in r, r["error"]
        assert r["wall_s"]["runs"] == 1 and r["gbps"]["median"] > 0 and r["peak_rss"]["median"] > 0
        assert r["reported_device"] == ["cpu"] and r["peak_gpu_memory"]["max"] == 0
    assert not (tmp_path / "cache" / "tmp").exists(), "merge outputs must be deleted"
