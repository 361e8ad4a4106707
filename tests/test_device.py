"""The device stage: `--device` parsing and errors, the GPU memory plan, and the staged path
(device staging buffers, large chunks, the order of copies) run on the CPU, where it must give
the same bytes as the direct path for every method, block size and chunk size."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from test_stats_methods import digests

from engine import merge
from engine.budget import RESERVE, plan_memory
from engine.cli import main
from engine.device import CUDA_HOST_RESERVE, DEVICE_CHUNK_ELEMS, GPU_RESERVE, Staged, plan_device, resolve_device
from engine.errors import BudgetError, SpecError
from engine.execute import Pipeline
from engine.io.output import temp_dir_for
from engine.merge import prepare
from engine.methods import steps
from engine.methods.registry import METHODS
from engine.plan import Plan

from conftest import MakeFamily, valid_spec, write_family

CUDA = torch.device("cuda", 0)  # a device object needs no GPU; nothing here allocates on it


# --------------------------------------------------------------------------- --device


def test_cpu_and_auto_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("text", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_absent_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SpecError, match=rf"--device {text}: .*use --device cpu"):
        resolve_device(text)


def test_cuda_index_out_of_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("auto") == torch.device("cuda", 0)
    with pytest.raises(SpecError, match=r"2 CUDA device\(s\): cuda:0 \.\. cuda:1"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("text", ["gpu", "mps", "cuda:x", ""])
def test_unknown_device(text: str) -> None:
    with pytest.raises(SpecError, match="--device"):
        resolve_device(text)


def test_cli_cuda_absent_leaves_nothing(
    tiny_family: MakeFamily, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base, models = tiny_family(1)
    out = tmp_path / "out"
    args = ["merge", "--base", str(base), "--model", str(models[0]), "--method", "linear", "-o", str(out)]
    result = CliRunner().invoke(main, [*args, "--device", "cuda"])
    assert result.exit_code == 1
    assert "--device cuda" in result.output and "Traceback" not in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == [base.parent]
    ok = CliRunner().invoke(main, [*args, "--device", "cpu"])
    assert ok.exit_code == 0, ok.output
    assert (out / "model.safetensors").exists()


# --------------------------------------------------------------------------- the GPU memory plan


def test_gpu_plan_fits_its_budget() -> None:
    memory = plan_memory(8 << 30, 0, (2, 2, 2, 2), 2, 4096)
    for budget in (256 << 20, 1 << 30, 80 << 30):
        d = plan_device(CUDA, budget, memory, 10**10)
        assert memory.chunk_elems <= d.chunk_elems <= DEVICE_CHUNK_ELEMS
        assert d.predicted_peak <= budget and d.budget == budget and d.device == "cuda:0"
    assert plan_device(CUDA, 80 << 30, memory, 1000).chunk_elems == memory.chunk_elems  # never below the floor
    assert plan_device(CUDA, 80 << 30, memory, 5_000_000).chunk_elems == 5_000_000  # nor above a tensor


def test_gpu_plan_too_small_names_the_minimum() -> None:
    memory = plan_memory(8 << 30, 0, (2, 2), 2, 1 << 20, row_aligned=True)  # a row of 1M elements
    with pytest.raises(BudgetError, match=r"--max-gpu-memory \(100 MiB\) cannot hold .* minimum for this merge is"):
        plan_device(CUDA, 100 << 20, memory, 1 << 30)
    need = GPU_RESERVE + memory.chunk_elems * (2 * 6 + 4 * (2 + 8))
    assert plan_device(CUDA, need, memory, 1 << 30).chunk_elems == memory.chunk_elems


def test_cpu_plan_is_the_ram_plans_chunk() -> None:
    memory = plan_memory(8 << 30, 0, (2, 2), 2, 1 << 19, row_aligned=True)
    d = plan_device(torch.device("cpu"), None, memory, 1 << 30)
    assert (d.device, d.chunk_elems, d.budget, d.predicted_peak) == ("cpu", 1 << 19, 0, 0)


# --------------------------------------------------------------------------- the staged path on the CPU


_ALLOCATE = Pipeline.allocate.__func__  # type: ignore[attr-defined]


@contextmanager
def staged_on_cpu(chunk: int) -> Iterator[list[int]]:
    """Within the block, merges use the staged mover on the CPU with chunks of `chunk` elements
    (at least the RAM plan's chunk for row-aligned methods, which need whole rows); yields a
    one-item list counting the chunks that went through it."""
    moved = [0]

    def allocate(cls: type[Pipeline], plan: Plan, staged: bool | None = None) -> Pipeline:
        floor = plan.memory.chunk_elems if plan.spec.method_impl.row_aligned else 1
        device = dataclasses.replace(plan.device, chunk_elems=max(chunk, floor))
        pipe: Pipeline = _ALLOCATE(cls, dataclasses.replace(plan, device=device), staged=True)
        assert isinstance(pipe.mover, Staged)
        to_work = pipe.mover.to_work

        def counted(raw: list[torch.Tensor], reads_base: bool) -> list[torch.Tensor]:
            moved[0] += 1
            return to_work(raw, reads_base)

        pipe.mover.to_work = counted  # type: ignore[method-assign]
        return pipe

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Pipeline, "allocate", classmethod(allocate))
        yield moved


SHAPES = {"embed": (37, 16), "attn": (24, 24), "norm": (24,), "scale": (), "conv": (5, 3, 4), "empty": (0, 8)}
MERGING = sorted(m for m in METHODS if METHODS[m].min_models > 0)


def family(root: Path, n_models: int, dtype: torch.dtype) -> tuple[Path, list[Path]]:
    return write_family(root, n_models, shapes=SHAPES, seed=7, dtype=dtype)


@pytest.mark.parametrize("method", MERGING)
def test_staged_equals_direct_for_every_method(method: str, tmp_path: Path) -> None:
    base, models = family(tmp_path / "f", 3, torch.bfloat16)
    spec = valid_spec(method, base, models)
    direct = digests(Path(merge(spec, tmp_path / "direct", block_bytes=300).output))
    with staged_on_cpu(50) as moved:
        staged = digests(Path(merge(spec, tmp_path / "staged", block_bytes=300).output))
    assert moved[0] > len(SHAPES)  # blocks went through the staging sets in several chunks
    assert staged == direct


@settings(max_examples=12, deadline=None)
@given(
    method=st.sampled_from(["dare_ties", "ties", "della", "model_stock", "task_arithmetic"]),
    block_bytes=st.integers(2, 400),
    chunk=st.integers(1, 200),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
)
def test_staged_any_block_and_chunk(
    method: str, block_bytes: int, chunk: int, dtype: torch.dtype, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp("staged")
    base, models = family(root, 2, dtype)
    spec = valid_spec(method, base, models)
    want = digests(Path(merge(spec, root / "direct", block_bytes=block_bytes).output))
    with staged_on_cpu(chunk) as moved:
        got = digests(Path(merge(spec, root / "staged", block_bytes=block_bytes).output))
    assert moved[0] > 0 and got == want


def test_report_names_the_device(tiny_family: MakeFamily, tmp_path: Path) -> None:
    base, models = tiny_family(2)
    report = merge(valid_spec("dare_ties", base, models), tmp_path / "out", device="cpu")
    assert (report.device, report.peak_gpu_memory, report.predicted_peak_gpu_memory) == ("cpu", 0, 0)


def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch says one GPU is there; nothing may allocate on it (planning only)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_cuda_plan(tiny_family: MakeFamily, monkeypatch: pytest.MonkeyPatch) -> None:
    base, models = tiny_family(2)
    spec = valid_spec("dare_ties", base, models)
    fake_gpu(monkeypatch)
    plan = prepare(spec, max_memory=1 << 30, baseline=200 << 20, device="cuda", max_gpu_memory=1 << 30)[1]
    assert plan.device.device == "cuda:0" and plan.device.budget == 1 << 30
    assert plan.device.chunk_elems == plan.memory.chunk_elems  # a tiny model: the smallest chunk
    assert plan.memory.reserve == RESERVE + CUDA_HOST_RESERVE
    args = ["plan", "--base", str(base), *(a for m in models for a in ("--model", str(m))), "--method", "dare_ties"]
    shown = CliRunner().invoke(main, [*args, "--device", "cuda", "--max-gpu-memory", "1GiB"])
    assert shown.exit_code == 0 and "on cuda:0: chunks of" in shown.output and "GPU budget 1 GiB" in shown.output
    small = CliRunner().invoke(main, [*args, "--device", "cuda", "--max-gpu-memory", "1MiB"])
    assert small.exit_code == 1 and "--max-gpu-memory (1 MiB) cannot hold" in small.output


def test_out_of_memory_midway_is_one_line_and_resumes(
    tiny_family: MakeFamily, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another job takes the memory the plan counted on: say so, keep the work, resume."""
    base, models = tiny_family(2)
    impl = type(METHODS["ties"])
    apply, fused, calls = impl.apply, steps.fused, [0]

    def starve() -> None:
        calls[0] += 1
        if calls[0] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def starved(self: object, *args: object) -> torch.Tensor:  # the torch path
        starve()
        return apply(self, *args)  # type: ignore[arg-type]

    def starved_c(*args: Any, **kw: Any) -> bool:  # the C's
        starve()
        return fused(*args, **kw)

    out = tmp_path / "out"
    args = ["merge", "--base", str(base), *(a for m in models for a in ("--model", str(m))), "--method", "ties"]
    args += ["--density", "0.4", "--block-size", "64", "--device", "cpu", "-o", str(out)]  # RAM's advice
    with monkeypatch.context() as m:
        m.setattr(impl, "apply", starved)
        m.setattr(steps, "fused", starved_c)
        failed = CliRunner().invoke(main, args)
    assert failed.exit_code == 1 and "Traceback" not in failed.output
    assert "out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)" in failed.output
    assert "lower --max-memory, then run the same command with --resume" in failed.output
    assert not out.exists() and (temp_dir_for(out) / "journal.jsonl").exists()
    resumed = CliRunner().invoke(main, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    ref = CliRunner().invoke(main, [*args[:-1], str(tmp_path / "ref")])
    assert ref.exit_code == 0 and digests(out) == digests(tmp_path / "ref")


class FakeCudart:
    """Stands in for torch.cuda.cudart(): records (un)registrations; fails the addresses in `refuse`."""

    def __init__(self, refuse: set[int], style: str) -> None:
        self.refuse, self.style = refuse, style
        self.registered: list[tuple[int, int]] = []
        self.unregistered: list[int] = []

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> object:  # noqa: N802 (CUDA's name)
        code = 1 if ptr in self.refuse else 0
        if code == 0:
            self.registered.append((ptr, size))

        class Enum:  # pybind enums carry .value; some builds return (error,) tuples
            value = code

        return {"int": code, "enum": Enum(), "tuple": (Enum(),)}[self.style]

    def cudaHostUnregister(self, ptr: int) -> int:  # noqa: N802
        self.unregistered.append(ptr)
        return 0


@pytest.mark.parametrize("style", ["int", "enum", "tuple"])
def test_pinned_buffers_lock_each_storage_once_and_unlock(monkeypatch: pytest.MonkeyPatch, style: str) -> None:
    from engine.device import PinnedBuffers
    from engine.io.checkpoint import direct_buffer

    a, b, c = direct_buffer(10_000), torch.empty(4096, dtype=torch.uint8), torch.empty(100, dtype=torch.uint8)
    fake = FakeCudart({c.untyped_storage().data_ptr()}, style)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    pinned = PinnedBuffers(CUDA, [a, a[5:], b, c])  # a view shares its storage: locked once
    assert (pinned.locked, pinned.failed) == (2, 1)
    assert fake.registered == [(s.data_ptr(), s.nbytes()) for s in (a.untyped_storage(), b.untyped_storage())]
    assert a.untyped_storage().nbytes() > 10_000  # the whole allocation, alignment slack included
    pinned.close()
    assert fake.unregistered == [p for p, _ in fake.registered] and pinned.locked == 0
    assert PinnedBuffers(torch.device("cpu"), [a]).locked == 0  # nothing to lock on the CPU


def test_auto_falls_back_to_the_cpu_when_the_gpu_is_full(
    tiny_family: MakeFamily, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A GPU another job has filled: auto merges on the CPU (and says so); cuda asked for is an error."""
    base, models = tiny_family(2)
    spec = valid_spec("dare_ties", base, models)
    fake_gpu(monkeypatch)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (1 << 20, 80 << 30))  # 1 MiB free
    with caplog.at_level("WARNING"):
        plan = prepare(spec, max_memory=1 << 30, baseline=200 << 20, device="auto")[1]
    assert plan.device.device == "cpu" and "--device auto:" in caplog.text and "merging on the CPU" in caplog.text
    with pytest.raises(BudgetError, match="80% of the free GPU memory"):
        prepare(spec, max_memory=1 << 30, baseline=200 << 20, device="cuda")
    with pytest.raises(BudgetError, match="--max-gpu-memory"):
        prepare(spec, max_memory=1 << 30, baseline=200 << 20, device="auto", max_gpu_memory=1 << 20)
