"""nuslerp, multislerp, karcher, nearswap: block-wise output equals the whole-tensor references
(tests/reference_geometric.py) bit for bit at any block size; the YAML forms run through the CLI;
bad parameters are one-line errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import MergeSpec, ModelRef, merge
from engine.cli import main
from engine.config import load_config
from engine.errors import BudgetError, SpecError
from engine.methods.karcher import karcher_coefficients

from conftest import MakeFamily, family_tensors, shape_dicts, write_checkpoint
from reference import load_model
from reference_geometric import (
    _gram,
    arcee_fusion_ref,
    karcher_literal,
    karcher_ref,
    multislerp_ref,
    nearswap_ref,
    nuslerp_ref,
)

# (method, global parameters, whether a base_model is given)
CASES = [
    ("nuslerp", {}, True),
    ("nuslerp", {}, False),
    ("nuslerp", {"nuslerp_flatten": False}, True),
    ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}, False),
    ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}, True),
    ("multislerp", {}, True),
    ("multislerp", {"normalize_weights": False}, False),
    ("karcher", {"max_iter": 10, "tol": 1e-5}, True),
    ("karcher", {"max_iter": 3, "tol": 0.0}, True),
    ("nearswap", {"t": 0.02}, True),
    ("arcee_fusion", {}, True),
]
WEIGHTS = [0.7, 0.4, 1.3, 0.9]
CONFIGS = Path(__file__).parent / "configs"


def reference(
    method: str, g: dict[str, object], has_base: bool, base: torch.Tensor, models: list[torch.Tensor]
) -> torch.Tensor:
    w = WEIGHTS[: len(models)] if has_base else WEIGHTS[: len(models) + 1]
    vectors = models if has_base else [base, *models]
    origin = base if has_base else None
    if method == "nuslerp":
        flatten, rows = bool(g.get("nuslerp_flatten", True)), bool(g.get("nuslerp_row_wise", False))
        return nuslerp_ref(origin, vectors, w, flatten, rows)
    if method == "multislerp":
        return multislerp_ref(origin, vectors, w, bool(g.get("normalize_weights", True)))
    if method == "karcher":
        return karcher_ref(models, int(g["max_iter"]), float(g["tol"]))  # type: ignore[call-overload, arg-type]
    if method == "arcee_fusion":
        return arcee_fusion_ref(base, models[0])
    return nearswap_ref(base, models[0], float(g["t"]))  # type: ignore[arg-type]


def spec_for(method: str, g: dict[str, object], has_base: bool, base: Path, models: list[Path]) -> MergeSpec:
    w = WEIGHTS if has_base else WEIGHTS[1:]
    refs = tuple(ModelRef(m, {"weight": x} if method in ("nuslerp", "multislerp") else {}) for m, x in zip(models, w))
    base_params = {"weight": WEIGHTS[0]} if not has_base else {}
    return MergeSpec(method, base, refs, dict(g), base_is_model=not has_base, base_params=base_params)  # type: ignore[arg-type]


def check_merge(
    root: Path, case: tuple[str, dict[str, object], bool], sets: list[dict[str, torch.Tensor]], blocks: list[int]
) -> None:
    method, g, has_base = case
    base = write_checkpoint(root / "base", sets[0])
    models = [write_checkpoint(root / f"ft{i}", s) for i, s in enumerate(sets[1:])]
    want = {}
    for name, b in sets[0].items():
        ms = [s[name].float() for s in sets[1:]]
        want[name] = reference(method, g, has_base, b.float(), ms).to(b.dtype)
    for block in blocks:
        out = root / f"out{block}"
        merge(spec_for(method, g, has_base, base, models), out, block_bytes=block)
        got = load_model(out)
        for name, w in want.items():
            assert torch.equal(got[name], w), (name, block)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    case=st.sampled_from(CASES),
    shapes=shape_dicts(1, 9),
    k=st.integers(1, 3),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    block_bytes=st.integers(1, 300),
    seed=st.integers(0, 1000),
)
def test_blockwise_equals_reference(
    tmp_path_factory: pytest.TempPathFactory,
    case: tuple[str, dict[str, object], bool],
    shapes: dict[str, tuple[int, ...]],
    k: int,
    dtype: torch.dtype,
    block_bytes: int,
    seed: int,
) -> None:
    method, _, has_base = case
    n = {"nuslerp": 2 if has_base else 1, "nearswap": 1, "arcee_fusion": 1}.get(method, k)
    sets = family_tensors(shapes, n, seed, dtype)
    if method == "arcee_fusion":  # a 1-D tensor in one block (test_arcee_fusion_1d_in_pieces)
        block_bytes = max(block_bytes, 40)
    check_merge(tmp_path_factory.mktemp(method), case, sets, [block_bytes, 1 << 20])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{'-'.join(map(str, c[1].values()))}-{c[2]}")
def test_larger_tensors_any_block(tmp_path: Path, case: tuple[str, dict[str, object], bool]) -> None:
    """Tensors of many compute chunks and C tiles, blocks cut inside fibres and pairwise groups."""
    method, _, has_base = case
    n = {"nuslerp": 2 if has_base else 1, "nearswap": 1, "arcee_fusion": 1}.get(method, 3 if has_base else 2)
    one_d = (70,) if method == "arcee_fusion" else (9001,)  # arcee_fusion softmaxes a 1-D tensor whole
    sets = family_tensors({"w": (301, 170), "v": one_d, "s": ()}, n, 3, torch.bfloat16)
    blocks = [40_000, 1 << 22] if method == "arcee_fusion" else [1 << 12, 40_000, 1 << 22]  # ~7 ms per torch call here
    check_merge(tmp_path, case, sets, blocks)


def test_karcher_coefficients_are_the_literal_iteration() -> None:
    """The iteration on u's coefficients over the Gram matrix is mergekit's on the vectors."""
    g = torch.Generator().manual_seed(1)
    for k in (2, 3, 5):
        base = torch.randn(4000, generator=g)
        models = [base + 0.8 * torch.randn(4000, generator=g) for _ in range(k)]
        for max_iter in (0, 1, 10):
            got = karcher_coefficients(_gram(models), max_iter, 1e-5)
            combined = sum(c * m.double() for c, m in zip(got, models))
            want = karcher_literal(models, max_iter, 1e-5)
            assert torch.allclose(combined, want, rtol=0, atol=1e-10 * float(want.abs().max()))  # type: ignore[arg-type]


def test_example_configs_through_the_cli(tiny_family: MakeFamily) -> None:
    """tests/configs/{nuslerp,multislerp,karcher,nearswap,arcee_fusion}.yaml (no base_model for nuslerp and
    karcher, the base listed among the models for the others) merge through the CLI to the bytes
    of the in-process merge, which tests/test_config.py holds to the references."""
    base, _ = tiny_family(2, shapes={"w": (7, 5), "b": (5,)})
    root = base.parent
    for method in ("nuslerp", "multislerp", "karcher", "nearswap", "arcee_fusion"):
        cfg = Path(shutil.copy(CONFIGS / f"{method}.yaml", root / f"{method}.yaml"))
        result = CliRunner().invoke(main, ["merge", str(cfg), str(root / method)])
        assert result.exit_code == 0, result.output
        merge(load_config(cfg), root / f"{method}-api")
        got, want = load_model(root / method), load_model(root / f"{method}-api")
        assert got.keys() == want.keys() and all(torch.equal(got[n], w) for n, w in want.items()), method


@pytest.mark.parametrize(
    ("method", "g", "n", "message"),
    [
        ("nearswap", {}, 1, "nearswap needs the global parameter 't'"),
        ("nearswap", {"t": float("inf")}, 1, "'t' must be a finite number, got inf"),
        ("nuslerp", {}, 1, "nuslerp merges exactly two models: list two models besides base_model, got 1"),
        ("karcher", {"max_iter": 2.5}, 2, "'max_iter' must be a whole number in [0, 10000], got 2.5"),
        ("karcher", {"tol": -1.0}, 2, "'tol' must be a finite number >= 0, got -1.0"),
        ("multislerp", {"eps": 0.0}, 2, "'eps' must be a finite number > 0, got 0.0"),
    ],
)
def test_bad_parameters(tmp_path: Path, method: str, g: dict[str, object], n: int, message: str) -> None:
    with pytest.raises(SpecError) as e:
        MergeSpec(method, tmp_path, tuple(ModelRef(tmp_path, {}) for _ in range(n)), g)  # type: ignore[arg-type]
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("numel", "block_bytes", "says"),
    [
        (100, 64, "but a block here holds 16: raise --block-size so that one block holds it"),
        ((1 << 18) + 1, None, "but a compute chunk holds at most 262144: merge this model with another method"),
    ],
)
def test_arcee_fusion_1d_in_pieces(tmp_path: Path, numel: int, block_bytes: int | None, says: str) -> None:
    """A 1-D tensor is one softmax vector: cut by the block (a fix: a larger block) or by the
    CPU's compute chunk (none), it is refused on one line naming the tensor and the limit."""
    sets = family_tensors({"v": (numel,)}, 1, 0, torch.float32)
    base, ft = (write_checkpoint(tmp_path / n, s) for n, s in zip(("base", "ft"), sets))
    with pytest.raises(BudgetError) as e:
        merge(MergeSpec("arcee_fusion", base, (ModelRef(ft, {}),), {}), tmp_path / "out", block_bytes=block_bytes)
    assert str(e.value) == f"arcee_fusion: tensor 'v' is 1-D, one softmax vector of {numel} elements, {says}"


def test_card_config_without_base_model_round_trips(tiny_family: MakeFamily) -> None:
    """The mergekit_config.yml written for a nuslerp without base_model reads back as the same spec."""
    base, _ = tiny_family(2, shapes={"w": (3, 4)})
    cfg = Path(shutil.copy(CONFIGS / "nuslerp.yaml", base.parent / "nuslerp.yaml"))
    spec = load_config(cfg)
    merge(spec, base.parent / "out")
    assert load_config(base.parent / "out" / "mergekit_config.yml").digest() == spec.digest()


def test_karcher_averages_an_unlisted_base_model_in(tmp_path: Path) -> None:
    """mergekit adds a base_model that `models` does not list to karcher's inputs (last); listed, it
    counts once."""
    sets = family_tensors({"w": (6, 4)}, 2, 4, torch.float32)
    for name, s in zip(("base", "ft1", "ft2"), sets):
        write_checkpoint(tmp_path / name, s)
    head = "merge_method: karcher\nbase_model: ./base\nmodels:\n"
    for i, listed in enumerate(
        ("  - model: ./ft1\n  - model: ./ft2\n", "  - model: ./ft1\n  - model: ./ft2\n  - model: ./base\n")
    ):
        (tmp_path / f"k{i}.yaml").write_text(head + listed)
        merge(load_config(tmp_path / f"k{i}.yaml"), tmp_path / f"out{i}")
        want = karcher_ref([sets[1]["w"], sets[2]["w"], sets[0]["w"]])
        assert torch.equal(load_model(tmp_path / f"out{i}")["w"], want), listed
