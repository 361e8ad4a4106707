"""Plans from tiny budgets: the arithmetic is in the comments, the assertions exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import BudgetError, MergeSpec, ModelRef
from engine.budget import CHUNK_ELEMS, DEPTH, OUT_DEPTH, RESERVE, WORK_ARRAYS, fmt_bytes, parse_bytes
from engine.io.inventory import take_inventory
from engine.plan import Block, make_plan

from conftest import write_checkpoint


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    t = {"a": torch.zeros(10, 6, dtype=torch.bfloat16), "b": torch.zeros(7, dtype=torch.float32), "c": torch.zeros(())}
    return write_checkpoint(tmp_path / "base", t), write_checkpoint(tmp_path / "ft", t)


def plan_for(pair: tuple[Path, Path], budget: int, **kw: int):  # type: ignore[no-untyped-def]
    base, ft = pair
    spec = MergeSpec("task_arithmetic", base, (ModelRef(ft, {}),), {})
    return make_plan(spec, take_inventory(base, [ft]), budget=budget, baseline=0, **kw)


# Two input streams, each widest at 4 bytes/element (b is F32) -> 8 bytes x DEPTH input sets, plus
# 4 bytes of F32 output x OUT_DEPTH output buffers per element. Fixed: RESERVE + workspace.
PER_ELEM = 8 * DEPTH + 4 * OUT_DEPTH
WORKSPACE = CHUNK_ELEMS * 4 * (2 + WORK_ARRAYS)
FIXED = RESERVE + WORKSPACE


def test_blocks_from_budget(pair: tuple[Path, Path]) -> None:
    plan = plan_for(pair, FIXED + PER_ELEM * 13)  # room for 13 elements -> 2 rows of 6 for "a"
    by_name = {t.name: t for t in plan.tensors}
    a, b, c = by_name["a"], by_name["b"], by_name["c"]
    assert plan.memory.block_elems == 13
    assert list(a.blocks()) == [Block("a", r, min(r + 2, 10), r * 6, (min(r + 2, 10) - r) * 6) for r in range(0, 10, 2)]
    assert [(x.r0, x.r1) for x in b.blocks()] == [(0, 7)]
    assert list(c.blocks()) == [Block("c", 0, 1, 0, 1)]
    assert plan.memory.predicted_peak == FIXED + 13 * PER_ELEM
    assert plan.n_blocks == 5 + 1 + 1


def test_budget_too_small_names_minimum(pair: tuple[Path, Path]) -> None:
    with pytest.raises(BudgetError, match="minimum for this merge is") as e:
        plan_for(pair, FIXED + PER_ELEM * 5)  # a row of "a" is 6 elements
    assert "6 elements" in str(e.value)


def test_block_size_override_and_shards(pair: tuple[Path, Path]) -> None:
    plan = plan_for(pair, 1 << 30, block_bytes=48, shard_size=100)  # 48 B / 4 B = 12 elements = 2 rows
    by_name = {t.name: t for t in plan.tensors}
    assert by_name["a"].block_rows == 2
    # Tensors keep the base file's order (safetensors stores b, c, a: widest alignment first).
    # b (28 B) and c (4 B) share shard 1; a (120 B) would overflow 100 B, so it opens shard 2.
    assert [s.tensors for s in plan.shards] == [("b", "c"), ("a",)]
    assert [s.file for s in plan.shards] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert (by_name["b"].offset, by_name["c"].offset, by_name["a"].offset) == (0, 28, 0)
    assert plan.bytes_read == 2 * (120 + 28 + 4) and plan.bytes_written == 152


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1GiB", 1 << 30),
        ("512MiB", 512 << 20),
        ("5GB", 5 * 10**9),
        ("1.5G", 1_500_000_000),
        ("1000", 1000),
        ("5B", 5 * 10**9),  # mergekit's spellings: B is a billion, M a million, K a thousand
        ("1b", 10**9),
        ("500M", 500 * 10**6),
        ("64K", 64_000),
    ],
)
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (99.94 * 2**20, "99.9 MiB"),
        (1000 * 2**20, "1000 MiB"),
        (1023.4 * 2**20, "1023 MiB"),
        (2**30, "1 GiB"),
        (5 * 2**40, "5 TiB"),
        (4096 * 2**40, "4096 TiB"),
    ],
)
def test_fmt_bytes_three_digits_never_an_exponent(n: float, text: str) -> None:
    assert fmt_bytes(n) == text


@pytest.mark.parametrize("text", ["", "abc", "1XB", "-1", "0", "nan", "inf", "lots", "5BB"])
def test_parse_bytes_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_bytes(text)
