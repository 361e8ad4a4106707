"""Methods with tensor-wide statistics (TIES, breadcrumbs, DELLA, SLERP, model stock, DARE's norm
rescale): block-wise output equals whole-tensor references bit for bit, for every block size."""

from __future__ import annotations

import hashlib
import inspect
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import MergeSpec, ModelRef, merge
from engine.errors import SpecError
from engine.methods.base import Chunk, TensorParams
from engine.stats import pairwise
from engine.stats.pairwise import ALONE, PairwiseSums
from engine.stats.topk import in_top, magnitude_key, topk_reducers

from conftest import MakeFamily, family_tensors, shape_dicts, write_checkpoint
from reference import load_model, merge_folders_stats, pairwise_dot, pairwise_sum, rank_order

TOPK = ["ties", "breadcrumbs", "breadcrumbs_ties"]
SAMPLED = ["della", "della_linear"]
GRAM = ["slerp", "model_stock"]
DARE_NORM = ["dare_linear", "dare_ties"]  # with rescale_norm
ALL = TOPK + SAMPLED + GRAM + DARE_NORM


def make_spec(
    method: str, base: Path, models: list[Path], per_model: list[dict[str, object]], seed: int = 0, **g: object
) -> MergeSpec:
    refs = tuple(ModelRef(m, p) for m, p in zip(models, per_model))  # type: ignore[arg-type]
    return MergeSpec(method, base, refs, dict(g), seed=seed)  # type: ignore[arg-type]


def digests(folder: Path) -> dict[str, str]:
    return {
        n: hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        for n, t in load_model(folder).items()
    }


def method_case(
    method: str, n: int, dens: list[float], gam: list[float], eps: list[float], norm: str
) -> tuple[list[dict[str, object]], dict[str, object]]:
    """Per-model and global parameters of `method` for n models, and the reference's keywords."""
    weights = [1.0, 0.5, -0.25][:n]
    per = [{"weight": w, "density": d} for w, d in zip(weights, dens)]
    ref: dict[str, object] = {"weights": weights, "densities": dens[:n]}
    if method in GRAM:
        return [{} for _ in range(n)], {}
    if method.startswith("breadcrumbs"):
        for p, g in zip(per, gam):
            p["gamma"] = g
        ref["gammas"] = gam[:n]
    if method in SAMPLED:
        for p, e in zip(per, eps):
            p["epsilon"] = e
        ref["epsilons"] = eps[:n]
    if method in DARE_NORM:
        ref["rescale_norm"] = norm
    return per, ref


def globals_for(method: str, normalize: bool, lam: float, norm: str, t: float) -> dict[str, object]:
    if method == "slerp":
        return {"t": t}
    if method == "model_stock":
        return {}
    g: dict[str, object] = {"normalize": normalize, "lambda": lam}
    if method in DARE_NORM:
        g["rescale_norm"] = norm
    return g


@st.composite
def densities_etc(draw: st.DrawFn) -> tuple[list[float], list[float], list[float]]:
    dens = draw(st.lists(st.sampled_from([0.05, 0.3, 0.5, 0.9, 1.0]), min_size=3, max_size=3))
    # gamma and epsilon always legal for their density: d + γ <= 1, 0 < d ± ε <= 1.
    gam = [draw(st.sampled_from([0.0, 0.01, 0.5])) * (1 - d) for d in dens]
    eps = [draw(st.sampled_from([0.0, 0.5, 0.9])) * min(d, 1 - d) for d in dens]
    return dens, gam, eps


@settings(max_examples=60)
@given(
    method=st.sampled_from(ALL),
    shapes=shape_dicts(),
    n_models=st.integers(1, 3),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    params=densities_etc(),
    normalize=st.booleans(),
    lam=st.sampled_from([1.0, 0.75]),
    norm=st.sampled_from(["l1", "l2", "linf"]),
    t=st.sampled_from([0.0, 0.3, 1.0]),
    block_bytes=st.integers(1, 300),
    seed=st.integers(0, 2**40),
)
def test_blockwise_equals_reference(
    tmp_path_factory: pytest.TempPathFactory,
    method: str,
    shapes: dict[str, tuple[int, ...]],
    n_models: int,
    dtype: torch.dtype,
    params: tuple[list[float], list[float], list[float]],
    normalize: bool,
    lam: float,
    norm: str,
    t: float,
    block_bytes: int,
    seed: int,
) -> None:
    n_models = {"slerp": 1, "model_stock": max(2, n_models)}.get(method, n_models)
    root = tmp_path_factory.mktemp(method)
    sets = family_tensors(shapes, n_models, seed % 1000, dtype)
    base = write_checkpoint(root / "base", sets[0])
    models = [write_checkpoint(root / f"ft{i}", s) for i, s in enumerate(sets[1:])]
    per, ref = method_case(method, n_models, *params, norm)
    g = globals_for(method, normalize, lam, norm, t)
    merge(make_spec(method, base, models, per, seed, **g), root / "out", block_bytes=block_bytes)
    want = merge_folders_stats(method, base, models, seed=seed, **{**g, **ref})
    got = load_model(root / "out")
    for name, w in want.items():
        assert torch.equal(got[name], w), name


@pytest.mark.parametrize("method", ALL)
def test_same_bytes_for_any_block_size(tiny_family: MakeFamily, tmp_path: Path, method: str) -> None:
    n = {"slerp": 1}.get(method, 3)
    base, models = tiny_family(n, shards=2)
    per, _ = method_case(method, n, [0.2, 0.5, 0.7], [0.1, 0.05, 0.0], [0.1, 0.2, 0.25], "l1")
    spec = make_spec(method, base, models, per, 1234, **globals_for(method, True, 1.0, "l1", 0.4))
    runs = [digests(Path(merge(spec, tmp_path / f"out{b}", block_bytes=b).output)) for b in (1, 50, 777, 1 << 20)]
    assert all(r == runs[0] for r in runs[1:])
    assert not vars(pairwise._local).get("arrays")  # the sums' scratch is freed after a merge


def test_large_tensor_across_chunks(tmp_path: Path) -> None:
    """A tensor of many 2**18-element compute chunks per block and many blocks."""
    shapes = {"w": (1100, 500), "v": (300_001,)}
    sets = family_tensors(shapes, 2, 5, torch.bfloat16)
    base = write_checkpoint(tmp_path / "base", sets[0])
    models = [write_checkpoint(tmp_path / f"ft{i}", s) for i, s in enumerate(sets[1:])]
    for method in ("ties", "breadcrumbs", "model_stock", "dare_linear"):
        per, ref = method_case(method, 2, [0.3, 0.6], [0.02, 0.1], [0.1, 0.1], "l1")
        g = globals_for(method, True, 1.0, "l1", 0.5)
        want = merge_folders_stats(method, base, models, **{**g, **ref})
        for b in (3 << 20, 150_000):
            merge(make_spec(method, base, models, per, **g), tmp_path / f"{method}{b}", block_bytes=b)
            got = load_model(tmp_path / f"{method}{b}")
            assert all(torch.equal(got[n], w) for n, w in want.items()), (method, b)


@pytest.mark.parametrize("dtypes", [(torch.bfloat16,) * 3, (torch.float32, torch.bfloat16, torch.float16)])
def test_gram_from_the_read_buffers_equals_the_float32_copies(
    tmp_path: Path, dtypes: tuple[torch.dtype, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SLERP and model stock with the C reading the read buffers (bfloat16, float32, float16), and
    without the C: the same bytes as the whole-tensor reference, for blocks cut inside and across
    the groups."""
    sets = family_tensors({"w": (300, 1000), "v": (70_001,)}, 2, 7, torch.float32)
    sets = [{n: t.to(d) for n, t in s.items()} for s, d in zip(sets, dtypes)]
    base = write_checkpoint(tmp_path / "base", sets[0])
    models = [write_checkpoint(tmp_path / f"ft{i}", s) for i, s in enumerate(sets[1:])]
    kernel, formats = pairwise._fused, set()

    def group_sums(streams: tuple[np.ndarray, ...], *rest: object) -> None:
        formats.update(s.dtype.char for s in streams)
        kernel.group_sums(streams, *rest)

    spy = SimpleNamespace(GROUP=pairwise.GROUP, group_sums=group_sums, combine=kernel.combine) if kernel else None
    for method, ms in (("slerp", models[:1]), ("model_stock", models)):
        g = globals_for(method, True, 1.0, "l1", 0.3)
        want = merge_folders_stats(method, base, ms, **g)
        for fused in (spy, None):
            monkeypatch.setattr(pairwise, "_fused", fused)
            for b in (1 << 20, 150_001):
                out = tmp_path / f"{method}{b}{fused is None}"
                merge(make_spec(method, base, ms, [{} for _ in ms], **g), out, block_bytes=b, device="cpu")
                got = load_model(out)
                assert all(torch.equal(got[n], w) for n, w in want.items()), (method, b, fused)
    chars = {torch.bfloat16: "h", torch.float32: "f", torch.float16: "e"}
    assert not kernel or formats == {chars[d] for d in dtypes}  # read as they are


@pytest.mark.parametrize(("method", "gamma"), [("ties", 0.0), ("breadcrumbs", 0.0), ("breadcrumbs", 0.1)])
def test_exactly_k_kept_among_many_ties(tmp_path: Path, method: str, gamma: float) -> None:
    """bf16 deltas of three magnitudes: each cut falls among thousands of equal |δ|; exactly
    int(d·n) elements survive, those of the stable rank order, for any block size."""
    g = torch.Generator().manual_seed(0)
    base = torch.randint(-8, 8, (301, 7), generator=g).to(torch.bfloat16)
    sign = torch.randint(0, 2, base.shape, generator=g) * 2 - 1
    model = base + (torch.randint(1, 4, base.shape, generator=g) * sign).to(torch.bfloat16)
    b = write_checkpoint(tmp_path / "base", {"w": base})
    m = write_checkpoint(tmp_path / "ft", {"w": model})
    n = base.numel()
    order = rank_order(model.float() - base.float())
    for d in (0.1, 0.33, 0.5):
        k, n_top = int(d * n), int(gamma * n)
        want = torch.zeros(n, dtype=torch.bool)
        want[order[n_top : n_top + k]] = True
        per = {"density": d} if method == "ties" else {"density": d, "gamma": gamma}
        for block in (1, 100, 1 << 20):
            out = tmp_path / f"out{d}-{block}"
            merge(make_spec(method, b, [m], [per]), out, block_bytes=block)
            kept = load_model(out)["w"] != base  # every delta is non-zero, and small integers add exactly
            assert int(kept.sum()) == k
            assert torch.equal(kept.reshape(-1), want)


def test_yaml_spelling(tmp_path: Path) -> None:
    """mergekit-style YAML: per-model gamma / epsilon, global t and rescale_norm (a string)."""
    from engine.spec import load_yaml_spec

    cfg = tmp_path / "m.yaml"
    cfg.write_text(
        "merge_method: dare_ties\nbase_model: base\nparameters: {rescale_norm: l1, lambda: 0.5}\n"
        "models:\n  - model: base\n  - model: a\n    parameters: {weight: 0.5, density: 0.3}\n"
    )
    spec = load_yaml_spec(cfg)
    assert spec.tensor_params().choice("rescale_norm") == "l1" and len(spec.models) == 1
    assert len(spec.method_impl.reducers(spec.tensor_params())) == 1
    cfg.write_text(
        "merge_method: slerp\nbase_model: base\nparameters: {t: 0.25}\nmodels: [{model: base}, {model: a}]\n"
    )
    assert load_yaml_spec(cfg).tensor_params().number("t") == 0.25


def drive(
    reducers: tuple[Any, ...],
    base: torch.Tensor,
    model: torch.Tensor,
    cuts: list[int],
    ahead: bool = False,
    ran: list[bool] | None = None,
) -> torch.Tensor:
    """Run top-k passes over the chunks [cuts[i], cuts[i+1]) as the executor does, but a pass that
    finds nothing to count (`ran`: which did); the kept mask. `ahead`: the last pass folds each
    chunk just before the chunk is masked, with the cut so far."""
    p, stats, kept = TensorParams({}, ({},)), {}, []
    spans = list(zip(cuts, cuts[1:]))
    for i, r in enumerate(reducers):
        acc = r.start(p, stats, base.numel())
        needed = r.needed(p, stats)
        for a, b in spans if needed else ():
            r.chunk(acc, base[a:b], [model[a:b].clone()], p, stats, Chunk((), a))
            if ahead and i == len(reducers) - 1:
                (cut,) = r.so_far(acc, p, stats)["t"]
                kept.append(in_top(magnitude_key(model[a:b] - base[a:b]), cut, a))
        stats = {**stats, **r.finish(acc, p, stats)}
        if ran is not None:
            ran.append(needed)
    (cut,) = stats["t"]
    final = torch.cat([in_top(magnitude_key(model[a:b] - base[a:b]), cut, a) for a, b in spans])
    assert not ahead or not kept or torch.equal(torch.cat(kept), final)
    return final


@given(
    n=st.integers(1, 2000),
    levels=st.sampled_from([1, 2, 5, 1000]),
    frac=st.floats(0, 1),
    splits=st.lists(st.floats(0, 1), max_size=8),
    seed=st.integers(0, 100),
)
def test_topk_any_chunking(n: int, levels: int, frac: float, splits: list[float], seed: int) -> None:
    """k = 0, k = n, all-equal magnitudes, and heavy ties: exactly the first k of the stable order."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    delta = torch.randint(0, levels, (n,), generator=g).float() * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)
    model = base + delta
    k = round(frac * n)
    cuts = sorted({0, n, *(int(s * n) for s in splits)})
    got = drive(topk_reducers("t", lambda p, numel: [(0, k)]), base, model, cuts, ahead=True)
    want = torch.zeros(n, dtype=torch.bool)
    want[rank_order(model - base)[:k]] = True
    assert int(got.sum()) == k and torch.equal(got, want)


@given(
    m=st.integers(2, 300),
    reps=st.integers(1, 6),
    levels=st.sampled_from([2, 5, 1000]),
    k_frac=st.floats(0, 1),
    seed=st.integers(0, 100),
)
def test_a_right_guess_spares_pass_two(m: int, reps: int, levels: int, k_frac: float, seed: int) -> None:
    """A tensor of one pattern repeated, cut at its repeats, k a multiple of the repeats: pass 1's
    guess from the first chunk is the very key of the cut, so its window holds pass 2's counts and
    pass 2 is skipped; the cut is still exactly the first k of the stable order."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(m, generator=g).repeat(reps)
    delta = torch.randint(0, levels, (m,), generator=g).float() * (torch.randint(0, 2, (m,), generator=g) * 2 - 1)
    model = base + delta.repeat(reps)
    n, k = m * reps, reps * min(m - 1, max(1, round(k_frac * m)))
    ran: list[bool] = []
    got = drive(topk_reducers("t", lambda p, numel: [(0, k)]), base, model, list(range(0, n + 1, m)), True, ran)
    want = torch.zeros(n, dtype=torch.bool)
    want[rank_order(model - base)[:k]] = True
    assert ran[:2] == [True, False] and int(got.sum()) == k and torch.equal(got, want)


@given(
    exps=st.lists(st.integers(-120, 120), max_size=400),
    splits=st.lists(st.integers(0, 400), max_size=6),
    seed=st.integers(0, 1000),
    group=st.sampled_from([2, 4, 8, 4096]),
    step=st.integers(1, 9),
)
def test_pairwise_sums_do_not_depend_on_chunking(
    exps: list[int], splits: list[int], seed: int, group: int, step: int
) -> None:
    """Terms of widely spread magnitudes (so any other order would round differently), any cuts,
    groups small enough that several stages fill and close: the whole-tensor tree's sum, bit for
    bit, and within the pairwise error bound of the exact sum."""
    g = torch.Generator().manual_seed(seed)
    n = len(exps)
    x = torch.randn(n, generator=g) * torch.exp2(torch.tensor(exps, dtype=torch.float32) / 2)
    y = torch.randn(n, generator=g) * torch.exp2(-torch.tensor(exps, dtype=torch.float32) / 3)
    cuts = sorted({0, n, *(min(s, n) for s in splits)})
    with pytest.MonkeyPatch.context() as m:
        m.setattr(pairwise, "GROUP", group)
        m.setattr(pairwise, "CPU_STEP", step)
        dot, total = PairwiseSums(), PairwiseSums()
        for a, b in zip(cuts, cuts[1:]):
            dot.add_products([x[a:b], y[a:b]], [(0, 1)])
            total.add(x[a:b])
        got_dot, got_total = dot.value(), total.value()
    products = x.double() * y.double()
    assert got_dot == pairwise_sum(products, group)
    assert got_total == pairwise_sum(x.double(), group)
    for got, terms in [(got_dot, products), (got_total, x.double())]:
        bound = max(1, n).bit_length() * 2.0**-53 * math.fsum(terms.abs().tolist())
        assert abs(got - math.fsum(terms.tolist())) <= bound


@pytest.mark.parametrize("kind", ["bf16 weights", "bf16 deltas", "half zeros", "negative zeros", "float32"])
def test_pairwise_dot_products_of_every_kind_of_data(kind: str) -> None:
    """Chunks cut off every group boundary, and one call over several steps, give the tree's sum
    (the order the whole-tensor references use); a sum of negative zeros is +0.0 however padded."""
    assert inspect.signature(pairwise_sum).parameters["group"].default == pairwise.GROUP

    g = torch.Generator().manual_seed(7)
    n = 2 * pairwise.CPU_STEP + 1234
    w = torch.randn(n, generator=g).bfloat16().float()
    x, y = w, (w + torch.randn(n, generator=g) * 0.01).bfloat16().float()
    if kind != "bf16 weights":
        x, y = y - w, (w + torch.randn(n, generator=g) * 0.01).bfloat16().float() - w
    if kind == "half zeros":
        x[torch.rand(n, generator=g) < 0.5] = 0.0
    if kind == "negative zeros":
        x, y = torch.full((n,), -0.0), torch.ones(n)
    if kind == "float32":
        x, y = torch.randn(n, generator=g), torch.randn(n, generator=g)
    dot, whole = PairwiseSums(), PairwiseSums()
    for a, b in [(0, 1000), (1000, pairwise.CPU_STEP + 7), (pairwise.CPU_STEP + 7, n)]:
        dot.add_products([x[a:b], y[a:b]], [(0, 1)])
    whole.add64((x.double() * y.double()).view(1, -1))  # one call over several steps' worth
    want = pairwise_sum(x.double() * y.double())
    got = dot.value()
    assert got == whole.value() == want
    if kind == "negative zeros":
        assert got == 0.0 and math.copysign(1.0, got) == 1.0


def test_della_keeps_density_on_average_and_favours_large_magnitudes(tmp_path: Path) -> None:
    base = torch.zeros(64, 4096)
    model = torch.randn(64, 4096, generator=torch.Generator().manual_seed(1))
    b = write_checkpoint(tmp_path / "base", {"w": base})
    m = write_checkpoint(tmp_path / "ft", {"w": model})
    merge(make_spec("della_linear", b, [m], [{"density": 0.3, "epsilon": 0.2}], rescale=False), tmp_path / "out")
    kept = load_model(tmp_path / "out")["w"] != 0
    n = kept.numel()
    assert abs(int(kept.sum()) - 0.3 * n) <= 6 * math.sqrt(n * 0.3 * 0.7)
    big = model.abs() > model.abs().median(dim=1, keepdim=True).values
    # Upper half of each row: mean probability 0.3 + 0.1; lower half: 0.3 - 0.1.
    assert kept[big].float().mean().item() == pytest.approx(0.4, abs=0.01)
    assert kept[~big].float().mean().item() == pytest.approx(0.2, abs=0.01)


@pytest.mark.parametrize(("rows", "w"), [(1, 2), (3, 5), (257, 300), (5, 70000)])
def test_della_ranks_equal_a_stable_sort(rows: int, w: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The packed-key sort (split across threads) ranks like a stable sort of |δ|: equal
    magnitudes by position, −0 equal to +0, infinities last."""
    from engine.methods import della

    monkeypatch.setattr(della, "_PART_MIN", 1)  # as many parts as threads, even for tiny rows
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    g = torch.Generator().manual_seed(rows * w)
    ties = torch.randint(-3, 4, (rows * w,), generator=g).float()
    ties[::7], ties[::11] = -0.0, float("-inf")
    for delta in (ties, torch.randn(rows * w, generator=g)):
        order = torch.sort(delta.view(rows, w).abs(), dim=1, stable=True).indices
        rank = torch.argsort(order, dim=1).float() / (w - 1)  # the inverse permutation
        want = ((0.4 - 0.15) + rank * 2 * 0.15).view(-1)
        assert torch.equal(della.keep_probabilities(delta, w, 0.4, 0.15), want)


def test_plan_counts_the_passes(tiny_family: MakeFamily) -> None:
    from engine.io.inventory import take_inventory
    from engine.plan import make_plan

    base, models = tiny_family(2)
    inv = take_inventory(base, models)
    expect = {
        ("ties", 0.5): 4, ("ties", 1.0): 1, ("breadcrumbs", 0.5): 4, ("della", 0.5): 1,
        ("slerp", 0.5): 2, ("model_stock", 0.5): 2, ("dare_linear", 0.5): 2,
    }  # fmt: skip
    for (method, d), passes in expect.items():
        ms = models[:1] if method == "slerp" else models
        per, _ = method_case(method, len(ms), [d] * 3, [0.0] * 3, [0.1] * 3, "l1")
        spec = make_spec(method, base, ms, per, **globals_for(method, True, 1.0, "l1", 0.5))
        plan = make_plan(
            spec, inv if method != "slerp" else take_inventory(base, ms), budget=1 << 32, baseline=0, block_bytes=64
        )
        assert {t.passes for t in plan.tensors if t.merge} == {passes}, method


@pytest.mark.parametrize(
    ("method", "n", "per", "g", "words"),
    [
        ("della", 1, {"density": 0.3, "epsilon": 0.3}, {}, ["'epsilon'", "model 1"]),
        ("della_linear", 1, {"density": 0.9, "epsilon": 0.2}, {}, ["'epsilon'"]),
        ("della", 1, {"epsilon": -0.1}, {}, ["'epsilon'"]),
        ("breadcrumbs", 2, {"density": 0.7, "gamma": 0.4}, {}, ["'gamma'", "'density'"]),
        ("breadcrumbs_ties", 1, {"gamma": 1.0}, {}, ["'gamma'"]),
        ("slerp", 2, {}, {}, ["at most 1 model"]),
        ("slerp", 1, {}, {"t": 1.5}, ["'t'"]),
        ("model_stock", 1, {}, {}, ["at least 2 model"]),
        ("dare_linear", 1, {}, {"rescale_norm": "l3"}, ["'rescale_norm'"]),
        ("dare_linear", 1, {}, {"rescale_norm": "l1", "rescale": False}, ["'rescale_norm'"]),
        ("dare_ties", 1, {}, {"rescale_norm": 1.0}, ["'rescale_norm'"]),
    ],
)
def test_bad_parameters_are_spec_errors(
    tmp_path: Path, method: str, n: int, per: dict[str, object], g: dict[str, object], words: list[str]
) -> None:
    with pytest.raises(SpecError) as e:
        make_spec(method, tmp_path, [tmp_path / f"m{i}" for i in range(n)], [per] * n, **g)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_edge_parameters_are_accepted(tmp_path: Path) -> None:
    models = [tmp_path / "m0"]
    make_spec("della", tmp_path, models, [{"density": 0.75, "epsilon": 0.25}])  # d + ε = 1
    make_spec("della", tmp_path, models, [{"density": 1.0, "epsilon": 0.5}])  # density 1 prunes nothing
    make_spec("breadcrumbs", tmp_path, models, [{"density": 0.7, "gamma": 0.3}])
    make_spec("breadcrumbs", tmp_path, models, [{}])  # density 1 with the default gamma


@pytest.mark.parametrize("raw", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_gram_batches_of_pairs_equal_the_reference(rows: int, raw: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four vectors, ten pairs, summed `rows` at a time, over chunks cut off the group boundaries,
    given as float32 copies (`chunk`) or as the read buffers (`raw_chunk`, the C where built):
    each entry is the whole-tensor pairwise dot product."""
    from engine.methods.model_stock import pairs
    from engine.stats import gram

    monkeypatch.setattr(gram, "ROWS", rows)
    monkeypatch.setattr(pairwise, "CPU_STEP", 5000)  # steps that do not divide the chunks
    g = torch.Generator().manual_seed(3)
    n = 3 * pairwise.GROUP + 77
    vecs = [torch.randn(n, generator=g) * 10.0**e for e in (-3, 0, 2, -1)]
    reducer = gram.Gram("g", [(i, ALONE) for i in range(4)], pairs(4))
    acc = reducer.start(None, {}, n)  # type: ignore[arg-type]
    for a, b in [(0, 4000), (4000, 4001), (4001, 11000), (11000, n)]:
        part, c = [v[a:b] for v in vecs], Chunk((), a, n)
        if not (raw and reducer.raw_chunk(acc, part, None, {}, c)):  # type: ignore[arg-type]
            reducer.chunk(acc, part[0], part[1:], None, {}, c)  # type: ignore[arg-type]
    got = reducer.finish(acc, None, {})["g"]  # type: ignore[arg-type]
    assert got == {(i, j): pairwise_dot(vecs[i], vecs[j]) for i, j in pairs(4)}


def test_ties_keeps_at_least_one_element_as_mergekit() -> None:
    """mergekit 0.1.5's `magnitude`: k = max(1, int(density · n)) for a nonempty tensor."""
    from engine.methods.ties import top_k_count

    assert [top_k_count(0.1, n) for n in (0, 1, 3, 9, 10, 25)] == [0, 1, 1, 1, 1, 2]
    assert top_k_count(1.0, 7) == 7
