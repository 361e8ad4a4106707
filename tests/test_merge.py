"""Block-wise merges equal the whole-tensor references bit for bit, for any block size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open

from engine import MergeSpec, ModelRef, merge
from engine.io.checkpoint import Reader, open_checkpoint

from conftest import SHAPES, MakeFamily, family_tensors, write_checkpoint
from reference import load_model, merge_folders

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def spec_for(method: str, base: Path, models: list[Path], weights: list[float], **params: object) -> MergeSpec:
    refs = tuple(ModelRef(m, {"weight": w}) for m, w in zip(models, weights))
    return MergeSpec(method, base, refs, dict(params))  # type: ignore[arg-type]


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want) or set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert got[name].shape == t.shape, name
        assert torch.equal(got[name], t), f"{name} differs"


shapes_st = st.dictionaries(
    st.sampled_from([f"t{i}" for i in range(6)]),
    st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple),
    min_size=1,
    max_size=4,
)


@given(
    shapes=shapes_st,
    n_models=st.integers(1, 3),
    dtype=st.sampled_from(DTYPES),
    method=st.sampled_from(["linear", "task_arithmetic"]),
    weights=st.lists(st.floats(-2, 2, allow_nan=False, width=32), min_size=3, max_size=3),
    lam=st.floats(0.125, 2.0, width=32),
    normalize=st.booleans(),
    block_bytes=st.integers(1, 400),
    seed=st.integers(0, 2**16),
    direct_io=st.booleans(),
)
def test_blockwise_equals_reference(
    tmp_path_factory: pytest.TempPathFactory,
    shapes: dict[str, tuple[int, ...]],
    n_models: int,
    dtype: torch.dtype,
    method: str,
    weights: list[float],
    lam: float,
    normalize: bool,
    block_bytes: int,
    seed: int,
    direct_io: bool,
) -> None:
    root = tmp_path_factory.mktemp("prop")
    sets = family_tensors(shapes, n_models, seed, dtype)
    base = write_checkpoint(root / "base", sets[0])
    models = [write_checkpoint(root / f"ft{i}", s) for i, s in enumerate(sets[1:])]
    w = weights[:n_models]
    params: dict[str, object] = {"normalize": normalize}
    if method == "task_arithmetic":
        params["lambda"] = lam
    spec = spec_for(method, base, models, w, **params)
    merge(spec, root / "out", block_bytes=block_bytes, shard_size=200, direct_io=direct_io)
    want = merge_folders(method, base, models, weights=w, lam=lam, normalize=normalize)
    assert_same(load_model(root / "out"), want)


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("block_bytes", [2, 96, 10_000])
def test_sharded_inputs_and_outputs(tiny_family: MakeFamily, tmp_path: Path, shards: int, block_bytes: int) -> None:
    base, models = tiny_family(2, shards=shards)
    out = tmp_path / "out"
    merge(spec_for("task_arithmetic", base, models, [0.5, 0.25]), out, block_bytes=block_bytes, shard_size=1500)
    assert_same(load_model(out), merge_folders("task_arithmetic", base, models, weights=[0.5, 0.25]))


def test_output_layout_follows_base(tiny_family: MakeFamily, tmp_path: Path) -> None:
    base, models = tiny_family(2)
    out = tmp_path / "out"
    report = merge(spec_for("linear", base, models, [1.0, 1.0]), out, shard_size=1000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert report.shards == len(files) > 1
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert set(index["weight_map"]) == set(SHAPES)
    # total_size counts tensor bytes only, as Hugging Face's index does.
    assert index["metadata"]["total_size"] == sum(load_model(out)[n].nbytes for n in SHAPES)
    # Tensors appear in the base's order, shard after shard.
    order = [n for f in files for n in safe_open(str(out / f), "pt").keys()]  # noqa: SIM118
    base_order = list(safe_open(str(base / "model.safetensors"), "pt").keys())  # noqa: SIM118
    assert sorted(order) == sorted(base_order)
    with safe_open(str(out / files[0]), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["leanmerge"].startswith("0.1.0 spec-sha256:")
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_single_shard_output(tiny_family: MakeFamily, tmp_path: Path) -> None:
    base, models = tiny_family(1)
    out = tmp_path / "out"
    merge(spec_for("task_arithmetic", base, models, [1.0]), out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    assert_same(load_model(out), merge_folders("task_arithmetic", base, models))


def test_out_dtype_and_mixed_input_dtypes(tiny_family: MakeFamily, tmp_path: Path) -> None:
    base, models = tiny_family(2, dtypes=[torch.bfloat16, torch.float32, torch.float16])
    out = tmp_path / "out"
    spec = MergeSpec("task_arithmetic", base, tuple(ModelRef(m, {}) for m in models), {}, out_dtype="fp32")
    merge(spec, out, block_bytes=64)
    assert_same(load_model(out), merge_folders("task_arithmetic", base, models, out_dtype=torch.float32))
    config = json.loads((out / "config.json").read_text())
    assert (config["dtype"], config["torch_dtype"]) == ("float32", "float32")


def test_config_dtype_is_the_one_most_elements_are_written_in(tmp_path: Path) -> None:
    """float32 norms beside bfloat16 matrices: config.json says bfloat16, under both keys, though
    the base's config said float32 and no --out-dtype was given; a config stating it stays as is."""
    tensors = {"w.weight": torch.ones(16, 8, dtype=torch.bfloat16), "norm.weight": torch.ones(8)}
    base = write_checkpoint(tmp_path / "base", tensors)
    (base / "config.json").write_text('{"dtype": "float32", "vocab_size": 5}')
    merge(MergeSpec("passthrough", base, (), {}), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {
        "dtype": "bfloat16",
        "vocab_size": 5,
        "torch_dtype": "bfloat16",
    }
    stated = '{"torch_dtype": "bfloat16", "dtype": "bfloat16"}'
    (base / "config.json").write_text(stated)
    merge(MergeSpec("passthrough", base, (), {}), tmp_path / "again")
    assert (tmp_path / "again" / "config.json").read_text() == stated


def test_linear_never_reads_the_base(tiny_family: MakeFamily, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """linear ignores the base's values (a template for names and shapes), so it reads only the
    models: fewer bytes from disk, and a base whose values are garbage changes nothing."""
    base, models = tiny_family(2, dtype=torch.float16)
    for shard in base.glob("*.safetensors"):  # every value NaN; the header stays valid
        header = 8 + int.from_bytes(shard.read_bytes()[:8], "little")
        shard.write_bytes(shard.read_bytes()[:header] + b"\xff" * (shard.stat().st_size - header))
    read_from: set[Path] = set()
    real = Reader.read_rows

    def spy(self: Reader, name: str, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        read_from.add(self.ckpt.folder)
        return real(self, name, r0, r1, out)

    monkeypatch.setattr(Reader, "read_rows", spy)
    spec = spec_for("linear", base, models, [0.5, 1.5])
    report = merge(spec, tmp_path / "out", block_bytes=40)
    assert {f.resolve() for f in read_from} == {m.resolve() for m in models}
    assert report.bytes_read == sum(open_checkpoint(m).nbytes for m in models)
    assert_same(load_model(tmp_path / "out"), merge_folders("linear", base, models, weights=[0.5, 1.5]))


def test_non_float_tensors_are_copied(tmp_path: Path) -> None:
    tensors = [
        {
            "w": torch.randn(7, 3).to(torch.bfloat16),
            "ids": torch.arange(11, dtype=torch.int64),
            "m": torch.ones(4, dtype=torch.bool),
        }
        for _ in range(2)
    ]
    tensors[1]["ids"] = tensors[0]["ids"]
    base = write_checkpoint(tmp_path / "base", tensors[0])
    ft = write_checkpoint(tmp_path / "ft", tensors[1])
    merge(spec_for("task_arithmetic", base, [ft], [1.0]), tmp_path / "out", block_bytes=8)
    got = load_model(tmp_path / "out")
    assert torch.equal(got["ids"], tensors[0]["ids"]) and torch.equal(got["m"], tensors[0]["m"])
    assert_same(got, merge_folders("task_arithmetic", base, [ft]))
