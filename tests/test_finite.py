"""NaN and Inf: counted per merged tensor, reported (a warning line, the report's JSON event),
and with --strict-finite refused with no output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from engine.cli import main
from engine.io.checkpoint import SINGLE_NAME
from engine.io.output import temp_dir_for
from engine.stats import finite
from engine.stats.finite import PIECE, count_nonfinite
from tests.conftest import SHAPES, family_tensors, write_checkpoint

WARNING_TAIL = "(from the inputs, or an overflow of --out-dtype; --strict-finite refuses such a merge)"


def nan_family(root: Path) -> tuple[Path, Path]:
    """fp32 base and fine-tune: three NaNs in one tensor of the fine-tune, and a 0-D tensor of
    1e6 in both, which fp16 (largest 65504) cannot hold."""
    base, ft = family_tensors(SHAPES, 1, 0, torch.float32)
    ft["layers.0.mlp.weight"].view(-1)[[0, 5, 700]] = math.nan
    base["scale"], ft["scale"] = torch.tensor(1e6), torch.tensor(1e6)
    return write_checkpoint(root / "base", base), write_checkpoint(root / "ft", ft)


@pytest.mark.parametrize("c", [True, False], ids=["C", "torch"])
def test_count_nonfinite_agrees_with_isfinite(c: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not c:
        monkeypatch.setattr(finite, "_c", None)
    elif finite._c is None:
        pytest.skip("the C extension is not built")
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        x = torch.randn(PIECE * 2 + 17, generator=g).to(dtype)
        assert count_nonfinite(x) == 0
        x[[3, PIECE + 1, -1]] = torch.tensor([math.nan, math.inf, -math.inf], dtype=dtype)
        assert count_nonfinite(x) == 3
        x[5] = -math.nan  # a NaN with the sign bit set
        assert count_nonfinite(x) == 4
        big = torch.full((8,), torch.finfo(dtype).max, dtype=dtype)  # finite, but its sum overflows
        assert count_nonfinite(big) == 0
    assert count_nonfinite(torch.arange(10, dtype=torch.int32)) == 0


def test_nonfinite_outputs_are_reported_and_strict_refuses(tmp_path: Path) -> None:
    base, ft = nan_family(tmp_path)
    out, log = tmp_path / "merged", tmp_path / "log.jsonl"
    args = ["merge", "--method", "task_arithmetic", "--base", str(base), "--model", str(ft), "--out-dtype", "fp16"]
    result = CliRunner().invoke(main, [*args, "-o", str(out), "--log-json", str(log)])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        f"Warning: NaN/Inf in the inputs: {ft}: layers.0.mlp.weight 3 (--strict-finite refuses such inputs)",
        f"Warning: NaN/Inf in 2 merged tensor(s): layers.0.mlp.weight 3, scale 1 {WARNING_TAIL}",
    ]
    report = [json.loads(line) for line in log.read_text().splitlines()][-1]
    assert report["event"] == "report" and report["nonfinite"] == {"layers.0.mlp.weight": 3, "scale": 1}
    assert report["nonfinite_inputs"] == {str(ft): {"layers.0.mlp.weight": 3}}
    merged = load_file(str(out / SINGLE_NAME))
    assert int(merged["layers.0.mlp.weight"].isnan().sum()) == 3 and merged["scale"].isinf()

    strict = tmp_path / "strict"
    result = CliRunner().invoke(main, [*args, "-o", str(strict), "--strict-finite"])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"Error: {ft}: tensor 'layers.0.mlp.weight' holds 3 NaN/Inf value(s) in rows 0..61; --strict-finite "
        "refuses the merge (nothing was written): repair or leave out that input"
    ]
    assert not strict.exists() and not temp_dir_for(strict).exists()

    # Finite inputs, an output that overflows fp16: refused by the check of what is written.
    base2, ft2 = family_tensors(SHAPES, 1, 0, torch.float32)
    base2["scale"], ft2["scale"] = torch.tensor(1e6), torch.tensor(1e6)
    args = ["merge", "--method", "task_arithmetic", "--out-dtype", "fp16", "--strict-finite"]
    args += [
        "--base",
        str(write_checkpoint(tmp_path / "b2", base2)),
        "--model",
        str(write_checkpoint(tmp_path / "f2", ft2)),
    ]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "overflow")])
    assert result.exit_code == 1 and result.stderr.splitlines() == [
        "Error: scale: 1 NaN/Inf value(s) in merged rows 0..1; --strict-finite refuses the merge "
        "(nothing was written): check the inputs for NaN/Inf, or use a wider --out-dtype"
    ]
    assert not (tmp_path / "overflow").exists()


def test_one_nan_input_makes_a_whole_slerp_tensor_nan_and_is_reported(tmp_path: Path) -> None:
    base, ft = family_tensors(SHAPES, 1, 1, torch.bfloat16)
    ft["embed.weight"][2, 3] = math.nan
    write_checkpoint(tmp_path / "base", base)
    write_checkpoint(tmp_path / "ft1", ft)
    config = tmp_path / "slerp.yaml"
    config.write_text("merge_method: slerp\nbase_model: ./base\nmodels:\n  - model: ./ft1\nparameters:\n  t: 0.3\n")
    result = CliRunner().invoke(main, ["merge", str(config), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    n = math.prod(SHAPES["embed.weight"])
    assert result.stderr.splitlines() == [
        f"Warning: NaN/Inf in the inputs: {tmp_path / 'ft1'}: embed.weight 1 (--strict-finite refuses such inputs)",
        f"Warning: NaN/Inf in 1 merged tensor(s): embed.weight {n} {WARNING_TAIL}",
    ]
