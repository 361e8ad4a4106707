"""Build the output tokenizer as mergekit's tokenizer/build.py does (transformers' tokenizers,
an optional dependency), and map each output token id to each input's row.

- Every input's tokenizer is loaded; the base's is stripped of tokens at or past its config's
  `vocab_size` (mergekit's `get_stripped_tokenizer`). An input whose tokenizer cannot be loaded
  is taken to have the base's.
- `source: base` keeps the base's, a folder takes that model's, `union` starts from the base's
  and adds every other input's tokens it lacks (added tokens with their settings, first wins).
- The `tokens:` of the config are then added where missing.
- Input i's permutation gives, per output id, the row of that token in input i, or -1 where
  input i lacks it (or its id is at or past its config's `vocab_size` or its rows).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import SpecError
from engine.tokens import TokenizerSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Vocabulary:
    """The output tokenizer and where its tokens sit in each input (base first)."""

    tokens: tuple[str, ...]  # output id -> token
    perms: tuple[tuple[int, ...], ...]  # per input, output id -> its row, or -1
    originals: tuple[dict[str, int], ...]  # per input, its own token -> id
    files: tuple[tuple[str, bytes], ...]  # the tokenizer files to write


def require_transformers() -> Any:
    """transformers, or a one-line error saying what to install."""
    try:
        import transformers
    except ImportError:
        raise SpecError(
            "building a tokenizer (tokenizer_source: union, the 'tokenizer' block) needs transformers: "
            "pip install 'transformers>=4.56' (or use tokenizer_source: base / a model folder)"
        ) from None
    return transformers


def config_vocab_size(folder: Path) -> int | None:
    """config.json's `vocab_size` (or its text model's), as mergekit reads it."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for c in (cfg, cfg.get("text_config") if isinstance(cfg, dict) else None):
        if isinstance(c, dict) and isinstance(c.get("vocab_size"), int):
            return int(c["vocab_size"])
    return None


def build_vocabulary(spec: TokenizerSpec, inputs: Sequence[Path], rows: Sequence[int]) -> Vocabulary:
    """The output vocabulary for `inputs` (base first, distinct folders) whose token tensors
    have `rows` rows each.

    Raises:
        SpecError: transformers is missing, or the base's or the source's tokenizer cannot be loaded.
    """
    tf = require_transformers()
    base_tok = _stripped(tf, inputs[0])
    toks = [base_tok]
    for folder in inputs[1:]:
        try:
            toks.append(tf.AutoTokenizer.from_pretrained(str(folder)))
        except Exception as e:  # as mergekit: an input without a loadable tokenizer has the base's
            log.warning("%s: cannot load its tokenizer (%s); taking it to be the base's", folder, e)
            toks.append(base_tok)
    if spec.source == "base":
        out = base_tok
    elif spec.source == "union":
        out = _union(tf, base_tok, toks, inputs)
    else:
        out = _load(tf, Path(spec.source))
    for token, _ in spec.tokens:
        out.add_tokens(token)
    vocab = out.get_vocab()
    tokens = _by_id(vocab)
    perms = tuple(
        _perm(tokens, tok.get_vocab(), min(config_vocab_size(f) or n, n)) for tok, f, n in zip(toks, inputs, rows)
    )
    with tempfile.TemporaryDirectory() as d:
        out.save_pretrained(d)
        files = tuple((p.name, p.read_bytes()) for p in sorted(Path(d).iterdir()) if p.is_file())
    return Vocabulary(tokens, perms, tuple(t.get_vocab() for t in toks), files)


def _load(tf: Any, folder: Path) -> Any:
    try:
        return tf.AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise SpecError(f"{folder}: cannot load its tokenizer with transformers: {' '.join(str(e).split())}") from None


def _stripped(tf: Any, folder: Path) -> Any:
    """The base's tokenizer without the tokens at or past its config's vocab_size."""
    tok = _load(tf, folder)
    size = config_vocab_size(folder) or len(tok.get_vocab())
    unused = {t for t, i in tok.get_vocab().items() if i >= size}
    if not unused:
        return tok
    doc = json.loads(tok._tokenizer.to_str())
    if doc["model"]["type"] != "BPE":
        raise SpecError(
            f"{folder}: its tokenizer has tokens past vocab_size {size} and is not BPE; it cannot be stripped"
        )
    doc["added_tokens"] = [e for e in doc["added_tokens"] if e["id"] < size]
    for t in unused:
        doc["model"]["vocab"].pop(t, None)
    doc["model"]["merges"] = [
        m for m in doc["model"]["merges"] if not set(m.split(" ") if isinstance(m, str) else m) & unused
    ]
    import tokenizers

    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(doc))
    return tok


def _union(tf: Any, base_tok: Any, toks: Sequence[Any], inputs: Sequence[Path]) -> Any:
    """mergekit's build_union_tokenizer: the base's tokenizer plus every input's other tokens."""
    vocab: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tok, folder in zip(toks, inputs):
        size = config_vocab_size(folder) or tok.vocab_size
        decoder = tok.added_tokens_decoder
        names = {info.content for info in decoder.values()}
        for t, i in tok.get_vocab().items():
            if i < size and t not in names:
                vocab.setdefault(t)
        for i, info in decoder.items():
            if i < size and info.content not in added:
                added[info.content] = info
    with tempfile.TemporaryDirectory() as d:  # a copy: the base's tokenizer stays as loaded
        base_tok.save_pretrained(d)
        out = tf.AutoTokenizer.from_pretrained(d)
    base_vocab = base_tok.get_vocab()
    for t in vocab:
        if t not in added and t not in base_vocab:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


def _by_id(vocab: dict[str, int]) -> tuple[str, ...]:
    """The tokens in id order; the ids must be 0..n-1 (each names one embedding row)."""
    tokens = [""] * len(vocab)
    for t, i in vocab.items():
        if not 0 <= i < len(vocab) or tokens[i]:
            raise SpecError(f"the built tokenizer's ids are not 0..{len(vocab) - 1} (token {t!r} has id {i})")
        tokens[i] = t
    return tuple(tokens)


def _perm(tokens: Sequence[str], own: dict[str, int], size: int) -> tuple[int, ...]:
    """Per output id, the input's row of that token; -1 where it lacks it or past `size`."""
    return tuple(i if (i := own.get(t, -1)) < size else -1 for t in tokens)
