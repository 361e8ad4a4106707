"""`tokenizer_source: union`, the `tokenizer:` block and `chat_template` as mergekit runs them:
the output tokenizer is the union of the inputs' (plus the config's tokens), every input's
embedding rows are rebuilt for it (mergekit's PermutedEmbeddings, checked against a whole-tensor
reference written from its source) and merged; the output loads in transformers and runs on
every token id; the bytes do not depend on the block size."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from engine.chat_templates import NAMED
from engine.cli import main

from conftest import MakeFamily
from reference import load_model, task_arithmetic

transformers = pytest.importorskip("transformers")
from test_hf_load import VOCAB, fine_tune, load_and_run, tiny_llama  # noqa: E402

TOKEN_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture
def family(tmp_path: Path) -> Path:
    """base (64 words), ft1 adding new0 new1, ft2 adding new1 x0, and a chat template on ft1 and ft2."""
    tiny_llama(tmp_path / "base")
    fine_tune(tmp_path / "base", tmp_path / "ft1", 1, add=2)
    ft2 = fine_tune(tmp_path / "base", tmp_path / "ft2", 2)
    tok = transformers.AutoTokenizer.from_pretrained(ft2)
    tok.add_tokens(["new1", "x0"])
    tok.save_pretrained(ft2)
    tensors = load_model(ft2)
    g = torch.Generator().manual_seed(7)
    for n in TOKEN_TENSORS:
        tensors[n] = torch.cat([tensors[n], torch.randn(2, tensors[n].shape[1], generator=g)])
    from safetensors.torch import save_file

    save_file(tensors, str(ft2 / "model.safetensors"), metadata={"format": "pt"})
    for ft in ("ft1", "ft2"):  # as resize_token_embeddings leaves them
        config = json.loads((tmp_path / ft / "config.json").read_text())
        (tmp_path / ft / "config.json").write_text(json.dumps(config | {"vocab_size": VOCAB + 2}))
        (tmp_path / ft / "chat_template.jinja").write_text("{{ messages[0]['content'] }} from " + ft[:2])
    return tmp_path


def run(root: Path, body: str, out: str, *args: str) -> str:
    cfg = root / f"{out}.yaml"
    cfg.write_text(
        "merge_method: task_arithmetic\nbase_model: ./base\nmodels: [{model: ./ft1}, {model: ./ft2}]\n" + body
    )
    result = CliRunner().invoke(main, ["merge", str(cfg), "-o", str(root / out), *args])
    assert result.exit_code == 0 or not out.startswith("ok"), result.output
    return result.output


def permuted(
    root: Path, out: Path, cfg: dict[str, tuple[str, object, bool]], pad: int = 0
) -> list[dict[str, torch.Tensor]]:
    """mergekit's PermutedEmbeddings, whole tensors: each input's token tensors for `out`'s
    vocabulary. `cfg`: token -> (kind, (model, token) or None, force)."""
    vocab = transformers.AutoTokenizer.from_pretrained(out).get_vocab()
    names = ["base", "ft1", "ft2"]
    vocabs = [transformers.AutoTokenizer.from_pretrained(root / n).get_vocab() for n in names]
    models = [load_model(root / n) for n in names]
    result = [dict(m) for m in models]
    for t in TOKEN_TENSORS:
        ts = [m[t] for m in models]
        perms = [{i: v.get(tok, -1) for tok, i in vocab.items()} for v in vocabs]
        default = {}
        for tok, i in vocab.items():
            if tok in cfg:
                kind, arg, _ = cfg[tok]
                if kind == "zero":
                    default[tok] = torch.zeros(ts[0].shape[1])
                else:
                    model, src = arg  # type: ignore[misc]
                    k = names.index(model)
                    default[tok] = ts[k][vocabs[k][src] if isinstance(src, str) else src]
                continue
            have = [k for k in range(3) if perms[k][i] >= 0]
            if len(have) == 1 or (have and have[0] == 0):
                default[tok] = ts[have[0]][perms[have[0]][i]]
            elif not have:
                default[tok] = torch.zeros(ts[0].shape[1])
            else:
                acc = torch.zeros(ts[0].shape[1])
                for k in have:
                    acc += ts[k][perms[k][i]]
                default[tok] = acc / len(have)
        rows = len(vocab) + (-len(vocab) % pad if pad else 0)
        for k in range(3):
            new = torch.zeros(rows, ts[0].shape[1])
            for tok, i in vocab.items():
                force = tok in cfg and cfg[tok][2]
                new[i] = ts[k][perms[k][i]] if perms[k][i] >= 0 and not force else default[tok]
            if rows > len(vocab):
                new[len(vocab) :] = new[: len(vocab)].double().mean(0).float()
            result[k][t] = new
    return result


def check_merge(out: Path, inputs: list[dict[str, torch.Tensor]]) -> None:
    got = load_model(out)
    for name, b in inputs[0].items():
        want = task_arithmetic(b.float(), [m[name].float() for m in inputs[1:]], [1.0, 1.0], 1.0, False)
        assert torch.equal(got[name], want), name


def test_union_tokenizer_rows_rebuilt_and_every_token_runs(family: Path) -> None:
    run(family, "tokenizer_source: union\n", "ok")
    out = family / "ok"
    vocab = transformers.AutoTokenizer.from_pretrained(out).get_vocab()
    assert {t: vocab[t] for t in ("new0", "new1", "x0")} == {"new0": VOCAB, "new1": VOCAB + 1, "x0": VOCAB + 2}
    assert load_and_run(out) == (torch.float32, VOCAB + 3)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == VOCAB + 3
    check_merge(out, permuted(family, out, {}))  # new1 (ft1 and ft2, not the base): their mean


def test_tokenizer_block_sources_force_and_padding_any_block_size(family: Path) -> None:
    body = (
        "tokenizer:\n  source: union\n  pad_to_multiple_of: 8\n  tokens:\n"
        "    new0: {source: {kind: zero}}\n"
        "    w5: {source: {kind: model_token, model: ./ft2, token: x0}, force: true}\n"
        "    extra: {source: {kind: model_token, model: ./base, token_id: 3}}\n"
        "    x0: {source: ./ft2}\n"
    )
    run(family, body, "ok1", "--block-size", "96")
    run(family, body, "ok2")
    out = family / "ok1"
    assert load_and_run(out) == (torch.float32, VOCAB + 4)
    assert load_model(out)["lm_head.weight"].shape[0] == VOCAB + 8  # 68 tokens padded to 72 rows
    cfg = {"new0": ("zero", None, False), "w5": ("model_token", ("ft2", "x0"), True),
           "extra": ("model_token", ("base", 3), False), "x0": ("model_token", ("ft2", "x0"), False)}  # fmt: skip
    check_merge(out, permuted(family, out, cfg, pad=8))
    a, b = (sorted((family / d).glob("*.safetensors")) for d in ("ok1", "ok2"))
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("chatml", NAMED["chatml"]),
        ("auto", "{{ messages[0]['content'] }} from ft"),
        ("'{{ messages[0].content }}!!'", "{{ messages[0].content }}!!"),
    ],
)
def test_chat_template(family: Path, value: str, needle: str) -> None:
    run(family, f"chat_template: {value}\n", "ok")
    assert transformers.AutoTokenizer.from_pretrained(family / "ok").chat_template.startswith(needle)


def test_bad_tokenizer_settings_are_one_line(family: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = run(family, "chat_template: chat\n", "bad")
    assert (
        out.endswith(
            "bad.yaml:4: chat_template 'chat' is neither auto, a named template (alpaca, chatml, exaone, llama3, mistral) "
            "nor a Jinja template\n"
        )
        and out.count("\n") == 1
    )
    out = run(family, "tokenizer:\n  tokens:\n    zz: {source: ./ft1}\n", "bad")
    assert out == f"Error: tokenizer.tokens['zz']: {family / 'ft1'}'s tokenizer has no 'zz' (choose another source)\n"
    out = run(family, "tokenizer_source: union\ntokenizer: {source: base}\n", "bad")
    assert out.endswith("bad.yaml:5: give either 'tokenizer_source' or 'tokenizer', not both\n")
    monkeypatch.setitem(sys.modules, "transformers", None)
    out = run(family, "tokenizer_source: union\n", "bad")
    assert out == (
        "Error: building a tokenizer (tokenizer_source: union, the 'tokenizer' block) needs transformers: "
        "pip install 'transformers>=4.56' (or use tokenizer_source: base / a model folder)\n"
    )
    assert not (family / "bad").exists()


def test_multimodal_config_gets_the_language_models_vocab_size(tmp_path: Path) -> None:
    """A LLaVA-style config keeps vocab_size under text_config: the built vocabulary's size goes there."""
    from engine.io.output import _update_config

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llava", "text_config": {"vocab_size": 64, "hidden_size": 16}}))
    _update_config(path, {"vocab_size": 67})
    assert json.loads(path.read_text()) == {"model_type": "llava", "text_config": {"vocab_size": 67, "hidden_size": 16}}


def test_multimodal_processor_files_are_copied(tiny_family: MakeFamily) -> None:
    """A LLaVA-style base's image processor files come with the merge (AutoProcessor needs them)."""
    base, (a,) = tiny_family(1)
    for name in ("preprocessor_config.json", "processor_config.json", "chat_template.json"):
        (base / name).write_text(json.dumps({"name": name}))
    result = CliRunner().invoke(main, ["merge", "--method", "linear", "--base", str(base), "--model", str(a),
                                       "-o", str(base.parent / "out")])  # fmt: skip
    assert result.exit_code == 0, result.output
    for name in ("preprocessor_config.json", "processor_config.json", "chat_template.json"):
        assert json.loads((base.parent / "out" / name).read_text()) == {"name": name}
