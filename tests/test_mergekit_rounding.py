"""`--mergekit-rounding` / `mergekit_rounding: true`: linear and task_arithmetic computed as
mergekit 0.1.5 computes them (inputs cast to the config's dtype, every task-arithmetic op
rounded to it; linear's fused multiply-adds in float32), bit-identical to a whole-tensor
reference written from mergekit's code, for any block size; other methods are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from engine.cli import main

from conftest import MakeFamily, llama_shapes
from reference import breadcrumbs_trim, load_model, ties_trim

BF = torch.bfloat16
SHAPES = llama_shapes(2)


def bf(x: torch.Tensor) -> torch.Tensor:
    """Round to bf16 (what each of mergekit's bf16 ops leaves)."""
    return x.to(BF)


def task_arithmetic_ref(base: torch.Tensor, models: list[torch.Tensor], w: list[float], lam: float) -> torch.Tensor:
    """mergekit's GTA without sparsification in bf16: delta, × bf16(w), Σ, ÷ bf16(Σ w), × λ, + base."""
    b = bf(base)
    wb = [bf(torch.tensor(x)) for x in w]
    weighted = [bf(bf(m) - b) * x for m, x in zip(models, wb)]  # (bf16 × bf16) -> bf16
    mixed = torch.stack(weighted).sum(0)  # bf16 sum over the models
    mixed = mixed / torch.stack(wb).sum(0)
    return (b + mixed * lam).to(BF)


def ties_ref(
    base: torch.Tensor, models: list[torch.Tensor], w: list[float], density: float, gamma: float | None
) -> torch.Tensor:
    """mergekit's TIES / breadcrumbs_ties in bf16: trim each bf16 delta (ties at the cut kept from
    the lowest index), weight, elect the sign of the bf16 sum, sum the agreeing, ÷ their Σ w
    (TIES' default normalize; breadcrumbs_ties' is false)."""
    b = bf(base)
    deltas = [(bf(m) - b).float() for m in models]
    trimmed = [ties_trim(d, density) if gamma is None else breadcrumbs_trim(d, density, gamma) for d in deltas]
    wb = torch.stack([bf(torch.tensor(x)) for x in w]).view(-1, *[1] * base.dim())
    weighted = torch.stack([bf(t) for t in trimmed]) * wb
    majority = (weighted.sum(0) >= 0).to(BF) * 2 - 1
    agree = weighted.sign() == majority
    divisor = (wb * agree).sum(0)
    divisor[divisor == 0] = 1
    mixed = (weighted * agree).sum(0)
    return b + (mixed / divisor if gamma is None else mixed)


def linear_ref(models: list[torch.Tensor], w: list[float]) -> torch.Tensor:
    """mergekit 0.1.5's linear_merge: bf16 inputs, zero + Σ addcmul in float32, ÷ Σ w."""
    acc = torch.zeros(models[0].shape)
    ws = torch.tensor(w)
    for m, x in zip(models, ws):
        acc = torch.addcmul(acc, bf(m).float(), x)
    return (acc / ws.sum()).to(BF)


def merge(cfg: Path, out: Path, *args: str) -> str:
    result = CliRunner().invoke(main, ["merge", str(cfg), "-o", str(out), *args])
    return result.output if result.exit_code else ""


def test_task_arithmetic_and_linear_round_as_mergekit(tiny_family: MakeFamily) -> None:
    base, (a, b) = tiny_family(2, shapes=SHAPES, dtype=torch.float32)  # float32 inputs: cast on load
    root = base.parent
    models = f"models: [{{model: {a}, parameters: {{weight: 0.3}}}}, {{model: {b}, parameters: {{weight: 0.9}}}}]\n"
    ta = root / "ta.yaml"
    ta.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\n{models}parameters: {{normalize: true, lambda: 0.7}}\n"
                  "dtype: bfloat16\nmergekit_rounding: true\n")  # fmt: skip
    assert merge(ta, root / "ta1", "--block-size", "40") == merge(ta, root / "ta2") == ""
    ta.write_text(ta.read_text().replace("mergekit_rounding: true", "mergekit_rounding: false"))
    assert merge(ta, root / "ta_plain") == ""
    lin = root / "lin.yaml"
    lin.write_text(f"merge_method: linear\n{models}dtype: bfloat16\n")
    assert merge(lin, root / "lin", "--mergekit-rounding") == merge(lin, root / "plain") == ""
    tb, ta_, tb_ = load_model(base), load_model(a), load_model(b)
    got, got2, ta_plain, glin, plain = (load_model(root / d) for d in ("ta1", "ta2", "ta_plain", "lin", "plain"))
    for n in SHAPES:
        assert torch.equal(got[n], task_arithmetic_ref(tb[n], [ta_[n], tb_[n]], [0.3, 0.9], 0.7)), n
        assert torch.equal(got[n], got2[n]), n
        assert torch.equal(glin[n], linear_ref([ta_[n], tb_[n]], [0.3, 0.9])), n
    # not leanmerge's one rounding
    assert any(not torch.equal(glin[n], plain[n]) for n in SHAPES)
    assert sum(not torch.equal(got[n], ta_plain[n]) for n in SHAPES) == len(SHAPES)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_ties_trims_the_rounded_deltas(tiny_family: MakeFamily, method: str) -> None:
    base, (a, b) = tiny_family(2, shapes=SHAPES)
    root = base.parent
    gamma = 0.1 if method == "breadcrumbs_ties" else None
    cfg = root / "t.yaml"
    cfg.write_text(
        f"merge_method: {method}\nbase_model: {base}\nmodels: [{{model: {a}, parameters: {{weight: 0.3}}}}, "
        f"{{model: {b}, parameters: {{weight: 0.9}}}}]\nparameters: {{density: 0.4{', gamma: 0.1' if gamma else ''}}}\n"
        "dtype: bfloat16\nmergekit_rounding: true\n"
    )
    assert merge(cfg, root / "o1", "--block-size", "24") == merge(cfg, root / "o2") == ""
    tb, ta_, tb_ = load_model(base), load_model(a), load_model(b)
    got, got2 = load_model(root / "o1"), load_model(root / "o2")
    for n in SHAPES:
        assert torch.equal(got[n], ties_ref(tb[n], [ta_[n], tb_[n]], [0.3, 0.9], 0.4, gamma)), n
        assert torch.equal(got[n], got2[n]), n


def test_methods_and_dtypes_it_does_not_cover_are_refused(tiny_family: MakeFamily) -> None:
    base, (a,) = tiny_family(1, shapes=SHAPES)
    cfg = base.parent / "t.yaml"
    cfg.write_text(f"merge_method: dare_ties\nbase_model: {base}\nmodels: [{{model: {a}}}]\ndtype: bfloat16\n")
    assert merge(cfg, base.parent / "o", "--mergekit-rounding") == (
        f"Error: {cfg}: mergekit_rounding covers linear, task_arithmetic, ties, breadcrumbs, breadcrumbs_ties, not dare_ties: mergekit's random "
        "masks and other methods' arithmetic are not reproduced (leave mergekit_rounding out: leanmerge rounds once, on write)\n"
    )
    cfg.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels: [{{model: {a}}}]\nmergekit_rounding: 1\n"
    )
    assert merge(cfg, base.parent / "o").endswith("t.yaml:4: mergekit_rounding must be true or false, got 1\n")
    cfg.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels: [{{model: {a}}}]\nmergekit_rounding: true\n"
    )
    assert merge(cfg, base.parent / "o") == (
        f"Error: {cfg}: mergekit_rounding rounds to the config's dtype: set one (dtype: bfloat16, or --out-dtype)\n"
    )
    cfg.write_text(cfg.read_text() + "dtype: float32\nout_dtype: bfloat16\n")
    assert merge(cfg, base.parent / "o").endswith(
        "t.yaml:4: mergekit_rounding rounds to one dtype: give 'dtype' or 'out_dtype', not both\n"
    )
    assert not (base.parent / "o").exists()
