"""The efficacy experiment (bench/efficacy) end to end, shrunken to seconds, so it cannot rot:
a tiny Llama is pretrained, fine-tuned twice and once "continued-pretrained", dropped and merged
by the `leanmerge` command, and every figure lands in the JSON, the tables and the PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from bench.efficacy.__main__ import write  # noqa: E402
from bench.efficacy.model import ModelSize  # noqa: E402
from bench.efficacy.run import Config, fresh, run  # noqa: E402
from bench.efficacy.train import Schedule  # noqa: E402

TINY = Config(
    size=ModelSize(hidden=32, layers=1, heads=2, mlp=64),
    pretrain=Schedule(steps=20, lr=3e-3, batch=32, warmup=5),
    finetune=Schedule(steps=10, lr=1e-3, batch=32, warmup=2),
    cpt=Schedule(steps=10, lr=3e-3, batch=32, warmup=2),
    tasks=("add", "rev"),
    drop_rates=(0.0, 0.9),
    sweep_seeds=(0, 1),
    seeded_rates=(),
    methods=("task_arithmetic", "dare_linear"),
    merge_seeds=(0, 1),
    eval_n=64,
    threads=1,
)
MODELS = ["ft-add", "ft-rev", "cpt-add"]


@pytest.mark.slow
def test_shrunken_experiment_end_to_end(tmp_path: Path) -> None:
    res = run(TINY, tmp_path / "work")
    assert set(res["accuracy"]) == {"base", *MODELS}
    assert set(res["accuracy"]["base"]) == {"sub", "psub", "copy", "add", "rev"}

    # p = 0 is density 1: leanmerge returns the fine-tune itself, so its accuracy on every task is
    # the fine-tune's, exactly; DropOnly at p = 0 is the same run
    for model in MODELS:
        at0 = [r for r in res["sweep"] if r["model"] == model and r["p"] == 0.0]
        assert [r["rescale"] for r in at0] == [True, False]
        assert all(r["accuracy"] == res["accuracy"][model] for r in at0)
        at9 = [(r["rescale"], r["seed"]) for r in res["sweep"] if r["model"] == model and r["p"] == 0.9]
        assert at9 == [(True, 0), (False, 0)]  # 0.9 is not in seeded_rates: the first seed only

    # seeded methods once per seed, deterministic ones once
    assert res["merges"]["dare_linear"]["seeds"] == [0, 1]
    assert res["merges"]["task_arithmetic"]["seeds"] == [0]
    spread = res["merges"]["dare_linear"]["summary"]["add"]
    assert spread["min"] <= spread["mean"] <= spread["max"]

    # leanmerge inspect's statistics, per model, beside them
    assert set(res["inspect"]) == set(MODELS)
    assert all(res["inspect"][m]["mean_abs_delta"] > 0 for m in MODELS)
    assert res["seconds"]["cpu"] > 0

    out = write(res, tmp_path / "results")
    written = json.loads(out.read_text())
    assert written["sweep"] == res["sweep"]
    assert set(written["findings"]["sweep"]) == set(MODELS)
    assert set(written["findings"]["merge_over_finetune"]) == set(TINY.methods)
    kept = written["findings"]["merge_gain_kept"]["task_arithmetic"]["add"]
    base, tuned = res["accuracy"]["base"]["add"], res["accuracy"]["ft-add"]["add"]
    merged = res["merges"]["task_arithmetic"]["summary"]["add"]["mean"]
    assert kept == (None if tuned == base else (merged - base) / (tuned - base))
    table = out.with_suffix(".md").read_text()
    assert "| ft-add (add) |" in table and "| dare_linear |" in table
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_work_folder_the_experiment_did_not_make_is_kept(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(RuntimeError, match=f"^{tmp_path}: not empty and not made by bench.efficacy; give an empty"):
        fresh(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    fresh(tmp_path / "new")  # a new folder is made, marked, and may be emptied by the next run
    (tmp_path / "new" / "model").mkdir()
    fresh(tmp_path / "new")
    assert [p.name for p in (tmp_path / "new").iterdir()] == [".bench-efficacy"]
