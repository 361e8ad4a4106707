"""`leanmerge inspect`: per-folder facts from headers, homology across folders, sampled delta
statistics read in bounded pieces, and the continued-pre-training warning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from engine.cli import main
from engine.errors import CheckpointError
from engine.inspect import ABS_DELTA_WARN, REL_DELTA_WARN, inspect, sample_bands
from engine.io.checkpoint import Reader

from adapters import write_adapter
from conftest import write_checkpoint


def weights(seed: int = 0, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """LLM-like magnitudes: |θ| ~ 0.016 for matrices, 1 for norms."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(40, 16, generator=g) * scale,
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g) * scale,
        "model.layers.0.mlp.up_proj.weight": torch.randn(300, 16, generator=g) * scale,
        "model.layers.0.input_layernorm.weight": torch.ones(16),
        "model.norm.weight": torch.ones(16),
        "position_ids": torch.arange(8),
    }


def shifted(base: dict[str, torch.Tensor], step: float, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every float tensor + `step` (a power of two: exact), others unchanged."""
    return {n: (t + step).to(dtype) if t.is_floating_point() else t for n, t in base.items()}


def test_describes_each_folder(tmp_path: Path) -> None:
    base = weights()
    write_checkpoint(tmp_path / "single", base)
    write_checkpoint(
        tmp_path / "sharded",
        {n: t.to(torch.bfloat16) if t.is_floating_point() else t for n, t in base.items()},
        shards=3,
    )
    a, b = torch.randn(4, 16), torch.randn(16, 4)
    write_adapter(tmp_path / "lora", {"model.layers.0.self_attn.q_proj": (a, b)}, r=4, alpha=8)
    ins = inspect([tmp_path / "single", tmp_path / "sharded", tmp_path / "lora"])
    single, sharded, lora = ins.models
    assert (single.format, single.shards, single.tensors, single.layers) == ("single", 1, 6, 1)
    assert single.parameters == 40 * 16 + 16 * 16 + 300 * 16 + 16 + 16 + 8
    assert single.dtypes == {"F32": 5, "I64": 1} and single.bytes == 4 * (single.parameters - 8) + 64
    assert (sharded.format, sharded.shards, sharded.dtypes) == ("sharded", 3, {"BF16": 5, "I64": 1})
    assert (lora.format, lora.tensors, lora.parameters) == ("lora", 2, 128)
    assert lora.lora is not None and lora.lora["scaling"] == 2.0 and lora.lora["target_tensors"] == 1
    assert lora.lora["target_modules"] == ["q_proj"]


def test_homology_report(tmp_path: Path) -> None:
    base = weights()
    write_checkpoint(tmp_path / "base", base)
    other = shifted(base, 0.0)
    del other["model.norm.weight"]
    other["extra.bias"] = torch.zeros(3)
    other["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(16, 8)
    other["position_ids"] = torch.zeros(8)  # int -> float
    other["model.embed_tokens.weight"] = torch.zeros(44, 16)  # added tokens
    write_checkpoint(tmp_path / "other", other)
    (c,) = inspect([tmp_path / "base", tmp_path / "other"]).comparisons
    assert c.missing == ["model.norm.weight"] and c.extra == ["extra.bias"]
    assert c.shape_mismatches == [
        {"name": "model.layers.0.self_attn.q_proj.weight", "shape": [16, 8], "base_shape": [16, 16]}
    ]
    assert c.dtype_mismatches == [{"name": "position_ids", "dtype": "F32", "base_dtype": "I64"}]
    assert c.rows_differ == [{"name": "model.embed_tokens.weight", "shape": [44, 16], "base_shape": [40, 16]}]
    assert not c.homologous
    assert any("not homologous" in w for w in c.warnings) and any("--vocab" in w for w in c.warnings)


def test_delta_statistics_are_exact_on_known_deltas(tmp_path: Path) -> None:
    base = weights()
    write_checkpoint(tmp_path / "base", base)
    ft = dict(base)
    ft["model.layers.0.mlp.up_proj.weight"] = base["model.layers.0.mlp.up_proj.weight"] + 2**-10
    write_checkpoint(tmp_path / "ft", ft)
    (c,) = inspect([tmp_path / "base", tmp_path / "ft"], sample_elems=512).comparisons
    by = {t.name: t for t in c.tensors}
    up = by["model.layers.0.mlp.up_proj.weight"]
    assert up.sampled <= 512 and up.numel == 300 * 16
    assert up.frac_changed == 1.0 and up.mean_abs_delta == pytest.approx(2**-10, rel=1e-3)
    assert by["model.layers.0.self_attn.q_proj.weight"].mean_abs_delta == 0.0
    assert "position_ids" not in by  # not a float tensor
    # totals weight each matrix by its size: 4800 of 6096 matrix elements moved by 2^-10
    assert c.mean_abs_delta == pytest.approx(2**-10 * 4800 / (4800 + 640 + 256), rel=1e-3)
    assert c.warnings == []


def test_sampling_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert sample_bands(10, 4, 100) == [(0, 10)]
    bands = sample_bands(1000, 64, 1024)  # 4 bands of 1024 // (4 * 64) = 4 rows
    assert bands == [(0, 4), (332, 336), (664, 668), (996, 1000)]
    assert sample_bands(5, 10**6, 1024) == [(0, 1), (1, 2), (2, 3), (4, 5)]  # one row each, at least
    write_checkpoint(tmp_path / "base", weights())
    write_checkpoint(tmp_path / "ft", shifted(weights(), 2**-12))
    reads: dict[tuple[int, str], int] = {}
    real = Reader.read_rows

    def spy(self: Reader, name: str, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        key = (id(self), name)
        reads[key] = reads.get(key, 0) + (r1 - r0) * self.ckpt.tensors[name].row_numel
        return real(self, name, r0, r1, out)

    monkeypatch.setattr(Reader, "read_rows", spy)
    inspect([tmp_path / "base", tmp_path / "ft"], sample_elems=256)
    assert len(reads) == 2 * 5 and max(reads.values()) == 256  # per tensor and reader, never more


def test_continued_pretraining_warning(tmp_path: Path) -> None:
    base = weights()
    write_checkpoint(tmp_path / "base", base)
    write_checkpoint(tmp_path / "sft", shifted(base, 2**-13))  # |δ| 1.2e-4, ~0.8% of |θ|
    write_checkpoint(tmp_path / "cpt", shifted(base, 2**-7))  # |δ| 0.0078, ~50% of |θ|
    sft, cpt = inspect([tmp_path / "base", tmp_path / "sft", tmp_path / "cpt"]).comparisons
    assert sft.relative < REL_DELTA_WARN and sft.mean_abs_delta < ABS_DELTA_WARN and sft.warnings == []
    assert cpt.relative > REL_DELTA_WARN and cpt.mean_abs_delta > ABS_DELTA_WARN
    assert len(cpt.warnings) == 1 and "continued pre-training" in cpt.warnings[0]


def test_lora_delta_statistics(tmp_path: Path) -> None:
    base = weights()
    write_checkpoint(tmp_path / "base", base)
    a = torch.full((2, 16), 2**-4)
    b = torch.full((16, 2), 2**-4)
    write_adapter(tmp_path / "lora", {"model.layers.0.self_attn.q_proj": (a, b)}, r=2, alpha=2)
    (c,) = inspect([tmp_path / "base", tmp_path / "lora"]).comparisons
    by = {t.name: t for t in c.tensors}
    assert by["model.layers.0.self_attn.q_proj.weight"].mean_abs_delta == pytest.approx(2 * 2**-8, rel=1e-5)
    assert by["model.layers.0.mlp.up_proj.weight"].mean_abs_delta == 0.0 and c.homologous
    with pytest.raises(CheckpointError, match="must be a full model"):
        inspect([tmp_path / "lora", tmp_path / "base"])


def test_cli_text_and_json(tmp_path: Path) -> None:
    base = weights()
    write_checkpoint(tmp_path / "base", base)
    write_checkpoint(tmp_path / "cpt", shifted(base, 2**-7))
    runner = CliRunner()
    text = runner.invoke(main, ["inspect", str(tmp_path / "base"), str(tmp_path / "cpt")])
    assert text.exit_code == 0, text.output
    assert "single" in text.output and "WARNING" in text.output and "relative" in text.output
    raw = runner.invoke(main, ["inspect", "--json", str(tmp_path / "base"), str(tmp_path / "cpt")])
    doc = json.loads(raw.output)
    assert doc["base"] == str(tmp_path / "base") and len(doc["models"]) == 2
    (c,) = doc["comparisons"]
    assert c["homologous"] and c["warnings"] and {"mean_abs_delta", "relative", "tensors"} <= set(c)
    bad = runner.invoke(main, ["inspect", str(tmp_path / "nowhere")])
    assert bad.exit_code == 1 and "does not exist" in bad.output
