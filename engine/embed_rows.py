"""Each input's token embeddings rebuilt for a built vocabulary (engine.tokenizer_build), row by
row as mergekit's tokenizer/embed.py builds them, streamed: a block of output rows is gathered
from the inputs' rows, so memory stays one block and the bytes do not depend on its size.

For output token t and input i (mergekit's PermutedEmbeddings):
- input i's own row of t, when it has t and the config's `tokens` do not `force` another source;
- else t's default row, the same for every input: the config's source for t (`zero`, a model's
  row of t, or a model's row of another token); else the one input that has t; else zero when
  none has it; else the base's, when there is a base and it has t; else the mean of the rows of
  the inputs that have t (summed in config order from zero, then divided, in float32);
- rows past the vocabulary (`pad_to_multiple_of`) hold the mean of the input's rebuilt rows
  (summed in float64, rounded once; mergekit's torch.mean may differ in the last bit).

Every stream of a rebuilt tensor is read as float32 (float64 if an input stores that), so that
copied rows are exact and means are not rounded to a 16-bit dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engine.dtypes import DTYPES, itemsize
from engine.errors import SpecError
from engine.io.checkpoint import Checkpoint
from engine.io.inventory import Inventory
from engine.spec import MergeSpec
from engine.tokenizer_build import Vocabulary, build_vocabulary
from engine.tokens import TokenConfig
from engine.vocab import PIECE_BYTES, Resized, VocabStream, is_embedding_like

log = logging.getLogger(__name__)

ZERO, MEAN, PAD = -1, -2, -3  # `Rebuilt.src` codes for rows no single input row gives

Row = tuple[int, int]  # (input, row)


@dataclass(frozen=True, eq=False)
class Rebuilt(Resized):
    """A token tensor whose rows follow a built vocabulary: per stream and output row, the
    input and row it is read from (`src`, `row`), or ZERO, MEAN (of `means[row]`) or PAD."""

    src: tuple[tuple[int, ...], ...] = ()
    row: tuple[tuple[int, ...], ...] = ()
    means: tuple[tuple[Row, ...], ...] = ()
    n_vocab: int = 0
    files: tuple[tuple[str, bytes], ...] = ()  # the built tokenizer's files

    def fill(self, stream: VocabStream, r0: int, r1: int, buf: torch.Tensor) -> None:
        dtype = DTYPES[self.dtypes[stream.index]]
        row_bytes = self.row_numel * itemsize(self.dtypes[stream.index])
        out = buf.view(dtype).view(r1 - r0, self.row_numel)
        src, row = self.src[stream.index], self.row[stream.index]
        r = r0
        while r < r1:
            k, end = src[r], r + 1
            if k >= 0:  # a run of consecutive rows of one input: one read
                while end < r1 and src[end] == k and row[end] == row[end - 1] + 1:
                    end += 1
                stream.copy(self, k, row[r], row[r] + end - r, buf[(r - r0) * row_bytes : (end - r0) * row_bytes])
            elif k == ZERO:
                out[r - r0].zero_()
            elif k == MEAN:
                out[r - r0].copy_(self._mean(stream, self.means[row[r]], dtype))
            else:
                out[r - r0].copy_(self._pad(stream, dtype))
            r = end

    def _mean(self, stream: VocabStream, rows: Sequence[Row], dtype: torch.dtype) -> torch.Tensor:
        """mergekit's average: zero, plus each input's row in order, divided by their count."""
        acc = torch.zeros(self.row_numel, dtype=dtype)
        one = torch.empty(self.row_numel * dtype.itemsize, dtype=torch.uint8)
        for k, r in rows:
            stream.copy(self, k, r, r + 1, one)
            acc += one.view(dtype)
        return acc / len(rows)

    def _pad(self, stream: VocabStream, dtype: torch.dtype) -> torch.Tensor:
        """The mean of this stream's vocabulary rows, computed once per stream."""
        if self.name not in stream.cache:
            step = max(1, PIECE_BYTES // (self.row_numel * dtype.itemsize))
            total = torch.zeros(self.row_numel, dtype=torch.float64)
            for a in range(0, self.n_vocab, step):
                b = min(a + step, self.n_vocab)
                chunk = torch.empty((b - a) * self.row_numel * dtype.itemsize, dtype=torch.uint8)
                self.fill(stream, a, b, chunk)
                total += chunk.view(dtype).view(b - a, self.row_numel).double().sum(0)
            stream.cache[self.name] = (total / self.n_vocab).to(dtype)
        return stream.cache[self.name]


def token_tensors(base: Checkpoint) -> list[str]:
    """The tensors indexed by token id: the 2-D embedding-like tensors with the most rows
    (positional and token-type embeddings have fewer)."""
    found = {n: t.rows for n, t in base.tensors.items() if len(t.shape) == 2 and is_embedding_like(n)}
    most = max(found.values(), default=0)
    return [n for n, r in found.items() if r == most]


def rebuild_vocabulary(spec: MergeSpec, inv: Inventory) -> Inventory:
    """`inv` with its token tensors rebuilt for the vocabulary `spec.tokenizer` builds."""
    assert spec.tokenizer is not None
    names = token_tensors(inv.base)
    if not names:
        raise SpecError(
            f"{spec.base}: no token embedding tensor (embed_tokens, lm_head, wte, ...) to rebuild for the tokenizer"
        )
    sources = (inv.base, *inv.models)
    paths = [spec.base, *(m.path for m in spec.models)]
    distinct = list(dict.fromkeys(paths))  # an input listed twice (linear's template) is one model
    of = [distinct.index(p) for p in paths]
    rows = [min(sources[paths.index(p)].tensors[n].rows for n in names) for p in distinct]
    vocab = build_vocabulary(spec.tokenizer, distinct, rows)
    has_base = spec.method_impl.uses_base or spec.base not in paths[1:]
    src, row, means = _recipes(vocab, dict(spec.tokenizer.tokens), distinct, rows, has_base)
    n = len(vocab.tokens)
    pad = spec.tokenizer.pad_to_multiple_of
    out_rows = n if not pad or n % pad == 0 else (n // pad + 1) * pad
    # per stream, output row -> (input stream, row); inputs are numbered by their first stream
    first = [of.index(d) for d in range(len(distinct))]
    streams_src = tuple(tuple(first[k] if k >= 0 else k for k in src[d]) + (PAD,) * (out_rows - n) for d in of)
    streams_row = tuple(tuple(row[d]) + (0,) * (out_rows - n) for d in of)
    mean_rows = tuple(tuple((first[k], r) for k, r in m) for m in means)
    resized = dict(inv.resized)
    for name in names:
        stored = tuple(c.tensors[name].dtype for c in sources)
        wide = ("F64" if "F64" in stored else "F32",) * len(stored)
        rz = Rebuilt(name, tuple(c.tensors[name].rows for c in sources), out_rows, inv.base.tensors[name].row_numel,
                     stored, wide, streams_src, streams_row, mean_rows, n, vocab.files)  # fmt: skip
        resized[name] = rz
    return replace(inv, resized=resized)


def _recipes(
    vocab: Vocabulary, cfgs: dict[str, TokenConfig], inputs: Sequence[Path], rows: Sequence[int], has_base: bool
) -> tuple[list[list[int]], list[list[int]], list[tuple[Row, ...]]]:
    """Per input (distinct, base first) and output id: its source input and row (or ZERO / MEAN
    with the index of the mean's rows)."""
    src: list[list[int]] = [[] for _ in inputs]
    row: list[list[int]] = [[] for _ in inputs]
    means: list[tuple[Row, ...]] = []
    for i, token in enumerate(vocab.tokens):
        cfg = cfgs.get(token)
        k, r = _default(vocab, cfg, token, i, inputs, rows, has_base, means)
        for d, perm in enumerate(vocab.perms):
            own = perm[i] >= 0 and not (cfg is not None and cfg.force)
            src[d].append(d if own else k)
            row[d].append(perm[i] if own else r)
    return src, row, means


def _default(
    vocab: Vocabulary, cfg: TokenConfig | None, token: str, i: int, inputs: Sequence[Path], rows: Sequence[int],
    has_base: bool, means: list[tuple[Row, ...]],
) -> Row:  # fmt: skip
    """Token `token`'s (id `i`) default row for inputs that lack it, as (input, row)."""
    if cfg is not None:
        s = cfg.source
        if s.kind == "zero":
            return ZERO, 0
        assert s.model is not None
        if s.model not in inputs:
            raise SpecError(f"tokenizer.tokens[{token!r}]: {s.model} is not one of the merged models")
        k = inputs.index(s.model)
        if s.kind == "model":
            if vocab.perms[k][i] < 0:
                raise SpecError(
                    f"tokenizer.tokens[{token!r}]: {s.model}'s tokenizer has no {token!r} (choose another source)"
                )
            return k, vocab.perms[k][i]
        r = s.token_id if s.token_id is not None else vocab.originals[k].get(str(s.token), -1)
        if not 0 <= r < rows[k]:
            raise SpecError(
                f"tokenizer.tokens[{token!r}]: {s.model} has no token {s.token if s.token_id is None else r!r} with a row"
            )
        return k, r
    present = [d for d, p in enumerate(vocab.perms) if p[i] >= 0]
    if len(present) == 1:
        return present[0], vocab.perms[present[0]][i]
    if not present:
        log.warning("token %r is in no input's tokenizer: its rows are zero", token)
        return ZERO, 0
    if has_base and vocab.perms[0][i] >= 0:
        return 0, vocab.perms[0][i]
    means.append(tuple((d, vocab.perms[d][i]) for d in present))
    return MEAN, len(means) - 1


def built_files(resized: Sequence[Resized]) -> tuple[tuple[str, bytes], ...] | None:
    """The built tokenizer's files, when the merge builds one."""
    return next((r.files for r in resized if isinstance(r, Rebuilt)), None)
