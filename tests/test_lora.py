"""PEFT LoRA adapters as merge inputs: the adapter's model is θ_base + s·B@A, materialized block
by block; merged outputs equal whole-tensor references bit for bit for every block size."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from engine import MergeSpec, ModelRef, merge
from engine.config import load_config
from engine.errors import CheckpointError
from engine.io.checkpoint import Checkpoint, Reader
from engine.io.lora import LoraCheckpoint, open_model

from adapters import lora_delta, write_adapter
from conftest import write_bin, write_checkpoint
from reference import dare_merge, load_model

TARGETS = {
    "model.layers.0.self_attn.q_proj": (16, 16),
    "model.layers.1.self_attn.q_proj": (16, 16),
    "model.layers.0.mlp.up_proj": (37, 16),
}


def base_tensors(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    t = {f"{m}.weight": torch.randn(s, generator=g) for m, s in TARGETS.items()}
    t |= {"model.embed_tokens.weight": torch.randn(20, 16, generator=g), "model.norm.weight": torch.ones(16)}
    return {n: x.to(dtype) for n, x in t.items()}


def factors(r: int, seed: int = 2) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(r, s[1], generator=g), torch.randn(s[0], r, generator=g) * 0.1) for m, s in TARGETS.items()}


def lora_model(
    base: dict[str, torch.Tensor], fs: dict[str, tuple[torch.Tensor, torch.Tensor]], s: float
) -> dict[str, torch.Tensor]:
    """The adapter's model in float32, computed the engine's documented way: θ_base + s·ΣₖB[:,k]⊗A[k]."""
    out = {n: t.float() for n, t in base.items()}
    for m, (a, b) in fs.items():
        out[f"{m}.weight"] = out[f"{m}.weight"] + lora_delta(a, b, s)
    return out


@pytest.mark.parametrize(("rslora", "dtype"), [(False, torch.float32), (True, torch.float32), (False, torch.bfloat16)])
def test_task_arithmetic_adds_exactly_the_low_rank_delta(tmp_path: Path, rslora: bool, dtype: torch.dtype) -> None:
    base = base_tensors(dtype)
    write_checkpoint(tmp_path / "base", base)
    r, alpha = 4, 8.0
    fs = factors(r)
    write_adapter(tmp_path / "lora", fs, r=r, alpha=alpha, rslora=rslora)
    s = alpha / math.sqrt(r) if rslora else alpha / r
    theta = lora_model(base, fs, s)
    spec = MergeSpec(
        "task_arithmetic", tmp_path / "base", (ModelRef(tmp_path / "lora", {"weight": 1.0}),), {"lambda": 1.0}
    )
    for block in (64, 100, 64 * 16 * 3, 1 << 20):  # one row, odd rows, several rows, whole tensors
        merge(spec, tmp_path / f"out{block}", block_bytes=block)
        got = load_model(tmp_path / f"out{block}")
        for name, b in base.items():
            bf = b.float()
            want = (bf + (theta[name] - bf)).to(dtype)  # task arithmetic's float32 ops, in its order
            assert torch.equal(got[name], want), (name, block)
            if name.removesuffix(".weight") not in TARGETS:
                assert torch.equal(got[name], b)  # not a target: the base, exactly
    if dtype == torch.float32:
        for m, (a, b) in fs.items():  # and that is s·B@A, up to float32 rounding
            delta = got[f"{m}.weight"] - base[f"{m}.weight"]
            torch.testing.assert_close(delta, s * (b @ a), rtol=1e-4, atol=1e-5)


def test_adapter_merged_with_a_full_fine_tune_by_dare_ties(tmp_path: Path) -> None:
    base = base_tensors(torch.bfloat16)
    write_checkpoint(tmp_path / "base", base)
    g = torch.Generator().manual_seed(5)
    ft = {n: (t.float() + 0.05 * torch.randn(t.shape, generator=g)).to(torch.bfloat16) for n, t in base.items()}
    write_checkpoint(tmp_path / "ft", ft)
    fs = factors(2)
    write_adapter(tmp_path / "lora", fs, r=2, alpha=4)
    theta = lora_model(base, fs, 2.0)
    refs = (ModelRef(tmp_path / "ft", {"weight": 0.5}), ModelRef(tmp_path / "lora", {"weight": 0.5}))
    merge(MergeSpec("dare_ties", tmp_path / "base", refs, {"density": 0.5}, seed=9), tmp_path / "out", block_bytes=200)
    got = load_model(tmp_path / "out")
    for name, b in base.items():
        want = dare_merge(
            "dare_ties",
            name,
            b.float(),
            [ft[name].float(), theta[name]],
            weights=[0.5, 0.5],
            densities=[0.5, 0.5],
            seed=9,
        )
        assert torch.equal(got[name], want.to(torch.bfloat16)), name


def test_full_weights_in_the_adapter_replace_the_base(tmp_path: Path) -> None:
    base = base_tensors()
    write_checkpoint(tmp_path / "base", base)
    norm = torch.full((16,), 2.0)
    extra = {"base_model.model.model.norm.modules_to_save.default.weight": norm}
    write_adapter(tmp_path / "lora", factors(2), r=2, alpha=2, extra=extra)
    spec = MergeSpec("task_arithmetic", tmp_path / "base", (ModelRef(tmp_path / "lora", {}),), {})
    merge(spec, tmp_path / "out")
    assert torch.equal(load_model(tmp_path / "out")["model.norm.weight"], norm)


def test_alpha_pattern_and_yaml(tmp_path: Path) -> None:
    base = base_tensors()
    write_checkpoint(tmp_path / "base", base)
    fs = factors(4)
    write_adapter(tmp_path / "lora", fs, r=4, alpha=4, config={"alpha_pattern": {"mlp.up_proj": 16}})
    (tmp_path / "m.yaml").write_text("merge_method: task_arithmetic\nbase_model: ./base\nmodels: [{model: ./lora}]\n")
    merge(load_config(tmp_path / "m.yaml"), tmp_path / "out", block_bytes=128)
    got = load_model(tmp_path / "out")
    for m, (a, b) in fs.items():
        s = 4.0 if "up_proj" in m else 1.0
        bf = base[f"{m}.weight"]
        assert torch.equal(got[f"{m}.weight"], bf + ((bf + lora_delta(a, b, s)) - bf)), m


def test_low_rank_rows_are_read_per_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = base_tensors()
    write_checkpoint(tmp_path / "base", base)
    write_adapter(tmp_path / "lora", factors(4), r=4, alpha=4)
    seen: list[tuple[str, int]] = []
    real = Reader.read_rows

    def spy(self: Reader, name: str, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        seen.append((name, r1 - r0))
        return real(self, name, r0, r1, out)

    monkeypatch.setattr(Reader, "read_rows", spy)
    spec = MergeSpec("task_arithmetic", tmp_path / "base", (ModelRef(tmp_path / "lora", {}),), {})
    merge(spec, tmp_path / "out", block_bytes=5 * 16 * 4)  # 5 rows per block
    b_reads = [n for name, n in seen if "lora_B" in name]
    assert b_reads and max(b_reads) <= 5  # B is read one block of rows at a time, never whole


def adapter_case(tmp_path: Path, **kw: object) -> Path:
    write_checkpoint(tmp_path / "base", base_tensors())
    return write_adapter(tmp_path / "lora", factors(2), r=2, alpha=2, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("damage", "parts"),
    [
        (lambda d: _config(d, use_dora=True), ["use_dora", "DoRA adapters are not supported yet"]),
        (lambda d: _config(d, fan_in_fan_out=True), ["fan_in_fan_out"]),
        (lambda d: _config(d, peft_type="IA3"), ["peft_type 'IA3'", "only LORA"]),
        (lambda d: _config(d, r=0), ["field 'r' must be a positive integer"]),
        (lambda d: _config(d, lora_alpha="x"), ["field 'lora_alpha' must be a number"]),
        (lambda d: (d / "adapter_config.json").write_text("{"), ["adapter_config.json", "cannot read"]),
        (lambda d: _weights(d, {"base_model.model.model.nope.lora_A.weight": torch.zeros(2, 16),
                                "base_model.model.model.nope.lora_B.weight": torch.zeros(16, 2)}),
         ["targets 'model.nope.weight'", "not a tensor of base"]),
        (lambda d: _weights(d, {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(2, 16),
                                "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": torch.zeros(36, 2)}),
         ["B @ A is [36, 16]", "is [37, 16]"]),
        (lambda d: _weights(d, {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(2, 16)}),
         ["has lora_A but not its pair"]),
        (lambda d: _weights(d, {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(2, 20)}),
         ["LoRA on embeddings is not supported yet"]),
        (lambda d: _weights(d, {"model.norm.weight": torch.zeros(16)}), ["does not start with 'base_model.model.'"]),
        (lambda d: (d / "adapter_model.safetensors").rename(d / "adapter_model.bin"), ["never unpickles"]),
    ],
)  # fmt: skip
def test_bad_adapter_is_one_error_line(tmp_path: Path, damage: object, parts: list[str]) -> None:
    folder = adapter_case(tmp_path)
    damage(folder)  # type: ignore[operator]
    spec = MergeSpec("task_arithmetic", tmp_path / "base", (ModelRef(folder, {}),), {})
    with pytest.raises(CheckpointError) as e:
        merge(spec, tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    for part in parts:
        assert part in str(e.value), str(e.value)


def _config(folder: Path, **changes: object) -> None:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))


def _weights(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(folder / "adapter_model.safetensors"))


def test_resume_refuses_a_changed_adapter_config(tmp_path: Path) -> None:
    """lora_alpha scales every delta: a resumed run must not mix two scalings."""
    from engine.errors import ResumeError

    write_checkpoint(tmp_path / "base", base_tensors())
    write_adapter(tmp_path / "lora", factors(4), r=4, alpha=8.0)
    spec = MergeSpec("task_arithmetic", tmp_path / "base", (ModelRef(tmp_path / "lora", {}),), {})

    def crash(e: dict[str, object]) -> None:
        if e["event"] == "tensor":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge(spec, tmp_path / "out", block_bytes=64, on_event=crash)
    _config(tmp_path / "lora", lora_alpha=16.0)
    with pytest.raises(ResumeError, match="inputs changed.*adapter_config.json"):
        merge(spec, tmp_path / "out", resume=True)
    _config(tmp_path / "lora", lora_alpha=8.0)
    merge(spec, tmp_path / "out", resume=True)


@pytest.mark.parametrize("full", ["bin", "bin_sharded", "safetensors"])
def test_a_full_model_beside_adapter_files_is_the_full_model(tmp_path: Path, full: str) -> None:
    """A whole model in any form (a `.bin` one too, single or sharded) is that model, whatever
    adapter files sit beside it: merged as the model, never as the adapter."""
    base = base_tensors()
    write_checkpoint(tmp_path / "base", base)
    model = {n: t + 1 for n, t in base.items()}
    folder = tmp_path / "ft"
    if full == "safetensors":
        write_checkpoint(folder, model)
    else:
        write_bin(folder, model, shards=2 if full == "bin_sharded" else 1)
    write_adapter(folder, factors(2), r=2, alpha=2)
    assert type(open_model(folder, None)) is Checkpoint
    spec = MergeSpec("task_arithmetic", tmp_path / "base", (ModelRef(folder, {}),), {})
    merge(spec, tmp_path / "out")
    got = load_model(tmp_path / "out")
    assert all(torch.equal(got[n], t) for n, t in model.items())


def test_adapter_files_are_never_read_as_a_full_model(tmp_path: Path) -> None:
    """Adapter weights without their config, or an adapter as the base, are said to be so in one
    line (not "no model.safetensors"); a lone adapter_model.bin says the same."""
    write_checkpoint(tmp_path / "base", base_tensors())
    lora = write_adapter(tmp_path / "lora", factors(2), r=2, alpha=2)
    assert isinstance(open_model(lora, None), LoraCheckpoint)
    with pytest.raises(CheckpointError) as e:
        merge(MergeSpec("task_arithmetic", lora, (ModelRef(tmp_path / "base", {}),), {}), tmp_path / "out")
    assert str(e.value) == (
        f"{lora}: a LoRA adapter cannot be the base (its weights are deltas of another model); give the full model "
        "it was trained from as the base"
    )
    (lora / "adapter_config.json").unlink()
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        with pytest.raises(CheckpointError) as e:
            merge(MergeSpec("task_arithmetic", tmp_path / "base", (ModelRef(lora, {}),), {}), tmp_path / "out")
        assert str(e.value) == (
            f"{lora}: {name} without adapter_config.json; a LoRA adapter needs its config (r, lora_alpha, "
            "target_modules): copy it in from where the adapter was saved"
        )
        if name != "adapter_model.bin":
            (lora / name).replace(lora / "adapter_model.bin")
