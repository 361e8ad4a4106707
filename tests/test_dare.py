"""DARE family: exact agreement with whole-tensor references, and statistics that cannot pass by
accident (6-sigma bands derived from the binomial)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from engine import MergeSpec, ModelRef, merge
from engine.cli import main
from engine.methods.base import Chunk, TensorParams
from engine.methods.registry import get_method
from engine.rng import KeyedRng, stream_key

from conftest import MakeFamily, family_tensors, write_checkpoint
from reference import load_model, merge_folders

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def dare_spec(
    method: str, base: Path, models: list[Path], weights: list[float], densities: list[float], **g: object
) -> MergeSpec:
    refs = tuple(ModelRef(m, {"weight": w, "density": d}) for m, w, d in zip(models, weights, densities))
    seed = int(g.pop("seed", 0))  # type: ignore[call-overload]
    return MergeSpec(method, base, refs, dict(g), seed=seed)  # type: ignore[arg-type]


def digests(folder: Path) -> dict[str, str]:
    return {
        n: hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        for n, t in load_model(folder).items()
    }


@given(
    shapes=st.dictionaries(
        st.sampled_from(["a", "b.weight", "c.bias", "d"]),
        st.lists(st.integers(0, 11), min_size=0, max_size=3).map(tuple),
        min_size=1,
        max_size=3,
    ),
    n_models=st.integers(1, 3),
    dtype=st.sampled_from(DTYPES),
    method=st.sampled_from(["dare_linear", "dare_ties"]),
    weights=st.lists(st.sampled_from([-0.5, 0.25, 0.5, 1.0, 1.5]), min_size=3, max_size=3),
    densities=st.lists(st.sampled_from([0.05, 0.3, 0.5, 0.9, 1.0]), min_size=3, max_size=3),
    normalize=st.booleans(),
    rescale=st.booleans(),
    block_bytes=st.integers(1, 300),
    seed=st.integers(0, 2**40),
)
def test_dare_blockwise_equals_reference(
    tmp_path_factory: pytest.TempPathFactory,
    shapes: dict[str, tuple[int, ...]],
    n_models: int,
    dtype: torch.dtype,
    method: str,
    weights: list[float],
    densities: list[float],
    normalize: bool,
    rescale: bool,
    block_bytes: int,
    seed: int,
) -> None:
    root = tmp_path_factory.mktemp("dare")
    sets = family_tensors(shapes, n_models, 7, dtype)
    base = write_checkpoint(root / "base", sets[0])
    models = [write_checkpoint(root / f"ft{i}", s) for i, s in enumerate(sets[1:])]
    w, d = weights[:n_models], densities[:n_models]
    spec = dare_spec(method, base, models, w, d, normalize=normalize, rescale=rescale, seed=seed, **{"lambda": 0.75})
    merge(spec, root / "out", block_bytes=block_bytes)
    want = merge_folders(
        method, base, models, weights=w, densities=d, seed=seed, lam=0.75, normalize=normalize, rescale=rescale
    )
    got = load_model(root / "out")
    for name, t in want.items():
        assert torch.equal(got[name], t), name


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_same_bytes_for_any_block_size(tiny_family: MakeFamily, tmp_path: Path, method: str) -> None:
    base, models = tiny_family(3, shards=2)
    spec = dare_spec(method, base, models, [0.5, 0.3, 0.2], [0.2, 0.5, 0.7], seed=1234)
    runs = [digests(Path(merge(spec, tmp_path / f"out{b}", block_bytes=b).output)) for b in (2, 50, 777, 1 << 20)]
    assert all(r == runs[0] for r in runs[1:])


def test_chunks_in_any_order_give_the_same_bytes() -> None:
    """A run split in two halves (as a resumed run is) computes the same values as one pass."""
    method = get_method("dare_ties")
    g = torch.Generator().manual_seed(3)
    base = torch.randn(10_001, generator=g)
    models = [base + 0.01 * torch.randn(10_001, generator=g) for _ in range(3)]
    p = TensorParams(
        {"lambda": 1.0, "normalize": True, "rescale": True}, tuple({"weight": 1.0, "density": 0.3} for _ in range(3))
    )
    streams = tuple(KeyedRng(stream_key(5, "t", m)) for m in range(3))
    whole = method.apply(base, [m.clone() for m in models], p, {}, Chunk(streams, 0))  # apply overwrites models
    for cut in (1, 4_999, 10_000):
        second = method.apply(base[cut:], [m[cut:].clone() for m in models], p, {}, Chunk(streams, cut))
        first = method.apply(base[:cut], [m[:cut].clone() for m in models], p, {}, Chunk(streams, 0))
        assert torch.equal(torch.cat([first, second]), whole)


def single_model_delta(
    density: float, seed: int, rescale: bool = True, n: int = 200_003
) -> tuple[torch.Tensor, torch.Tensor]:
    """(δ, δ̂) for a single-model dare_linear over n float32 elements."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(n, generator=g)
    model = base + torch.randn(n, generator=g) * 0.1
    p = TensorParams({"lambda": 1.0, "normalize": False, "rescale": rescale}, ({"weight": 1.0, "density": density},))
    out = get_method("dare_linear").apply(base, [model.clone()], p, {}, Chunk((KeyedRng(stream_key(seed, "w", 0)),), 0))
    return model - base, out - base


@pytest.mark.parametrize("density", [0.01, 0.1, 0.5, 0.9, 0.99])
def test_kept_fraction_in_binomial_band(density: float) -> None:
    delta, merged = single_model_delta(density, seed=0)
    n = delta.numel()
    kept = int((merged != 0).sum())
    sigma = math.sqrt(n * density * (1 - density))
    assert abs(kept - n * density) <= 6 * sigma


def test_masks_of_models_tensors_and_seeds_are_uncorrelated() -> None:
    n, d = 1_000_000, 0.5
    masks = {
        "ref": KeyedRng(stream_key(0, "layers.0.w", 0)).keep(0, n, d),
        "model": KeyedRng(stream_key(0, "layers.0.w", 1)).keep(0, n, d),
        "tensor": KeyedRng(stream_key(0, "layers.1.w", 0)).keep(0, n, d),
        "seed": KeyedRng(stream_key(1, "layers.0.w", 0)).keep(0, n, d),
    }
    ref = masks.pop("ref").float()
    for what, m in masks.items():
        r = torch.corrcoef(torch.stack([ref, m.float()]))[0, 1].item()
        assert abs(r) < 6 / math.sqrt(n), what


def test_rescale_is_unbiased_over_seeds() -> None:
    """Averaging δ̂ over S seeds recovers δ within 6 standard errors, element by element."""
    d, seeds = 0.5, 400
    delta, _ = single_model_delta(d, 0, n=2_000)
    mean = torch.stack([single_model_delta(d, s, n=2_000)[1] for s in range(seeds)]).mean(0)
    stderr = delta.abs() * math.sqrt((1 - d) / d / seeds)
    assert bool(((mean - delta).abs() <= 6 * stderr + 1e-6).all())


@pytest.mark.parametrize(("dare_method", "twin"), [("dare_linear", "task_arithmetic"), ("dare_ties", None)])
def test_density_one_equals_non_dare_twin(
    tiny_family: MakeFamily, tmp_path: Path, dare_method: str, twin: str | None
) -> None:
    base, models = tiny_family(3)
    spec = dare_spec(dare_method, base, models, [0.5, 1.0, -0.25], [1.0, 1.0, 1.0], normalize=True)
    merge(spec, tmp_path / "dare", block_bytes=40)
    got = load_model(tmp_path / "dare")
    if twin is not None:
        refs = tuple(ModelRef(m, {"weight": w}) for m, w in zip(models, [0.5, 1.0, -0.25]))
        merge(MergeSpec(twin, base, refs, {"normalize": True}), tmp_path / "twin")
        want = load_model(tmp_path / "twin")
    else:  # TIES with nothing trimmed
        want = merge_folders("dare_ties", base, models, weights=[0.5, 1.0, -0.25], densities=[1.0] * 3, normalize=True)
    for name, t in want.items():
        assert torch.equal(got[name], t), name


def test_drop_only_is_density_times_dare() -> None:
    d = 0.3
    dare_delta = single_model_delta(d, seed=9)[1]
    drop_delta = single_model_delta(d, seed=9, rescale=False)[1]
    assert torch.equal(dare_delta == 0, drop_delta == 0)
    torch.testing.assert_close(drop_delta, dare_delta * d, rtol=2e-6, atol=1e-7)


def test_sparsify_one_model_from_cli(tiny_family: MakeFamily, tmp_path: Path) -> None:
    """`--method dare_linear` with one model: the paper's 'remove 90% of delta parameters'."""
    base, (ft,) = tiny_family(1, dtype=torch.float32)
    out = tmp_path / "sparse"
    args = [
        "merge",
        "--method",
        "dare_linear",
        "--base",
        str(base),
        "--model",
        str(ft),
        "--density",
        "0.1",
        "--seed",
        "42",
        "-o",
        str(out),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    b, f, s = load_model(base), load_model(ft), load_model(out)
    delta = s["embed.weight"] - b["embed.weight"]
    kept = delta != 0
    assert 0.02 < kept.float().mean().item() < 0.25
    torch.testing.assert_close(delta[kept], (f["embed.weight"] - b["embed.weight"])[kept] / 0.1, rtol=1e-5, atol=1e-6)
