"""Vocabulary mismatches: `--vocab base` merges the base's rows, `--vocab union` all rows, each
row against the base's (or, beyond the base, the first model's that has it); block-wise output
equals a whole-tensor reference on padded tensors for every block size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from engine import MergeSpec, ModelRef, merge, prepare
from engine.cli import main
from engine.errors import ShapeMismatchError
from engine.merge import plan_summary

from conftest import write_checkpoint
from reference import FLOATS, dare_merge, load_model, task_arithmetic

ROWS = {"base": 40, "ft1": 44, "ft2": 42}
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def family(root: Path, rows: dict[str, int], dtypes: dict[str, torch.dtype] | None = None) -> dict[str, Path]:
    """Base and fine-tunes whose embeddings and LM heads have `rows[name]` rows."""
    g = torch.Generator().manual_seed(0)
    width = max(rows.values())
    full = {n: torch.randn(width, 8, generator=g) for n in VOCAB_TENSORS}
    shared = {"model.layers.0.mlp.up_proj.weight": torch.randn(12, 8, generator=g), "model.norm.weight": torch.ones(8)}
    out = {}
    for name, n in rows.items():
        delta = 0 if name == "base" else 1
        tensors = {k: t[:n] + delta * 0.05 * torch.randn(n, 8, generator=g) for k, t in full.items()}
        tensors |= {k: t + delta * 0.05 * torch.randn(t.shape, generator=g) for k, t in shared.items()}
        dtype = (dtypes or {}).get(name, torch.bfloat16)
        out[name] = write_checkpoint(root / name, {k: t.to(dtype) for k, t in tensors.items()})
    return out


def padded(models: list[dict[str, torch.Tensor]], name: str, rows: int) -> list[torch.Tensor]:
    """Every input (base first) in float32 with `rows` rows: a missing row is the reference row,
    the base's below its row count, else the first model's that has it."""
    ts = [m[name].float() for m in models]
    ref = []
    for r in range(rows):
        owner = 0 if r < ts[0].shape[0] else next(i for i in range(1, len(ts)) if ts[i].shape[0] > r)
        ref.append(ts[owner][r])
    return [torch.stack([t[r] if r < t.shape[0] else ref[r] for r in range(rows)]) for t in ts]


def reference(method: str, folders: list[Path], policy: str, **kw: object) -> dict[str, torch.Tensor]:
    models = [load_model(f) for f in folders]
    out = {}
    for name, b in models[0].items():
        if b.dtype not in FLOATS:
            out[name] = b
            continue
        rows = max(m[name].shape[0] for m in models) if policy == "union" else b.shape[0]
        base, *ms = padded(models, name, rows)
        if method == "task_arithmetic":
            r = task_arithmetic(base, ms, kw.get("weights") or [1.0] * len(ms), 1.0, False)  # type: ignore[arg-type]
        else:
            r = dare_merge(method, name, base, ms, weights=kw["weights"], densities=kw["densities"], seed=0)  # type: ignore[arg-type]
        out[name] = r.to(b.dtype)
    return out


def spec(method: str, f: dict[str, Path], policy: str, **params: object) -> MergeSpec:
    refs = tuple(ModelRef(f[n], {"weight": w}) for n, w in (("ft1", 0.6), ("ft2", 0.4)))
    return MergeSpec(method, f["base"], refs, dict(params), vocab=policy)  # type: ignore[arg-type]


@pytest.mark.parametrize("policy", ["base", "union"])
@pytest.mark.parametrize("method", ["task_arithmetic", "dare_ties"])
def test_block_wise_equals_padded_reference(tmp_path: Path, policy: str, method: str) -> None:
    f = family(tmp_path, ROWS)
    params = {"density": 0.5} if method == "dare_ties" else {}
    kw = {"weights": [0.6, 0.4], "densities": [0.5, 0.5]}
    want = reference(method, [f["base"], f["ft1"], f["ft2"]], policy, **kw)
    assert want["lm_head.weight"].shape[0] == (44 if policy == "union" else 40)
    for block in (16, 48, 200, 1 << 20):  # one row, rows crossing the 40/42 boundaries, whole tensors
        out = tmp_path / f"out-{block}"
        merge(spec(method, f, policy, **params), out, block_bytes=block)
        got = load_model(out)
        for name, w in want.items():
            assert torch.equal(got[name], w), (name, block)


def test_union_copies_rows_only_one_model_has(tmp_path: Path) -> None:
    f = family(tmp_path, ROWS)
    (f["base"] / "config.json").write_text(json.dumps({"model_type": "tiny", "vocab_size": 40}))
    merge(spec("task_arithmetic", f, "union"), tmp_path / "out")
    got, ft1 = load_model(tmp_path / "out"), load_model(f["ft1"])
    for name in VOCAB_TENSORS:
        assert torch.equal(got[name][42:], ft1[name][42:])  # rows 42, 43: only ft1 has them
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config == {"model_type": "tiny", "vocab_size": 44, "dtype": "bfloat16", "torch_dtype": "bfloat16"}


def test_union_widens_mixed_dtypes(tmp_path: Path) -> None:
    f = family(tmp_path, ROWS, {"ft1": torch.float32})
    merge(spec("task_arithmetic", f, "union"), tmp_path / "out", block_bytes=100)
    got = load_model(tmp_path / "out")
    want = reference("task_arithmetic", [f["base"], f["ft1"], f["ft2"]], "union", weights=[0.6, 0.4])
    for name, w in want.items():
        assert torch.equal(got[name], w), name


def test_plan_names_the_resized_tensors(tmp_path: Path) -> None:
    f = family(tmp_path, ROWS)
    _, plan = prepare(spec("task_arithmetic", f, "union"), max_memory=1 << 32)
    summary = plan_summary(plan)["vocab"]
    assert summary["policy"] == "union"
    assert summary["resized"] == [
        {"name": n, "rows": [40, 44, 42], "out_rows": 44} for n in ("lm_head.weight", "model.embed_tokens.weight")
    ]
    result = CliRunner().invoke(
        main,
        ["plan", "--method", "task_arithmetic", "--base", str(f["base"]), "--model", str(f["ft1"]), "--vocab", "union"],
    )
    assert result.exit_code == 0, result.output
    assert "vocab union: model.embed_tokens.weight rows [40, 44] (base first) -> 44" in result.output


def test_fewer_rows_need_union(tmp_path: Path) -> None:
    f = family(tmp_path, {"base": 40, "ft1": 38, "ft2": 40})
    with pytest.raises(ShapeMismatchError, match=r"'lm_head.weight' shape \[38, 8\] vs base \[40, 8\] \(fewer rows"):
        merge(spec("task_arithmetic", f, "base"), tmp_path / "out")
    merge(spec("task_arithmetic", f, "union"), tmp_path / "out")
    got = load_model(tmp_path / "out")
    want = reference("task_arithmetic", [f["base"], f["ft1"], f["ft2"]], "union", weights=[0.6, 0.4])
    assert all(torch.equal(got[n], w) for n, w in want.items())
    assert got["lm_head.weight"].shape == (40, 8)


def test_only_embedding_like_tensors_may_differ_in_rows(tmp_path: Path) -> None:
    f = family(tmp_path, {"base": 40, "ft1": 40})
    t = load_model(f["ft1"])
    t["model.layers.0.mlp.up_proj.weight"] = torch.zeros(13, 8, dtype=torch.bfloat16)
    write_checkpoint(f["ft1"], t)
    refs = (ModelRef(f["ft1"], {}),)
    with pytest.raises(ShapeMismatchError, match="only embedding-like tensors may differ in rows"):
        merge(MergeSpec("task_arithmetic", f["base"], refs, {}, vocab="union"), tmp_path / "out")


def test_yaml_vocab_key(tmp_path: Path) -> None:
    f = family(tmp_path, ROWS)
    cfg = tmp_path / "m.yaml"
    cfg.write_text(
        "merge_method: task_arithmetic\nbase_model: ./base\nmodels:\n  - model: ./ft1\n    parameters: {weight: 0.6}\n"
        "  - model: ./ft2\n    parameters: {weight: 0.4}\nvocab: union\ntokenizer_source: ./ft1\n"
    )
    result = CliRunner().invoke(main, ["merge", str(cfg), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    got = load_model(tmp_path / "out")
    want = reference("task_arithmetic", [f["base"], f["ft1"], f["ft2"]], "union", weights=[0.6, 0.4])
    assert all(torch.equal(got[n], w) for n, w in want.items())


def test_tokenizer_size_reads_every_json_tokenizer_file(tmp_path: Path) -> None:
    from engine.vocab import tokenizer_size

    assert tokenizer_size(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text(
        json.dumps({"model": {"vocab": [["a", 0.0], ["b", -1.0]]}, "added_tokens": [{"id": 5, "content": "x"}]})
    )
    assert tokenizer_size(tmp_path) == (6, tmp_path / "tokenizer.json")  # Unigram's list, then the added id
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<y>": 9}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"7": {}}}))
    (tmp_path / "vocab.json").write_text("not json")
    assert tokenizer_size(tmp_path) == (10, tmp_path / "added_tokens.json")


def test_tokenizer_is_checked_against_the_token_embeddings(tmp_path: Path) -> None:
    """Position and token-type embeddings match the embedding pattern but are not indexed by
    token ids: only the embedding-like tensors with the most rows count."""
    from engine.errors import SpecError
    from engine.vocab import check_tokenizer_fits

    (tmp_path / "vocab.json").write_text(json.dumps({f"t{i}": i for i in range(100)}))
    bert = {
        "embeddings.word_embeddings.weight": (100, 8),
        "embeddings.position_embeddings.weight": (64, 8),
        "embeddings.token_type_embeddings.weight": (2, 8),
        "encoder.layer.0.attention.self.query.weight": (8, 8),
    }
    check_tokenizer_fits(tmp_path, bert)
    bert["embeddings.word_embeddings.weight"] = (90, 8)
    with pytest.raises(
        SpecError, match=r"uses 100 token ids but the merged 'embeddings.word_embeddings.weight' has 90"
    ):
        check_tokenizer_fits(tmp_path, bert)
