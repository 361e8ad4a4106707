"""Merged outputs load in transformers as written: config.json states the dtype of the weights
(transformers 5 reads `dtype`, 4.x `torch_dtype`), and the tokenizer never has ids the
embeddings cannot serve. A tiny Llama built with transformers, fine-tunes derived from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from engine.cli import main

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 64


def tiny_llama(folder: Path, vocab: int = VOCAB) -> None:
    """A 2-layer Llama saved by transformers as float32 safetensors, with a word-level tokenizer
    of `vocab` tokens."""
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    words = {f"w{i}": i for i in range(vocab)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(folder)


def fine_tune(base: Path, folder: Path, seed: int, dtype: torch.dtype = torch.float32, add: int = 0) -> Path:
    """base + noise, in `dtype`; with `add` tokens added to its tokenizer and rows to its
    embeddings and lm_head (as `resize_token_embeddings` does)."""
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(str(base / "model.safetensors"))
    out = {n: (t + 0.01 * torch.randn(t.shape, generator=g)).to(dtype) for n, t in tensors.items()}
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        out[n] = torch.cat([out[n], torch.randn(add, out[n].shape[1], generator=g).to(dtype)])
    folder.mkdir()
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for f in base.iterdir():
        if f.suffix == ".json":
            (folder / f.name).write_bytes(f.read_bytes())
    if add:
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        tok.add_tokens([f"new{i}" for i in range(add)])
        tok.save_pretrained(folder)
    return folder


def load_and_run(folder: Path) -> tuple[torch.dtype, int]:
    """Load the merge as a user would (dtype from its config), run every token id through it;
    returns the parameters' dtype and the tokenizer's size."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([tokenizer.convert_tokens_to_ids(list(tokenizer.get_vocab()))])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()
    dtypes = {p.dtype for p in model.parameters()}
    assert len(dtypes) == 1, dtypes
    return dtypes.pop(), len(tokenizer)


def run(*args: str) -> str:
    result = CliRunner().invoke(main, ["merge", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_config_states_the_dtype_written(tmp_path: Path) -> None:
    """A float32 base config: a bf16 merge (--out-dtype, or bf16 inputs without it) loads as bf16."""
    base = tmp_path / "base"
    tiny_llama(base)
    assert json.loads((base / "config.json").read_text())["dtype"] == "float32"
    ft1, ft2 = fine_tune(base, tmp_path / "ft1", 1), fine_tune(base, tmp_path / "ft2", 2)
    run("--method", "task_arithmetic", "--base", str(base), "--model", str(ft1), "--model", str(ft2),
        "--out-dtype", "bf16", "-o", str(tmp_path / "out"))  # fmt: skip
    assert load_and_run(tmp_path / "out") == (torch.bfloat16, VOCAB)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["dtype"], config["torch_dtype"]) == ("bfloat16", "bfloat16")
    # bf16 weights under the base's float32 config, no --out-dtype: the config follows the weights.
    bf = fine_tune(base, tmp_path / "bf", 3, torch.bfloat16)
    cfg = tmp_path / "copy.yaml"
    cfg.write_text(f"merge_method: passthrough\nmodels: [{{model: {bf}}}]\n")
    run(str(cfg), "-o", str(tmp_path / "copy"))
    assert load_and_run(tmp_path / "copy") == (torch.bfloat16, VOCAB)


def test_tokenizer_larger_than_the_embeddings_is_refused(tmp_path: Path) -> None:
    """tokenizer_source names a model with 2 added tokens: with the base's 64 rows the merge is
    refused in one line before any work; with --vocab union every token id has its row."""
    base = tmp_path / "base"
    tiny_llama(base)
    ft1 = fine_tune(base, tmp_path / "ft1", 1, add=2)
    fine_tune(base, tmp_path / "ft2", 2)
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(
        "merge_method: task_arithmetic\nbase_model: ./base\nmodels: [{model: ./ft1}, {model: ./ft2}]\n"
        "tokenizer_source: ./ft1\n"
    )
    result = CliRunner().invoke(main, ["merge", str(cfg), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert result.output == (
        f"Error: {ft1 / 'tokenizer.json'}: the tokenizer uses 66 token ids but the merged 'model.embed_tokens.weight' "
        "has 64 rows, so ids 64..65 would index past it: merge the rows the models added with --vocab union "
        "(vocab: union), or take a tokenizer that fits (tokenizer_source: base)\n"
    )
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    run(str(cfg), "--vocab", "union", "-o", str(tmp_path / "union"))
    assert load_and_run(tmp_path / "union") == (torch.float32, VOCAB + 2)
