"""Vocabulary mismatches: fine-tunes that added tokens have embedding rows the base lacks.

An **embedding-like** tensor (name containing `embed`, `lm_head`, `wte`, `word_embeddings`,
`tok_embeddings`, `embed_out`, T5's `shared.`, or ending in `output.weight`) may differ from the
base in dim 0 only; any other shape difference is still a homology error. The policy:

- `base` (default): the output has the base's rows; extra rows of a model are ignored. A model
  with *fewer* rows than the base is refused (use `union`).
- `union`: the output has the largest row count. Each row r is merged against a reference row:
  the base's when r is below the base's row count, otherwise the row of the first model (in
  config order) that has it. A model without row r counts as that reference there (δ = 0).
  So a row only one model has is copied from it exactly (for linear: scaled by its normalized
  weight sum, as every row is), and rows several models added are merged as deltas against the
  first one's. Copy the tokenizer of the model whose added tokens you keep (`tokenizer_source`).

Reading is done by `VocabStream`, which stands in front of each model's reader and fills the
rows a model lacks from the reference. When the models involved store a tensor in different
float dtypes, all its streams are read as the widest (float32, or float64 if present) so that
copied rows stay exact.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.dtypes import DTYPES, MERGEABLE, itemsize
from engine.errors import SpecError
from engine.io.checkpoint import BUFFERED, ReadOptions
from engine.io.lora import RowReader, open_reader

if TYPE_CHECKING:
    from engine.io.checkpoint import Checkpoint
    from engine.io.inventory import Inventory

EMBEDDING_RE = re.compile(
    r"embed|lm_head|word_embeddings|tok_embeddings|(?:^|\.)wte\.|(?:^|\.)shared\.|(?:^|\.)output\.weight$"
)
OUTPUT_HEAD_RE = re.compile(r"lm_head|embed_out|(?:^|\.)output\.weight$")
PIECE_BYTES = 1 << 20  # casts go through a scratch buffer of about this size
# Tokenizer files whose token ids can be read without running tokenizer code.
TOKENIZER_JSON = ("tokenizer.json", "vocab.json", "added_tokens.json", "tokenizer_config.json")


def is_embedding_like(name: str) -> bool:
    """True for tensors whose rows are vocabulary entries (embeddings, LM heads)."""
    return EMBEDDING_RE.search(name) is not None


@dataclass(frozen=True)
class Resized:
    """One embedding-like tensor whose row count differs between the inputs."""

    name: str
    rows: tuple[int, ...]  # per source, base first
    out_rows: int
    row_numel: int
    stored: tuple[str, ...]  # each source's dtype
    dtypes: tuple[str, ...]  # what each stream reads it as

    def fill(self, stream: VocabStream, r0: int, r1: int, buf: torch.Tensor) -> None:
        """Rows [r0, r1) of `stream` into the uint8 `buf`, at the stream's dtype."""
        row_bytes = self.row_numel * itemsize(self.dtypes[stream.index])
        r = r0
        while r < r1:
            # The source changes only at row counts: rows [r, end) come from one input.
            end = min([r1, *(b for b in self.rows if b > r)])
            stream.copy(self, self.source(stream.index, r), r, end, buf[(r - r0) * row_bytes : (end - r0) * row_bytes])
            r = end

    def source(self, stream: int, row: int) -> int:
        """Which input provides `row` of `stream`: its own, else the reference row's owner."""
        if row < self.rows[stream]:
            return stream
        if row < self.rows[0]:
            return 0
        return next(i for i in range(1, len(self.rows)) if self.rows[i] > row)


def rows_problem(
    name: str, base: tuple[int, ...], model: tuple[int, ...], dtypes: tuple[str, str], policy: str
) -> str | None:
    """Why a shape difference cannot be merged under `policy`: "" for a plain mismatch, a hint
    when only the rows differ; None when `policy` merges it."""
    if len(base) != len(model) or not base or base[1:] != model[1:]:
        return ""
    if not is_embedding_like(name):
        return "only embedding-like tensors may differ in rows"
    if not all(d in MERGEABLE for d in dtypes):
        return "only float tensors may differ in rows"
    if policy == "base" and model[0] < base[0]:
        return "fewer rows than the base: --vocab union counts missing rows as the base"
    return None


def plan_resized(policy: str, sources: Sequence[Checkpoint]) -> dict[str, Resized]:
    """Every tensor of the base whose row count differs in some model, and how to read it."""
    base, *models = sources
    out = {}
    for name, info in base.tensors.items():
        rows = (info.rows, *(m.tensors[name].rows for m in models))
        if len(set(rows)) == 1:
            continue
        stored = tuple(c.tensors[name].dtype for c in sources)
        dtypes = stored
        if policy == "union" and len(set(stored)) > 1:
            dtypes = ("F64" if "F64" in stored else "F32",) * len(stored)
        out_rows = max(rows) if policy == "union" else rows[0]
        out[name] = Resized(name, rows, out_rows, info.row_numel, stored, dtypes)
    return out


class VocabStream:
    """Stream `index`'s reader for a merge with resized tensors: rows a model lacks come from
    the reference row's owner, cast to the stream's dtype."""

    def __init__(self, index: int, readers: Sequence[RowReader], resized: dict[str, Resized]) -> None:
        self.index, self.readers, self.resized = index, readers, resized
        self._scratch = torch.empty(0, dtype=torch.uint8)
        self.cache: dict[str, torch.Tensor] = {}  # per tensor, rows a `Resized` computes once (engine.embed_rows)

    def read_rows(self, name: str, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        rz = self.resized.get(name)
        if rz is None:
            return self.readers[self.index].read_rows(name, r0, r1, out)
        dtype = rz.dtypes[self.index]
        row_bytes = rz.row_numel * itemsize(dtype)
        nbytes = (r1 - r0) * row_bytes
        buf = torch.empty(nbytes, dtype=torch.uint8) if out is None else out.view(-1)[:nbytes]
        rz.fill(self, r0, r1, buf)
        return buf.view(DTYPES[dtype]).view(r1 - r0, rz.row_numel)

    def advise_rows(self, name: str, r0: int, r1: int) -> None:
        if name not in self.resized:
            self.readers[self.index].advise_rows(name, r0, r1)

    def copy(self, rz: Resized, src: int, r0: int, r1: int, dst: torch.Tensor) -> None:
        """Rows [r0, r1) of input `src` into the uint8 `dst`, as this stream's dtype."""
        reader, dtype, stored = self.readers[src], rz.dtypes[self.index], rz.stored[src]
        if stored == dtype:
            reader.read_rows(rz.name, r0, r1, out=dst)
            return
        out = dst.view(DTYPES[dtype]).view(r1 - r0, rz.row_numel)
        src_row_bytes = rz.row_numel * itemsize(stored)
        step = max(1, PIECE_BYTES // max(src_row_bytes, 1))
        for p in range(r0, r1, step):
            q = min(p + step, r1)
            if self._scratch.numel() < (q - p) * src_row_bytes:
                self._scratch = torch.empty((q - p) * src_row_bytes, dtype=torch.uint8)
            out[p - r0 : q - r0].copy_(reader.read_rows(rz.name, p, q, out=self._scratch))

    def close(self) -> None:
        return None  # the underlying readers are closed by their owner


def tokenizer_size(folder: Path) -> tuple[int, Path] | None:
    """How many token ids the tokenizer files in `folder` use (one more than the largest id in
    tokenizer.json's vocabulary and added tokens, vocab.json, added_tokens.json and
    tokenizer_config.json's added_tokens_decoder), with the file that uses the largest; None
    when no JSON tokenizer file is there or none can be read (a sentencepiece tokenizer.model
    is not parsed)."""
    best: tuple[int, Path] | None = None
    for name in TOKENIZER_JSON:
        path = folder / name
        try:
            ids = _token_ids(name, json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, AttributeError, KeyError):
            continue  # absent or not what transformers writes: not ours to judge
        size = 1 + max((i for i in ids if isinstance(i, int) and not isinstance(i, bool)), default=-1)
        if size > 0 and (best is None or size > best[0]):
            best = (size, path)
    return best


def _token_ids(name: str, doc: Any) -> list[Any]:
    if name == "tokenizer.json":
        vocab = (doc.get("model") or {}).get("vocab") or {}
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))  # Unigram: a list
        return [*ids, *(t["id"] for t in doc.get("added_tokens") or [])]
    if name == "tokenizer_config.json":
        return [int(i) for i in doc.get("added_tokens_decoder") or {}]
    return list(doc.values())  # vocab.json, added_tokens.json: token -> id


def check_tokenizer_fits(folder: Path, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse to pair the tokenizer in `folder` with output embeddings it would index past: a
    token id at or beyond the rows of the token embeddings raises IndexError in the model.

    The token embeddings are the embedding-like tensors with the most rows: positional and
    token-type embeddings (`embed_positions`, `token_type_embeddings`) also match the name
    pattern but have fewer rows and are not indexed by token ids.

    Raises:
        SpecError: naming the tokenizer's size, the tensor, its rows and the fixes.
    """
    found = tokenizer_size(folder)
    rows = [(shape[0], name) for name, shape in shapes.items() if len(shape) == 2 and is_embedding_like(name)]
    if found is None or not rows:
        return
    size, path = found
    most = max(r for r, _ in rows)
    # named: the input embeddings where they have that many rows (the lookup that would fail)
    name = min((n for r, n in rows if r == most), key=lambda n: (bool(OUTPUT_HEAD_RE.search(n)), n))
    if size > most:
        raise SpecError(
            f"{path}: the tokenizer uses {size} token ids but the merged {name!r} has {most} rows, so ids "
            f"{most}..{size - 1} would index past it: merge the rows the models added with --vocab union "
            "(vocab: union), or take a tokenizer that fits (tokenizer_source: base)"
        )


def open_streams(inv: Inventory, stack: ExitStack, options: ReadOptions = BUFFERED) -> list[RowReader]:
    """One reader per input stream (base first), closed by `stack`: plain readers, LoRA readers,
    and in front of them `VocabStream`s when some tensor's rows differ."""
    raw: list[RowReader] = []
    for c in (inv.base, *inv.models):
        reader = open_reader(c, options)
        stack.callback(reader.close)
        raw.append(reader)
    if not inv.resized:
        return raw
    return [VocabStream(i, raw, inv.resized) for i in range(len(raw))]
