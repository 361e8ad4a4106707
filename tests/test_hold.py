"""Held tensors: a tensor with statistics passes is read once and held for all of them where the
budget has room. Same bytes as reading it once per pass, fewer bytes read, peak within budget,
and a run stopped in the middle of a held tensor resumes to the same output."""

from __future__ import annotations

import importlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_stats_methods import digests

from engine import MergeSpec, ModelRef, merge
from engine.errors import Interrupted
from engine.io.journal import load_journal
from engine.io.output import temp_dir_for
from engine.merge import prepare
from engine.plan import TensorPlan

from conftest import family_tensors, stepped_family, write_checkpoint

merge_module = importlib.import_module("engine.merge")  # `engine.merge` the attribute is the function
SHAPES = {"embed": (64, 16), "attn": (24, 24), "norm": (24,), "mlp": (40, 24)}
BLOCK = 160  # bytes per stream per block: every matrix takes several blocks


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("hold")
    sets = family_tensors(SHAPES, 3, 11, torch.bfloat16)
    base = write_checkpoint(root / "base", sets[0])
    return base, [write_checkpoint(root / f"ft{i}", s) for i, s in enumerate(sets[1:], 1)]


def spec(method: str, family: tuple[Path, list[Path]], **params: object) -> MergeSpec:
    base, models = family
    n = 1 if method == "slerp" else 3
    return MergeSpec(method, base, tuple(ModelRef(m, {}) for m in models[:n]), dict(params), seed=2)  # type: ignore[arg-type]


CASES = [
    ("ties", {"density": 0.3}),
    ("breadcrumbs", {"density": 0.6}),
    ("slerp", {}),
    ("model_stock", {}),
    ("dare_ties", {"density": 0.3, "rescale_norm": "l2"}),
]


@pytest.mark.parametrize(("method", "params"), CASES)
def test_held_equals_read_per_pass(
    method: str,
    params: dict[str, object],
    family: tuple[Path, list[Path]],
    tmp_path: Path,
) -> None:
    s = spec(method, family, **params)
    rss = 600 << 20  # one baseline for both plans: the process's RSS moves between two calls
    plan = prepare(s, block_bytes=BLOCK, max_memory=2 << 30, baseline=rss)[1]
    reread = prepare(s, block_bytes=BLOCK, max_memory=2 << 30, hold=False, baseline=rss)[1]
    held = [t for t in plan.tensors if t.resident]
    assert held and not any(t.resident for t in reread.tensors)
    assert plan.bytes_read < reread.bytes_read and all(t.reads() == 1 for t in held)
    assert plan.memory.resident == sum(plan.resident) >= max(sum(t.resident_bytes) for t in held)
    assert plan.memory.predicted_peak == reread.memory.predicted_peak + plan.memory.resident <= plan.memory.budget
    a = merge(s, tmp_path / "held", block_bytes=BLOCK, max_memory=2 << 30)
    b = merge(s, tmp_path / "reread", block_bytes=BLOCK, max_memory=2 << 30, hold=False)
    assert a.bytes_read == plan.bytes_read < b.bytes_read == reread.bytes_read
    assert digests(Path(a.output)) == digests(Path(b.output))


@pytest.mark.parametrize("method", ["slerp", "model_stock"])
def test_buffered_reads_hold_only_tensors_of_three_passes_or_more(method: str, family: tuple[Path, list[Path]]) -> None:
    """O_DIRECT re-reads the disk, so two passes are worth a hold; a buffered re-read of cached
    inputs is a memory copy, cheaper than the hold, so there only three passes or more are."""
    two, four = spec(method, family), spec("ties", family, density=0.3)
    for direct_io, holds_two in ((True, True), (False, False)):
        plans = [prepare(s, block_bytes=BLOCK, max_memory=2 << 30, direct_io=direct_io)[1] for s in (two, four)]
        assert max(t.passes for t in plans[0].tensors) == 2 and max(t.passes for t in plans[1].tensors) == 4
        assert any(t.resident for t in plans[0].tensors) == holds_two and any(t.resident for t in plans[1].tensors)


def test_plan_shows_the_hold_of_the_read_mode_given(family: tuple[Path, list[Path]]) -> None:
    """`leanmerge plan` takes --direct-io/--buffered-io as `merge` does: the plan shown is the plan run."""
    from click.testing import CliRunner

    from engine.cli import main

    base, models = family
    args = ["plan", "--base", str(base), "--model", str(models[0]), "--method", "slerp", "--max-memory", "2GiB"]
    args += ["--block-size", str(BLOCK)]
    shown = {io: CliRunner().invoke(main, [*args, io]) for io in ("--direct-io", "--buffered-io")}
    assert all(r.exit_code == 0 for r in shown.values()), shown
    assert "held in RAM" in shown["--direct-io"].output and "held in RAM" not in shown["--buffered-io"].output


def test_only_what_fits_is_held(family: tuple[Path, list[Path]]) -> None:
    plan = prepare(spec("ties", family, density=0.3), block_bytes=BLOCK, max_memory=2 << 30, hold=False)[1]
    multi = sorted((t for t in plan.tensors if t.passes > 1 and t.n_blocks > 1), key=lambda t: sum(t.resident_bytes))
    assert len(multi) >= 3
    assert not any(t.resident for t in plan.with_resident(sum(multi[0].resident_bytes) - 1).tensors)
    for k, t in enumerate(multi):
        held = plan.with_resident(sum(t.resident_bytes))
        assert {x.name for x in held.tensors if x.resident} >= {x.name for x in multi[: k + 1]}
        assert sum(held.resident) <= sum(t.resident_bytes)  # one buffer per stream, reused: the largest counts
    assert all(t.resident for t in plan.with_resident(1 << 40).tensors if t in multi)


def test_budget_without_room_reads_per_pass(family: tuple[Path, list[Path]]) -> None:
    s = spec("ties", family, density=0.3)
    lean = prepare(s, block_bytes=BLOCK, max_memory=2 << 30, hold=False)[1]
    tight = lean.memory.predicted_peak + 100  # the budget has no room beyond the buffers
    plan = prepare(s, block_bytes=BLOCK, max_memory=tight, baseline=lean.memory.baseline)[1]
    assert not any(t.resident for t in plan.tensors) and plan.bytes_read == lean.bytes_read


def test_stopped_inside_a_held_tensor_resumes(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """SIGINT while "embed" (held, 13 blocks) is being written: some rows are journaled, and the
    resumed run reads the whole tensor again for its statistics but writes only the rest."""
    s = spec("ties", family, density=0.3)
    plan = prepare(s, block_bytes=BLOCK, max_memory=2 << 30)[1]
    order = [t.name for t in plan.tensors]
    assert order[:2] == ["attn", "embed"] and all(t.resident for t in plan.tensors[:2])
    reads = [0]

    def interrupt(e: dict[str, object]) -> None:
        reads[0] += e["event"] == "block"
        if reads[0] == plan.tensors[0].n_blocks + plan.tensors[1].n_blocks:  # embed's last read
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        merge(s, out, block_bytes=BLOCK, sync_every=1, on_event=interrupt)
    state = load_journal(temp_dir_for(out))
    assert state is not None and 0 < state.rows_done("embed") < 64
    merge(s, out, block_bytes=BLOCK, resume=True)
    want = merge(s, tmp_path / "ref", block_bytes=BLOCK, hold=False)
    assert digests(out) == digests(Path(want.output))


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_the_tie_pass_folds_ahead_of_the_merge(
    family: tuple[Path, list[Path]], tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a hold, a top-k tensor of several blocks is read three times, not four: the tie
    pass runs on the merge's reads. Same bytes as four reads; what is read is what the plan says."""
    from engine.stats import topk

    s = spec(method, family, density=0.3)
    runs = []
    for ahead in (True, False):
        monkeypatch.setattr(topk._TiePass, "folds_ahead", ahead)
        plan = prepare(s, block_bytes=BLOCK, max_memory=2 << 30, hold=False)[1]
        events: list[dict[str, object]] = []
        got = merge(s, tmp_path / str(ahead), block_bytes=BLOCK, hold=False, on_event=events.append)
        read = sum(int(e["bytes"]) for e in events if e["event"] == "block")  # type: ignore[call-overload]
        several = [t for t in plan.tensors if t.merge and t.n_blocks > 1]
        assert several and all(t.reads() == (3 if ahead else 4) for t in several)
        assert read == got.bytes_read == plan.bytes_read
        runs.append((digests(Path(got.output)), read))
    assert runs[0][0] == runs[1][0] and runs[0][1] < runs[1][1]


def interrupt_embed(s: MergeSpec, out: Path, reads: Callable[[TensorPlan], int]) -> None:
    """Merge `s` into `out` without a hold, SIGINT two blocks into the merge of "embed" (the second
    tensor), where each tensor is read `reads(tensor)` times: the journal holds part of "embed"."""
    plan = prepare(s, block_bytes=BLOCK, max_memory=2 << 30, hold=False)[1]
    attn, embed = plan.tensors[:2]
    assert (attn.name, embed.name) == ("attn", "embed") and embed.n_blocks > 4
    stop_at = reads(attn) * attn.n_blocks + (reads(embed) - 1) * embed.n_blocks + 2
    count = [0]

    def interrupt(e: dict[str, object]) -> None:
        count[0] += e["event"] == "block"
        if count[0] == stop_at:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        merge(s, out, block_bytes=BLOCK, sync_every=1, hold=False, on_event=interrupt)
    state = load_journal(temp_dir_for(out))
    assert state is not None and 0 < state.rows_done("embed") < 64


def test_stopped_inside_a_tensor_resumes_with_every_pass(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """SIGINT after two merged blocks of "embed" (not held): the resumed run cannot fold the tie
    pass ahead of rows already written, so it reads every pass again, and writes the same bytes."""
    s = spec("ties", family, density=0.3)
    out = tmp_path / "out"
    interrupt_embed(s, out, lambda t: t.reads())
    merge(s, out, block_bytes=BLOCK, resume=True, hold=False)
    want = merge(s, tmp_path / "ref", block_bytes=BLOCK, hold=False)
    assert digests(out) == digests(Path(want.output))


def ties_of(family: tuple[Path, list[Path]]) -> MergeSpec:
    base, models = family
    return MergeSpec("ties", base, tuple(ModelRef(m, {}) for m in models), {"density": 0.15}, seed=2)


@pytest.mark.parametrize("skewed", [False, True])
def test_a_right_guess_spares_pass_two(tmp_path: Path, skewed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a hold, where pass 1's guess at each selection's bucket (from the first block) is
    right, a top-k tensor of several blocks is read twice, not three times; where it is wrong
    (`skewed`), three times. Same bytes as with no guess; the report counts the blocks read."""
    from engine.stats import topk

    s = ties_of(stepped_family(tmp_path / "f", skewed, SHAPES))
    plan = prepare(s, block_bytes=BLOCK, max_memory=2 << 30, hold=False)[1]
    several = [t for t in plan.tensors if t.merge and t.n_blocks > 1]
    assert len(several) == 3 and all((t.fewest_reads(), t.reads()) == (2, 3) for t in several)
    runs, guessed = {}, topk.WINDOW
    for window in (guessed, 0):
        monkeypatch.setattr(topk, "WINDOW", window)
        events: list[dict[str, int]] = []
        got = merge(s, tmp_path / str(window), block_bytes=BLOCK, hold=False, on_event=events.append)  # type: ignore[arg-type]
        read, skipped = (sum(e["bytes"] for e in events if e["event"] == kind) for kind in ("block", "skipped"))
        assert read == got.bytes_read == plan.bytes_read - skipped
        runs[window] = (digests(Path(got.output)), skipped)
    spared = 0 if skewed else sum(t.scan_bytes for t in several)
    assert runs == {guessed: (runs[0][0], spared), 0: (runs[0][0], 0)}


def test_stopped_after_a_spared_pass_resumes(tmp_path: Path) -> None:
    """SIGINT two blocks into the merge of a tensor whose pass 2 was spared: the resumed run
    scans it again (pass 1, spared pass 2, the tie pass) and writes the same bytes."""
    s = ties_of(stepped_family(tmp_path / "f", False, SHAPES))
    out = tmp_path / "out"
    interrupt_embed(s, out, lambda t: t.fewest_reads())
    events: list[dict[str, object]] = []
    merge(s, out, block_bytes=BLOCK, resume=True, hold=False, on_event=events.append)
    assert sum(e["event"] == "skipped" for e in events) == 2  # embed's pass 2 and mlp's
    want = merge(s, tmp_path / "ref", block_bytes=BLOCK, hold=False)
    assert digests(out) == digests(Path(want.output))


def test_the_reader_waits_only_for_the_read_that_depends_on_the_stage() -> None:
    """The schedule of a tensor with skippable passes 2 and 3 (TIES'): from row 0 it reads twice
    before it asks (pass 1, then pass 2 or the merge), counting NaN/Inf on the first read only; a
    resumed tensor asks after pass 1; a stage that stops wakes a reader waiting on its word."""
    import threading

    from engine.execute import scan_cycles
    from engine.prefetch import Decisions

    t = TensorPlan("w", (6, 2), ("BF16",) * 3, "BF16", True, 6, 2, 2, 0, 0, passes=4, folds_ahead=True,
                   skippable=(1, 2))  # fmt: skip
    assert (t.fewest_reads(), t.reads(), t.fewest_reads(2), t.reads(2)) == (2, 3, 2, 4)

    def take(items: object, n: int) -> list[tuple[int, bool] | None]:
        return [None if x is None else (x[1].r0, x[2]) for _, x in zip(range(n), items)]  # type: ignore[call-overload]

    d = Decisions()
    fresh = scan_cycles(t, 0, d)
    assert take(fresh, 7) == [(0, True), (2, True), (4, True), (0, False), (2, False), (4, False), None]
    d.decide("w", False)  # pass 2 skipped: the merge was the second read
    assert take(fresh, 9) == []
    d = Decisions()
    resumed = scan_cycles(t, 2, d)
    assert take(resumed, 4) == [(0, False), (2, False), (4, False), None]
    d.decide("w", False)
    d.decide("w", True)  # pass 2 skipped, the tie pass reads
    assert take(resumed, 5) == [(0, False), (2, False), (4, False), None]
    d.decide("w", True)  # a third word (never said) would not matter: it asks no more
    assert take(resumed, 9) == []
    d = Decisions()
    waiting = scan_cycles(t, None, d)
    assert take(waiting, 4)[-1] is None
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(next(waiting, "end")))
    reader.start()
    d.close()
    reader.join(5)
    assert got == ["end"]


def test_plan_shows_passes_and_reads(family: tuple[Path, list[Path]]) -> None:
    """`leanmerge plan` tells the reads apart from the passes: a TIES tensor of several blocks has
    4 passes and 3 reads without a hold, 1 read where held; one block is read once."""
    import json

    from click.testing import CliRunner

    from engine.cli import main

    base, models = family
    args = ["plan", "--base", str(base), "--model", str(models[0]), "--method", "ties", "--density", "0.3"]
    args += ["--block-size", str(BLOCK), "--max-memory", "2GiB", "--json"]
    for hold, reads in (("--no-hold", 3), ("--hold", 1)):
        shown = json.loads(CliRunner().invoke(main, [*args, hold]).output)
        several = {(t["passes"], t["reads"]) for t in shown["tensor_plans"] if t["blocks"] > 1}
        assert several == {(4, reads)} and {t["reads"] for t in shown["tensor_plans"] if t["blocks"] == 1} == {1}
