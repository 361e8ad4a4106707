"""Tiny synthetic checkpoints, written with safetensors' own `save_file` so that our reader is
tested against files we did not write ourselves."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from engine.io.torch_bin import BIN_INDEX, BIN_SINGLE
from engine.methods.registry import METHODS
from engine.spec import MergeSpec, ModelRef

settings.register_profile("ci", deadline=None, derandomize=True, max_examples=40)
settings.register_profile("dev", deadline=None, max_examples=40)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# Odd row counts, 1-D, 0-D and an empty tensor: the edge cases of row blocking.
SHAPES: dict[str, tuple[int, ...]] = {
    "embed.weight": (37, 24),
    "layers.0.attn.weight": (24, 24),
    "layers.0.norm.weight": (24,),
    "layers.0.mlp.weight": (61, 24),
    "scale": (),
    "layers.1.conv.weight": (5, 3, 4),
    "empty": (0, 8),
}


def llama_shapes(n_layers: int) -> dict[str, tuple[int, ...]]:
    """A Llama-shaped miniature: embeddings (pre weights), `n_layers` numbered layers, the final
    norm and lm_head (post weights), in the order HF checkpoints list them."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (13, 8)}
    for i in range(n_layers):
        shapes |= {
            f"model.layers.{i}.self_attn.q_proj.weight": (8, 8),
            f"model.layers.{i}.mlp.up_proj.weight": (6, 8),
            f"model.layers.{i}.input_layernorm.weight": (8,),
        }
    return shapes | {"model.norm.weight": (8,), "lm_head.weight": (13, 8)}


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """Save `tensors` as a HF model folder: one file, or `shards` files plus the index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny", "torch_dtype": "bfloat16"}))
    (folder / "tokenizer.json").write_text("{}")
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return folder


def write_bin(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """`tensors` as a transformers `.bin` folder: `pytorch_model.bin`, or shards and their index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny", "torch_dtype": "bfloat16"}))
    if shards == 1:
        torch.save(tensors, folder / BIN_SINGLE)
        return folder
    names, weight_map = list(tensors), {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: tensors[n] for n in names[i::shards]}
        torch.save(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    (folder / BIN_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def family_tensors(
    shapes: dict[str, tuple[int, ...]], n_models: int, seed: int, dtype: torch.dtype, delta: float = 0.05
) -> list[dict[str, torch.Tensor]]:
    """Base tensors and n_models fine-tunes (base + small noise), all in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    out = [{n: t.to(dtype) for n, t in base.items()}]
    for _ in range(n_models):
        out.append({n: (t + delta * torch.randn(t.shape, generator=g)).to(dtype) for n, t in base.items()})
    return out


def stepped_family(root: Path, skewed: bool, shapes: dict[str, tuple[int, ...]]) -> tuple[Path, list[Path]]:
    """A bf16 base of small integers and 3 fine-tunes whose deltas are ±1, ±2 or ±3 (exact):
    TIES' top 15% of |delta| then ends at 3.0, and a guess from any block finds its bucket. Where
    `skewed`, the first tenth of the rows' deltas are all ±3 and the rest ±1 or ±2: the threshold
    is 2.0, far from a first block's guess (3.0), so the top-k select needs its second pass."""
    g = torch.Generator().manual_seed(3)
    base = {n: torch.randint(-50, 50, s, generator=g).float() for n, s in shapes.items()}
    sets = [base]
    for _ in range(3):
        ft = {}
        for n, b in base.items():
            size = torch.randint(1, 3 if skewed else 4, b.shape, generator=g)
            if skewed:
                size[: max(1, len(size) // 10)] = 3
            ft[n] = b + size * (torch.randint(0, 2, b.shape, generator=g) * 2 - 1)
        sets.append(ft)
    folders = [
        write_checkpoint(root / name, {n: t.bfloat16() for n, t in ts.items()})
        for name, ts in zip(["base", "ft1", "ft2", "ft3"], sets)
    ]
    return folders[0], folders[1:]


MakeFamily = Callable[..., tuple[Path, list[Path]]]


def write_family(
    root: Path,
    n_models: int = 2,
    *,
    shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    shards: int = 1,
    base_shards: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
) -> tuple[Path, list[Path]]:
    """Write a base and `n_models` fine-tunes under `root` (`dtypes`: one per folder, base first;
    `base_shards`: the base's shards where they differ); returns (base_dir, [model_dirs])."""
    sets = family_tensors(shapes or SHAPES, n_models, seed, dtype)
    if dtypes is not None:
        sets = [{n: t.to(d) for n, t in s.items()} for s, d in zip(sets, dtypes)]
    base = write_checkpoint(root / "base", sets[0], shards if base_shards is None else base_shards)
    models = [write_checkpoint(root / f"ft{i}", s, shards) for i, s in enumerate(sets[1:], 1)]
    return base, models


@pytest.fixture
def tiny_family(tmp_path: Path) -> MakeFamily:
    """Write a base and fine-tunes under tmp_path (`write_family`'s arguments); returns
    (base_dir, [model_dirs])."""
    counter = [0]

    def make(n_models: int = 2, **kw: object) -> tuple[Path, list[Path]]:
        counter[0] += 1
        return write_family(tmp_path / f"family{counter[0]}", n_models, **kw)  # type: ignore[arg-type]

    return make


def shape_dicts(low: int = 0, high: int = 13) -> st.SearchStrategy[dict[str, tuple[int, ...]]]:
    """One to three tensors named like a weight, a bias and neither, each 0-D to 3-D with dims in
    [low, high] (0: an empty tensor): the shapes the block-wise property tests draw."""
    shape = st.lists(st.integers(low, high), min_size=0, max_size=3).map(tuple)
    return st.dictionaries(st.sampled_from(["a", "b.weight", "c.bias"]), shape, min_size=1, max_size=3)


def valid_spec(method: str, base: Path, models: Sequence[Path]) -> MergeSpec:
    """A `MergeSpec` of `method` with valid parameters: weights where it takes them, density 0.5,
    t 0.3 (nearswap has no default), at most its number of models."""
    impl = METHODS[method]
    weighted = impl.param("weight") is not None
    refs = tuple(ModelRef(m, {"weight": w} if weighted else {}) for m, w in zip(models, [1.0, 0.5, -0.25]))
    params: dict[str, float] = {"density": 0.5} if impl.param("density") is not None else {}
    if impl.param("t") is not None:
        params["t"] = 0.3
    return MergeSpec(method, base, refs[: impl.max_models], params, seed=3)
