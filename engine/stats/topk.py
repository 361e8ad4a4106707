"""Exact top-k by magnitude over a whole tensor, out of core: a radix select over float bits.

TIES keeps the k = int(density · n) largest |δ| of each tensor (Yadav et al., 2023); breadcrumbs
keeps the ranks between two such cuts. `torch.topk` / `kthvalue` need the whole tensor in RAM,
so the threshold is found instead with three passes over the chunks, each holding only fixed
histograms per selection:

1. |δ| as float32 is non-negative, so its int32 bit pattern (the *key*) orders exactly as the
   value. Histogram the high 16 bits of every key (32768 bins, the sign bit being clear) and
   find the bucket that holds the k-th largest key.
2. Histogram the low 16 bits of the keys inside that bucket: this gives the exact k-th largest
   key T, how many keys lie above it, and so r = how many keys equal to T must be kept.
   Pass 1 guesses the bucket from the tensor's first chunk (its k scaled to the chunk) and
   counts, for every chunk, the low bits of a window of a few buckets around the guess: where
   the bucket falls in the window, those are pass 2's counts, and pass 2 is skipped
   (`Reducer.needed`: it reads nothing). A wrong guess costs only the window's counting.
3. Ties at T are broken by lowest flat index, so that exactly k elements are kept whatever the
   block size: chunks arrive in flat order, so a running count of keys equal to T finds the
   flat index of the r-th one. (If all keys equal to T are kept this pass has nothing to do.)
   Until the r-th is seen, every tie so far is kept: so in a merge from the first row this pass
   folds each block just before merging it (`Reducer.folds_ahead`) and costs no read of its own.

The result is a `Cut`: an element is in the top k iff key > T, or key == T and its flat index is
at most `last_tie`. k = 0 and k = n need no pass at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.methods.base import Chunk, Reducer, Stats, TensorParams
from engine.stats import pairwise

KEY_MAX = 0x7FFFFFFF  # the largest key (a NaN pattern); keys are int32 >= 0
ALL_TIES = (1 << 63) - 1  # `last_tie` when every key equal to the threshold is kept
_HIGH_BINS = 1 << 15  # high 16 bits of a key whose sign bit is clear
_LOW_BINS = 1 << 16
WINDOW = 4  # buckets in pass 1's window (synthetic bf16 deltas: the guess is off by 0 or 1)
_CROWDED = 0.05  # a window holding more of the first chunk's keys than this shrinks to its guess
_WINDOW_SCRATCH = 1 << 24  # bytes of int32 counts per thread the C may hold for the windows of one call

# (base chunk, model chunks) -> keys by selection index (`_Keys`: |θₘ − θ_base| by model)
KeysOf = Callable[[torch.Tensor, Sequence[torch.Tensor]], Any]
# (params, numel) -> the selections wanted, as (model index, k) pairs, in a fixed order.
Wants = Callable[[TensorParams, int], Sequence[tuple[int, int]]]


@dataclass(frozen=True)
class Cut:
    """Top-k membership: key > threshold, or key == threshold and flat index <= last_tie."""

    threshold: int
    last_tie: int

    @classmethod
    def everything(cls) -> Cut:
        return cls(-1, -1)  # every key is > -1

    @classmethod
    def nothing(cls) -> Cut:
        return cls(KEY_MAX, -1)  # no key is > KEY_MAX, and no index is <= -1


@dataclass(frozen=True)
class _Bucket:
    """After pass 1: the k-th largest key has high bits `bucket`; `above` keys lie in higher buckets."""

    model: int
    k: int
    bucket: int
    above: int


@dataclass(frozen=True)
class _Tie:
    """After pass 2: the threshold is known; the first `r` keys equal to it (in flat order) are in."""

    model: int
    threshold: int
    r: int


_Step = Cut | _Bucket | _Tie | tuple[int, int]


def magnitude_key_(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """int32 keys of |θₘ − θ_base|, in place over the (scratch) model chunk."""
    return model.sub_(base).view(torch.int32).bitwise_and_(KEY_MAX)


def magnitude_key(delta: torch.Tensor) -> torch.Tensor:
    """int32 keys of |δ| (a new tensor; `delta` is left alone)."""
    return delta.view(torch.int32) & KEY_MAX


def in_top(key: torch.Tensor, cut: Cut, start: int) -> torch.Tensor:
    """Bool mask of the chunk's elements in the top k; `start` is the chunk's first flat index."""
    n = key.numel()
    if cut.last_tie < start:  # no kept tie in this chunk
        return key > cut.threshold
    if cut.last_tie >= start + n - 1:  # every tie in this chunk is kept
        return key >= cut.threshold
    mask = key > cut.threshold
    j = cut.last_tie - start + 1
    mask[:j] |= key[:j] == cut.threshold
    return mask


def topk_reducers(name: str, wants: Wants) -> tuple[Reducer, Reducer, Reducer]:
    """The three passes that put `stats[name]`: one `Cut` per wanted (model, k), in order."""
    return _HighPass(name, wants), _LowPass(name), _TiePass(name)


def _pick(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin, above): the bin holding the k-th largest key (1-based) and the count in higher bins."""
    desc = hist.flip(0).cumsum(0)  # desc[j]: keys in the top j + 1 bins
    j = int(torch.searchsorted(desc, torch.tensor([k], dtype=desc.dtype, device=desc.device)))
    b = hist.numel() - 1 - j
    return b, int(desc[j]) - int(hist[b])


def _resolve(s: _Bucket, low: torch.Tensor) -> Cut | _Tie:
    """The threshold within bucket `s.bucket`, from the counts of its keys' low 16 bits."""
    bits, above = _pick(low, s.k - s.above)
    threshold, r = (s.bucket << 16) | bits, s.k - s.above - above
    # r == count(key == threshold): every tie is kept and pass 3 has nothing to find.
    return Cut(threshold, ALL_TIES) if r == int(low[bits]) else _Tie(s.model, threshold, r)


@dataclass
class _Acc:
    steps: list[_Step]
    hists: dict[int, torch.Tensor] = field(default_factory=dict)  # by model (pass 1) or step (pass 2)
    seen: dict[int, int] = field(default_factory=dict)  # pass 3: ties counted so far, by step
    numel: int = 0  # the tensor's elements (pass 1)
    zeros: int = 0  # `keyed_topk_reducers`' first pass: the zero keys so far
    width: int = 0  # pass 1: buckets per window (0: none)
    windows: dict[int, int] = field(default_factory=dict)  # pass 1, by step: its window's first bucket
    lows: dict[int, torch.Tensor] = field(default_factory=dict)  # by step: its window's low-bits counts
    folded: int = 0  # pass 1: elements folded so far


class _Keys:
    """Keys of a chunk, computed once per model and only for the models asked for."""

    def __init__(self, base: torch.Tensor, models: Sequence[torch.Tensor]) -> None:
        self.base, self.models, self.done = base, models, dict[int, torch.Tensor]()

    def __getitem__(self, m: int) -> torch.Tensor:
        if m not in self.done:
            self.done[m] = magnitude_key_(self.base, self.models[m])
        return self.done[m]


class _Pass(Reducer):
    """A pass of the select. Its keys are |δₘ| (`_Keys`, which the C can count from the read
    buffers); `keyed_topk_reducers` sets `keys_of` to rank another per-element value."""

    keys_of: KeysOf = _Keys

    def raw_keys(self) -> bool:
        return self.keys_of is _Keys


# Selections per C call (its MAX_SELECT); more are counted in several sweeps.
_C_SELECT = 64


def _c_counts(
    raw: Sequence[torch.Tensor], wanted: Sequence[tuple[int, int]], into: Sequence[torch.Tensor], width: int = 1
) -> None:
    """Add to each of `into` the histogram of its wanted (model, bucket) as `_counts`, counted by
    the C from the read buffers (base first), every model in one sweep, on the process's pool."""
    kernel: Any = pairwise.fused_for(raw)
    streams = tuple(pairwise.as_buffer(x) for x in raw)
    for at in range(0, len(wanted), _C_SELECT):
        group = tuple((m + 1, b) for m, b in wanted[at : at + _C_SELECT])
        outs = tuple(h.numpy() for h in into[at : at + _C_SELECT])
        kernel.key_histograms(streams, group, outs, pairwise.c_threads(), max(width, 1))


def _counts(key: torch.Tensor, bucket: int, width: int = 1) -> torch.Tensor:
    """Counts of the keys' high 16 bits (bucket -1), or of the low 16 bits of the keys in buckets
    [bucket, bucket + width), bucket by bucket (pass 2: width 1)."""
    high = key >> 16
    if bucket < 0:
        return torch.bincount(high, minlength=_HIGH_BINS)
    at = key[(high >= bucket) & (high < bucket + width)] - (bucket << 16)
    return torch.bincount(at, minlength=width * _LOW_BINS)


def _window_width(selections: int) -> int:
    """Buckets per window: `WINDOW`, fewer where the C's per-thread counts of every selection's
    window would pass `_WINDOW_SCRATCH` (0: no window; at 16 threads, 3 selections get 1)."""
    per_bucket = selections * pairwise.c_threads() * _LOW_BINS * 4
    return min(WINDOW, _WINDOW_SCRATCH // per_bucket) if selections else 0


def _hist(hists: dict[int, torch.Tensor], at: int, bins: int, device: torch.device) -> torch.Tensor:
    """The counts `hists[at]`, made (zeros) at the first chunk that adds to them."""
    if at not in hists:
        hists[at] = torch.zeros(bins, dtype=torch.int64, device=device)
    return hists[at]


# (wanted (model, bucket) selections, their histograms): adds each selection's counts of a chunk
AddCounts = Callable[[Sequence[tuple[int, int]], Sequence[torch.Tensor]], None]


class _HighPass(_Pass):
    """Pass 1: histogram of the keys' high 16 bits, per model, and of each selection's window."""

    def __init__(self, name: str, wants: Wants) -> None:
        self.name, self.wants = name, wants

    def start(self, p: TensorParams, stats: Stats, numel: int) -> Any:
        steps: list[_Step] = []
        for m, k in self.wants(p, numel):
            steps.append(Cut.nothing() if k <= 0 else Cut.everything() if k >= numel else (m, k))
        return _Acc(steps, numel=numel, width=_window_width(sum(isinstance(s, tuple) for s in steps)))

    def chunk(
        self, acc: Any, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> None:
        keys = self.keys_of(base, models)

        def add(wanted: Sequence[tuple[int, int]], into: Sequence[torch.Tensor]) -> None:
            for (m, b), h in zip(wanted, into):
                h.add_(_counts(keys[m], b, acc.width))

        self._count(acc, base.numel(), base.device, add)

    def raw_chunk(self, acc: Any, raw: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk) -> bool:
        if not self.raw_keys() or pairwise.fused_for(raw) is None:
            return False
        self._count(acc, raw[0].numel(), raw[0].device, lambda wanted, into: _c_counts(raw, wanted, into, acc.width))
        return True

    def _count(self, acc: _Acc, n: int, device: torch.device, add: AddCounts) -> None:
        """Fold a chunk of `n` elements, counted by `add` in one sweep: each model's high bits and
        each selection's window. The windows are guessed after the first chunk, which is then
        counted again for them."""
        wanted: list[tuple[int, int]] = []
        into: list[torch.Tensor] = []
        for m in sorted({s[0] for s in acc.steps if isinstance(s, tuple)}):  # a model's next to each other
            wanted.append((m, -1))
            into.append(_hist(acc.hists, m, _HIGH_BINS, device))
            for i, first in acc.windows.items():
                if acc.steps[i][0] == m:  # type: ignore[index]
                    wanted.append((m, first))
                    into.append(acc.lows[i])
        add(wanted, into)
        acc.folded += n
        if acc.width and not acc.windows:
            acc.windows = self._guess(acc)
            acc.lows = {i: torch.zeros(acc.width * _LOW_BINS, dtype=torch.int64, device=device) for i in acc.windows}
            add([(acc.steps[i][0], first) for i, first in acc.windows.items()], list(acc.lows.values()))  # type: ignore[index]

    @staticmethod
    def _guess(acc: _Acc) -> dict[int, int]:
        """Each selection's window: `width` buckets around the bucket of the k-th largest key of
        the elements folded so far, k scaled to them. Where a window would hold over `_CROWDED` of
        those (bf16 deltas crowd into few values), every window is just its guess (`width` 1): a
        wide one would count most keys, and a crowded guess sits on the cut's heavy bucket."""
        guesses = {}
        for i, s in enumerate(acc.steps):
            if isinstance(s, tuple):
                m, k = s
                guesses[i] = m, _pick(acc.hists[m], max(1, round(k * acc.folded / acc.numel)))[0]

        def first(bucket: int) -> int:
            return min(max(bucket - (acc.width - 1) // 2, 0), _HIGH_BINS - acc.width)

        held = [int(acc.hists[m][first(b) : first(b) + acc.width].sum()) for m, b in guesses.values()]
        if max(held) > _CROWDED * acc.folded:
            acc.width = 1
        return {i: first(b) for i, (_, b) in guesses.items()}

    def finish(self, acc: Any, p: TensorParams, stats: Stats) -> dict[str, Any]:
        steps: list[_Step] = []
        for i, s in enumerate(acc.steps):
            if not isinstance(s, tuple):
                steps.append(s)
                continue
            bucket = _Bucket(s[0], s[1], *_pick(acc.hists[s[0]], s[1]))
            first = acc.windows.get(i, -acc.width - 1)
            if first <= bucket.bucket < first + acc.width:  # the window counted what pass 2 would
                at = (bucket.bucket - first) * _LOW_BINS
                steps.append(_resolve(bucket, acc.lows[i][at : at + _LOW_BINS]))
            else:
                steps.append(bucket)
        return {f"{self.name}/1": steps}


class _LowPass(_Pass):
    """Pass 2: histogram of the low 16 bits of the keys in each selection's bucket (where pass 1's
    window missed it)."""

    skippable = True

    def __init__(self, name: str) -> None:
        self.name = name

    def needed(self, p: TensorParams, stats: Stats) -> bool:
        return any(isinstance(s, _Bucket) for s in stats[f"{self.name}/1"])

    def start(self, p: TensorParams, stats: Stats, numel: int) -> Any:
        return _Acc(list(stats[f"{self.name}/1"]))

    def chunk(
        self, acc: Any, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> None:
        keys = self.keys_of(base, models)
        for i, s in enumerate(acc.steps):
            if isinstance(s, _Bucket):
                _hist(acc.hists, i, _LOW_BINS, base.device).add_(_counts(keys[s.model], s.bucket))

    def raw_chunk(self, acc: Any, raw: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk) -> bool:
        if not self.raw_keys() or pairwise.fused_for(raw) is None:
            return False
        at = [i for i, s in enumerate(acc.steps) if isinstance(s, _Bucket)]
        into = [_hist(acc.hists, i, _LOW_BINS, raw[0].device) for i in at]
        _c_counts(raw, [(acc.steps[i].model, acc.steps[i].bucket) for i in at], into)
        return True

    def finish(self, acc: Any, p: TensorParams, stats: Stats) -> dict[str, Any]:
        steps = [_resolve(s, acc.hists[i]) if isinstance(s, _Bucket) else s for i, s in enumerate(acc.steps)]
        return {f"{self.name}/2": steps}


class _TiePass(_Pass):
    """Pass 3: the flat index of the r-th key equal to the threshold (chunks come in flat order)."""

    folds_ahead = True
    skippable = True

    def __init__(self, name: str) -> None:
        self.name = name

    def needed(self, p: TensorParams, stats: Stats) -> bool:
        return any(isinstance(s, _Tie) for s in stats[f"{self.name}/2"])

    def start(self, p: TensorParams, stats: Stats, numel: int) -> Any:
        return _Acc(list(stats[f"{self.name}/2"]))

    def chunk(
        self, acc: Any, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> None:
        keys = self.keys_of(base, models)
        for i, s in enumerate(acc.steps):
            if not isinstance(s, _Tie):
                continue
            ties = keys[s.model] == s.threshold
            seen, here = acc.seen.get(i, 0), int(ties.sum())
            if seen < s.r <= seen + here:
                pos = int(torch.nonzero(ties).flatten()[s.r - seen - 1])
                acc.steps[i] = Cut(s.threshold, c.start + pos)
            acc.seen[i] = seen + here

    def raw_chunk(self, acc: Any, raw: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk) -> bool:
        kernel: Any = pairwise.fused_for(raw) if self.raw_keys() else None
        if kernel is None:
            return False
        streams = tuple(pairwise.as_buffer(x) for x in raw)
        at = [i for i, s in enumerate(acc.steps) if isinstance(s, _Tie)]
        for g in range(0, len(at), _C_SELECT):
            group = at[g : g + _C_SELECT]
            wanted = tuple(
                (acc.steps[i].model + 1, acc.steps[i].threshold, acc.steps[i].r - acc.seen.get(i, 0)) for i in group
            )
            for i, (here, pos) in zip(group, kernel.key_ties(streams, wanted, pairwise.c_threads())):
                if pos >= 0:
                    acc.steps[i] = Cut(acc.steps[i].threshold, c.start + pos)
                acc.seen[i] = acc.seen.get(i, 0) + here
        return True

    def so_far(self, acc: Any, p: TensorParams, stats: Stats) -> dict[str, Any]:
        """The cuts for the chunks folded so far: where the r-th tie is not among them yet, every
        tie in them is kept."""
        return {self.name: tuple(Cut(s.threshold, ALL_TIES) if isinstance(s, _Tie) else s for s in acc.steps)}

    def finish(self, acc: Any, p: TensorParams, stats: Stats) -> dict[str, Any]:
        assert all(isinstance(s, Cut) for s in acc.steps), "a tie count did not reach r"
        return {self.name: tuple(acc.steps)}


def keyed_topk_reducers(name: str, keys_of: KeysOf, k_of: Callable[[int], int]) -> tuple[Reducer, Reducer, Reducer]:
    """The three passes of one selection over other keys: `keys_of(base, models)[0]` (int32 >= 0,
    ordered as the values they stand for), keeping k = `k_of(number of non-zero keys)` (SCE's
    top-k of the variance across models, mergekit's k of the non-zero variances). Puts
    `stats[name]`: a one-`Cut` tuple."""
    passes = (_CountedHighPass(name), _LowPass(name), _TiePass(name))
    for r in passes:
        r.keys_of = keys_of
    passes[0].k_of = k_of
    return passes


class _CountedHighPass(_HighPass):
    """Pass 1 of `keyed_topk_reducers`: the high-bits histogram, and the count of zero keys that k needs."""

    def __init__(self, name: str) -> None:
        super().__init__(name, lambda p, numel: [(0, 1)])
        self.k_of: Callable[[int], int] = lambda nonzero: nonzero

    def start(self, p: TensorParams, stats: Stats, numel: int) -> Any:
        return _Acc([(0, 1)], numel=numel)  # k is known only at the end: histogram selection 0

    def chunk(
        self, acc: Any, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
    ) -> None:
        key = self.keys_of(base, models)[0]
        acc.zeros += int((key == 0).sum())
        _hist(acc.hists, 0, _HIGH_BINS, key.device).add_(_counts(key, -1))

    def finish(self, acc: Any, p: TensorParams, stats: Stats) -> dict[str, Any]:
        k = self.k_of(acc.numel - acc.zeros)
        step: _Step = (
            Cut.nothing() if k <= 0 else Cut.everything() if k >= acc.numel else _Bucket(0, k, *_pick(acc.hists[0], k))
        )
        return {f"{self.name}/1": [step]}
