"""Limits from outside the merge: cgroup memory limits (faked through the files the planner
reads), oversized configs, and failures that used to end in a traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from engine import cgroup, prefetch
from engine.budget import GiB, MiB, cgroup_limit, choose_budget, default_budget
from engine.cli import main
from engine.config import MAX_LIST_ITEMS, MAX_NODES
from engine.errors import BudgetError, OutputError
from engine.io.checkpoint import SINGLE_NAME
from engine.io.output import temp_dir_for
from engine.merge import merge
from engine.spec import MergeSpec, ModelRef
from tests.conftest import MakeFamily
from tests.test_output_safety import one_error, snapshot

V1_NO_LIMIT = "9223372036854771712"


def fake_root(tmp_path: Path, cgroup: str, files: dict[str, str]) -> Path:
    """A root with /proc/self/cgroup and cgroup files under /sys/fs/cgroup."""
    root = tmp_path / "root"
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    for rel, text in files.items():
        (root / "sys/fs/cgroup" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "sys/fs/cgroup" / rel).write_text(text + "\n")
    return root


@pytest.mark.parametrize(
    ("cgroup", "files", "limit"),
    [
        # v2: the group says "max", its parent 1 GiB: the parent's limit applies
        ("0::/job/step\n", {"job/memory.max": str(GiB), "job/step/memory.max": "max", "memory.max": "max"}, GiB),
        # v1 beside v2 (this VM's layout): the memory controller's own path
        (
            "4:memory:/process_api/x\n1:cpu:/\n0::/\n",
            {"memory/memory.limit_in_bytes": V1_NO_LIMIT, "memory/process_api/x/memory.limit_in_bytes": str(2 * GiB)},
            2 * GiB,
        ),
        # v1 in a container: the path is not mounted there; the mount's root file is its limit
        ("7:cpuacct,memory:/docker/abc\n", {"memory/memory.limit_in_bytes": str(512 * MiB)}, 512 * MiB),
        ("0::/\n", {"memory.max": "max"}, None),
        ("4:memory:/\n", {"memory/memory.limit_in_bytes": V1_NO_LIMIT}, None),
    ],
    ids=["v2-parent", "v1", "v1-container", "v2-none", "v1-none"],
)
def test_cgroup_limit(tmp_path: Path, cgroup: str, files: dict[str, str], limit: int | None) -> None:
    root = fake_root(tmp_path, cgroup, files)
    assert cgroup_limit(root) == limit
    if limit is not None:
        assert default_budget(root) <= limit * 3 // 4


def test_no_cgroup_file_means_no_limit(tmp_path: Path) -> None:
    assert cgroup_limit(tmp_path) is None


def test_plan_stays_within_a_faked_1gib_cgroup(
    tiny_family: MakeFamily, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    base, (model,) = tiny_family(1)
    monkeypatch.setattr(cgroup, "SYSTEM_ROOT", fake_root(tmp_path, "0::/\n", {"memory.max": str(GiB)}))
    # The plan's baseline is this process's RSS, which a long test session grows past 768 MiB.
    monkeypatch.setattr(sys.modules["engine.merge"], "current_rss", lambda: 300 * MiB)
    args = ["plan", "--method", "task_arithmetic", "--base", str(base), "--model", str(model)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "memory budget 768 MiB:" in result.output
    result = CliRunner().invoke(main, [*args, "--max-memory", "4GiB"])
    assert result.exit_code == 0, result.output
    assert "memory budget 4 GiB:" in result.output
    assert caplog.messages == [
        "--max-memory 4 GiB exceeds this process's cgroup memory limit (1 GiB): the kernel kills the merge "
        "before it reaches the budget; the default plans within the limit"
    ]


def test_choose_budget_without_a_cgroup_keeps_an_explicit_budget(tmp_path: Path) -> None:
    with_no_cgroup = fake_root(tmp_path, "0::/\n", {"memory.max": "max"})
    assert choose_budget(123 * MiB, with_no_cgroup) == 123 * MiB


def test_oversized_configs_are_refused_before_parsing(tmp_path: Path) -> None:
    head = "merge_method: linear\nbase_model: ./base\nmodels:\n  - model: ./ft\n    parameters:\n      weight: "
    cases = {
        "huge.yaml": (
            "# " + "x" * (1 << 20),
            " larger than 1 MiB; a merge config is a few KiB (is this the right file?)",
        ),
        "list.yaml": (
            head + "[" + ", ".join(["0.5"] * (MAX_LIST_ITEMS + 1)) + "]\n",
            f"6: a list of {MAX_LIST_ITEMS + 1} items; at most {MAX_LIST_ITEMS} are accepted",
        ),
        "nodes.yaml": (
            head + "[" + ", ".join(["[0.5, 1]"] * 40000) + "]\n",
            f"6: more than {MAX_NODES} YAML values; a merge config is far smaller",
        ),
    }
    for name, (text, why) in cases.items():
        (tmp_path / name).write_text(text)
        one_error(CliRunner().invoke(main, ["plan", str(tmp_path / name)]), f"{tmp_path / name}:{why}")


def test_model_file_beside_an_index_of_other_tensors_is_refused(tiny_family: MakeFamily, tmp_path: Path) -> None:
    base, (model,) = tiny_family(1, shards=2)
    save_file({"other.weight": torch.zeros(2, 2)}, str(model / SINGLE_NAME))
    out = tmp_path / "merged"
    args = ["merge", "--method", "task_arithmetic", "--base", str(base), "--model", str(model), "-o", str(out)]
    before = snapshot(tmp_path)
    one_error(
        CliRunner().invoke(main, args),
        f"{model}: holds both model.safetensors and model.safetensors.index.json with different tensors "
        "(e.g. 'embed.weight'); which is the model is unclear: move the other one out",
    )
    assert snapshot(tmp_path) == before


def test_temp_folder_removed_mid_run_is_one_line(tiny_family: MakeFamily, tmp_path: Path) -> None:
    import shutil

    base, (model,) = tiny_family(1)
    out = tmp_path / "merged"
    tmp = temp_dir_for(out)

    def remove_tmp(e: dict[str, object]) -> None:
        if e["event"] == "tensor" and tmp.exists():
            shutil.rmtree(tmp)

    spec = MergeSpec("task_arithmetic", base, (ModelRef(model, {}),), {})
    with pytest.raises(OutputError) as err:
        merge(spec, out, on_event=remove_tmp)
    assert str(err.value) == f"{tmp}: the temporary folder vanished during the merge; nothing was written: run again"
    assert not out.exists()
    merge(spec, out)  # and the next run works
    assert (out / SINGLE_NAME).is_file()


def test_thread_start_failure_is_one_line(
    tiny_family: MakeFamily, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `prlimit --as` does to a merge whose buffers took the address space."""
    base, (model,) = tiny_family(1)
    out = tmp_path / "merged"

    class NoThreads:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("can't start new thread")

    monkeypatch.setattr(prefetch, "ThreadPoolExecutor", NoThreads)
    spec = MergeSpec("task_arithmetic", base, (ModelRef(model, {}),), {})
    with pytest.raises(BudgetError) as err:
        merge(spec, out)
    assert str(err.value) == (
        "cannot start a thread: the address space is exhausted (ulimit -v / RLIMIT_AS); raise the limit or lower "
        f"--max-memory, then run the same command with --resume (the work so far is in {temp_dir_for(out)})"
    )
    monkeypatch.undo()
    merge(spec, out, resume=True)
    assert (out / SINGLE_NAME).is_file()
