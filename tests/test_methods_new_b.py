"""sce, ram, ramplus_tl and model stock's filter_wise: block-wise output equals the whole-tensor
references (tests/reference_select.py) bit for bit, for every block size; the YAML through the
command line; one-line parameter errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import MergeSpec, ModelRef, merge
from engine.cli import main
from engine.errors import SpecError
from engine.methods.row_stock import row_sums
from engine.methods.sce import k_of

from conftest import family_tensors, write_checkpoint
from reference import load_model
from reference_select import _row_sums, merge_folders_select

METHODS = ["sce", "ram", "ramplus_tl", "model_stock"]
SHAPES = {"w": (37, 24), "v": (24,), "s": (), "c": (5, 3, 4), "n": (9, 1), "e": (0, 8)}


def spec(method: str, base: Path, models: list[Path], g: dict[str, object]) -> MergeSpec:
    return MergeSpec(method, base, tuple(ModelRef(m, {}) for m in models), dict(g))  # type: ignore[arg-type]


def family(
    root: Path, shapes: dict[str, tuple[int, ...]], n: int, seed: int, dtype: torch.dtype
) -> tuple[Path, list[Path]]:
    sets = family_tensors(shapes, n, seed, dtype)
    base = write_checkpoint(root / "base", sets[0])
    return base, [write_checkpoint(root / f"ft{i}", s, shards=1 + i % 2) for i, s in enumerate(sets[1:])]


def params_for(method: str, draw: st.DrawFn) -> dict[str, object]:
    if method == "sce":
        return {"select_topk": draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))}
    if method == "model_stock":
        return {"filter_wise": draw(st.booleans())}
    g: dict[str, object] = {"epsilon": draw(st.sampled_from([0.0, 0.02, 0.05, 0.1]))}
    if method == "ramplus_tl":
        g |= {"r": draw(st.sampled_from([0.1, 1.0, -0.5])), "alpha": draw(st.sampled_from([0.0, 0.2, 3.0]))}
    return g


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, dict[str, object]]:
    method = draw(st.sampled_from(METHODS))
    return method, params_for(method, draw)


@settings(max_examples=40, deadline=None)
@given(
    case=cases(),
    shapes=st.dictionaries(
        st.sampled_from(["a", "b.weight", "c.bias"]),
        st.lists(st.integers(0, 13), min_size=0, max_size=3).map(tuple),
        min_size=1,
        max_size=3,
    ),
    n_models=st.integers(1, 3),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    block_bytes=st.integers(1, 300),
    seed=st.integers(0, 999),
)
def test_blockwise_equals_reference(
    tmp_path_factory: pytest.TempPathFactory,
    case: tuple[str, dict[str, object]],
    shapes: dict[str, tuple[int, ...]],
    n_models: int,
    dtype: torch.dtype,
    block_bytes: int,
    seed: int,
) -> None:
    method, g = case
    n_models = max(2, n_models) if method == "model_stock" else n_models
    root = tmp_path_factory.mktemp(method)
    base, models = family(root, shapes, n_models, seed, dtype)
    merge(spec(method, base, models, g), root / "out", block_bytes=block_bytes)
    want = merge_folders_select(method, base, models, **g)
    got = load_model(root / "out")
    for name, w in want.items():
        assert torch.equal(got[name], w), (name, method, g)


@pytest.mark.parametrize(
    ("method", "g"),
    [
        ("sce", {"select_topk": 0.3}),
        ("ramplus_tl", {"epsilon": 0.03, "r": 0.5, "alpha": 0.3}),
        ("model_stock", {"filter_wise": True}),
    ],
)
def test_large_tensor_across_chunks_and_blocks(tmp_path: Path, method: str, g: dict[str, object]) -> None:
    """Many 2**18-element compute chunks per block, many blocks; bf16 deltas, so the variance
    cut falls among many equal values."""
    base, models = family(tmp_path, {"w": (700, 600), "v": (300_001,)}, 3, 5, torch.bfloat16)
    want = merge_folders_select(method, base, models, **g)
    for b in (3 << 20, 150_000):
        merge(spec(method, base, models, g), tmp_path / f"out{b}", block_bytes=b)
        got = load_model(tmp_path / f"out{b}")
        assert all(torch.equal(got[n], w) for n, w in want.items()), b


def test_filter_wise_takes_one_angle_per_row(tmp_path: Path) -> None:
    """Rows whose deltas agree keep the models' mean; rows whose deltas oppose keep the base."""
    base = torch.zeros(2, 4)
    ft1, ft2 = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 1]]), torch.tensor([[1.0, 1, 1, 1], [-1, -1, -1, -1]])
    folders = [write_checkpoint(tmp_path / n, {"w": t}) for n, t in (("b", base), ("m1", ft1), ("m2", ft2))]
    merge(spec("model_stock", folders[0], folders[1:], {"filter_wise": True}), tmp_path / "out")
    assert torch.equal(load_model(tmp_path / "out")["w"], torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 0]]))


def test_row_sums_order() -> None:
    """The engine's and the reference's row sums agree on a row whose order matters."""
    terms = torch.tensor([[1e16, 1.0, -1e16, 1.0, 3.0]], dtype=torch.float64)
    assert (
        float(row_sums(terms)[0]) == float(_row_sums(terms.numpy())[0]) == 6.0
    )  # ((1e16 + 3) − 1e16) + (1 + 1); in order: 4


def test_sce_k_is_mergekit_float32_product() -> None:
    """mergekit's k = int(count_nonzero · select_topk) is a float32 product: 10 · 0.3 is 3, and
    for 2**25 + 3 non-zero variances at 0.5 the count rounds to 2**25 + 4 first."""
    assert k_of(0.3)(10) == 3
    assert k_of(0.5)((1 << 25) + 3) == (1 << 24) + 2  # exact: 2**24 + 1


def test_yaml_config_through_the_cli(tmp_path: Path) -> None:
    base, models = family(tmp_path, {"w": (13, 8), "v": (8,)}, 3, 1, torch.bfloat16)
    cases = {
        "sce": ("parameters: {select_topk: 0.4}", {"select_topk": 0.4}),
        "ramplus_tl": ("parameters: {r: 0.3, alpha: 0.5, epsilon: 0.01}", {"r": 0.3, "alpha": 0.5, "epsilon": 0.01}),
        "model_stock": ("parameters:\n  filter_wise: true", {"filter_wise": True}),
    }
    for method, (params, g) in cases.items():
        listed = "".join(f"  - model: {m}\n" for m in models)
        cfg = tmp_path / f"{method}.yaml"
        cfg.write_text(f"merge_method: {method}\nbase_model: {base}\nmodels:\n{listed}{params}\ndtype: bfloat16\n")
        result = CliRunner().invoke(main, ["merge", str(cfg), str(tmp_path / method)])
        assert result.exit_code == 0, result.output
        want = merge_folders_select(method, base, models, **g)
        got = load_model(tmp_path / method)
        assert all(torch.equal(got[n], w) for n, w in want.items()), method


@pytest.mark.parametrize(
    ("method", "g", "message"),
    [
        ("sce", {"select_topk": 1.5}, "'select_topk' must lie in [0, 1], got 1.5"),
        ("ram", {"epsilon": -1.0}, "'epsilon' must be a finite number >= 0, got -1.0"),
        ("ramplus_tl", {"alpha": -0.1}, "'alpha' must be a finite number >= 0, got -0.1"),
        ("ramplus_tl", {"r": float("inf")}, "'r' must be a finite number, got inf"),
        ("sce", {"weight": 0.5}, "'weight'"),
    ],
)
def test_bad_parameters_are_one_line_spec_errors(
    tmp_path: Path, method: str, g: dict[str, object], message: str
) -> None:
    with pytest.raises(SpecError) as e:
        spec(method, tmp_path, [tmp_path / "m0"], g)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
