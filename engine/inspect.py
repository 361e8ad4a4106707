"""`leanmerge inspect`: what is in these model folders, and can they be merged?

Per folder: format (single file, sharded, or a PEFT LoRA adapter), shards, tensors, parameters,
dtypes and size, from the headers alone. Across folders (the first is the base): a homology
report (missing, extra, reshaped, retyped tensors; tensors that differ only in dim 0, which
`--vocab` can merge) and **delta statistics** from a bounded sample of rows of every float
tensor: mean |δ|, mean |θ_base|, their ratio and the fraction of elements that differ.

The sample is at most `SAMPLE_ELEMS` elements per tensor (or one row, if a row is larger), in
`SAMPLE_BANDS` evenly spaced bands of rows, so inspecting a 70B model reads a few hundred MB.

**Continued pre-training warning.** DARE (Yu et al., 2023, §4.4/§5) works because SFT deltas
are tiny (mostly |δ| < 0.002); for models trained much further from their base (e.g. CodeLlama
from Llama 2, |δ| around 0.01) dropping 90% of the delta destroys the model. We warn when, over
the sampled weight matrices (tensors with 2+ dims), mean |δ| > `ABS_DELTA_WARN` (0.005, the
paper's boundary) or mean |δ| / mean |θ_base| > `REL_DELTA_WARN` (0.1: SFT deltas are ~1% of the
weights, continued pre-training tens of %). Either suggests a low drop rate or plain task
arithmetic instead of DARE.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.budget import fmt_bytes
from engine.defaults import SAMPLE_ELEMS
from engine.dtypes import MERGEABLE
from engine.errors import CheckpointError
from engine.gradient import count_layers
from engine.io.checkpoint import INDEX_NAME, Checkpoint
from engine.io.header import TensorInfo
from engine.io.lora import LoraCheckpoint, open_model, open_reader
from engine.vocab import is_embedding_like

SAMPLE_BANDS = 4
ABS_DELTA_WARN = 0.005
REL_DELTA_WARN = 0.1
SHOW = 5


@dataclass(frozen=True)
class ModelInfo:
    """One folder, from its headers."""

    path: str
    format: str  # "single", "sharded" or "lora"
    shards: int
    tensors: int
    parameters: int
    bytes: int  # tensor bytes (for an adapter: the adapter's own)
    dtypes: dict[str, int]  # dtype -> tensor count
    layers: int
    lora: dict[str, Any] | None = None


@dataclass(frozen=True)
class TensorDelta:
    name: str
    mean_abs_delta: float
    mean_abs_base: float
    relative: float
    frac_changed: float
    sampled: int
    numel: int  # of the compared rows: the tensor's weight in the model's totals
    ndim: int


@dataclass
class Comparison:
    """One model against the base."""

    model: str
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    rows_differ: list[dict[str, Any]] = field(default_factory=list)  # dim 0 only: mergeable with --vocab
    shape_mismatches: list[dict[str, Any]] = field(default_factory=list)
    dtype_mismatches: list[dict[str, Any]] = field(default_factory=list)
    mean_abs_delta: float = 0.0
    mean_abs_base: float = 0.0
    relative: float = 0.0
    frac_changed: float = 0.0
    sampled: int = 0
    tensors: list[TensorDelta] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def homologous(self) -> bool:
        return not (self.missing or self.extra or self.shape_mismatches or self.dtype_mismatches)


@dataclass(frozen=True)
class Inspection:
    models: list[ModelInfo]
    comparisons: list[Comparison]

    def to_json(self) -> dict[str, Any]:
        return {
            "base": self.models[0].path if self.models else None,
            "models": [asdict(m) for m in self.models],
            "comparisons": [{**asdict(c), "homologous": c.homologous} for c in self.comparisons],
        }

    def not_homologous(self) -> str | None:
        """One line naming the models that cannot be merged with the base, or None."""
        bad = [c.model for c in self.comparisons if not c.homologous]
        if not bad:
            return None
        return f"not homologous with the base {self.models[0].path}: {', '.join(bad)} (see above); they cannot be merged with it"


def inspect(folders: Sequence[Path | str], *, sample_elems: int = SAMPLE_ELEMS) -> Inspection:
    """Describe `folders` and compare every one after the first with the first (the base).

    Args:
        folders: model folders or LoRA adapter folders; the first must be a full model when
            there are several (adapters are read against it).
        sample_elems: elements sampled per tensor for the delta statistics.
    Returns:
        An `Inspection`; `to_json()` gives the `--json` form.
    Raises:
        CheckpointError: a folder is missing or damaged.
    """
    paths = [Path(f) for f in folders]
    base = open_model(paths[0], None) if paths else None
    if isinstance(base, LoraCheckpoint) and len(paths) > 1:
        raise CheckpointError(f"{paths[0]}: the first folder is the base and must be a full model, not a LoRA adapter")
    ckpts = [base, *(open_model(p, base) for p in paths[1:])] if base is not None else []
    infos = [describe(c) for c in ckpts if c is not None]
    comparisons = []
    if base is not None:
        for c in ckpts[1:]:
            assert c is not None
            comparisons.append(compare(base, c, sample_elems))
    return Inspection(infos, comparisons)


def describe(c: Checkpoint) -> ModelInfo:
    """Format, counts, dtypes and size of one folder, from its headers."""
    if isinstance(c, LoraCheckpoint):
        own = list(c.adapter.tensors.values())
        return ModelInfo(
            path=str(c.folder),
            format="lora",
            shards=len(c.adapter.shards),
            tensors=len(own),
            parameters=sum(t.numel for t in own),
            bytes=sum(t.nbytes for t in own),
            dtypes=_dtype_counts(own),
            layers=count_layers(c.factors),
            lora=c.summary(),
        )
    infos = list(c.tensors.values())
    return ModelInfo(
        path=str(c.folder),
        format="sharded" if len(c.shards) > 1 or (c.folder / INDEX_NAME).is_file() else "single",
        shards=len(c.shards),
        tensors=len(infos),
        parameters=sum(t.numel for t in infos),
        bytes=sum(t.nbytes for t in infos),
        dtypes=_dtype_counts(infos),
        layers=count_layers(c.tensors),
    )


def _dtype_counts(infos: Sequence[TensorInfo]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in infos:
        out[t.dtype] = out.get(t.dtype, 0) + 1
    return dict(sorted(out.items()))


def compare(base: Checkpoint, model: Checkpoint, sample_elems: int = SAMPLE_ELEMS) -> Comparison:
    """Homology and sampled delta statistics of `model` against `base`."""
    cmp = Comparison(str(model.folder))
    cmp.missing = [n for n in base.tensors if n not in model.tensors]
    cmp.extra = [n for n in model.tensors if n not in base.tensors]
    common = []
    for name, b in base.tensors.items():
        m = model.tensors.get(name)
        if m is None:
            continue
        if m.shape != b.shape:
            entry = {"name": name, "shape": list(m.shape), "base_shape": list(b.shape)}
            rows_only = len(m.shape) == len(b.shape) >= 1 and m.shape[1:] == b.shape[1:]
            if rows_only and is_embedding_like(name) and m.dtype in MERGEABLE and b.dtype in MERGEABLE:
                cmp.rows_differ.append(entry)
                common.append((b, m))
            else:
                cmp.shape_mismatches.append(entry)
        elif m.dtype != b.dtype and not (m.dtype in MERGEABLE and b.dtype in MERGEABLE):
            cmp.dtype_mismatches.append({"name": name, "dtype": m.dtype, "base_dtype": b.dtype})
        elif b.dtype in MERGEABLE:
            common.append((b, m))
    with ExitStack() as stack:
        rb = stack.enter_context(open_reader(base))
        rm = stack.enter_context(open_reader(model))
        cmp.tensors = [_delta(rb, rm, b, m, sample_elems) for b, m in common if min(b.rows, m.rows) * b.row_numel]
    _summarize(cmp)
    return cmp


def sample_bands(rows: int, row_numel: int, budget: int) -> list[tuple[int, int]]:
    """Up to `SAMPLE_BANDS` evenly spaced row ranges holding at most `budget` elements in all
    (at least one row)."""
    if rows * row_numel <= budget:
        return [(0, rows)]
    bands = min(SAMPLE_BANDS, rows)
    per_band = max(1, budget // (bands * max(row_numel, 1)))
    starts = sorted({(rows - per_band) * i // max(bands - 1, 1) for i in range(bands)})
    return [(r, min(r + per_band, rows)) for r in starts]


def _delta(rb: Any, rm: Any, b: TensorInfo, m: TensorInfo, budget: int) -> TensorDelta:
    abs_d = abs_b = 0.0
    changed = n = 0
    for r0, r1 in sample_bands(min(b.rows, m.rows), b.row_numel, budget):
        xb = rb.read_rows(b.name, r0, r1).float()
        delta = rm.read_rows(m.name, r0, r1).float() - xb
        abs_d += float(delta.abs().double().sum())
        abs_b += float(xb.abs().double().sum())
        changed += int(torch.count_nonzero(delta))
        n += delta.numel()
    mean_d, mean_b = abs_d / max(n, 1), abs_b / max(n, 1)
    rel = mean_d / mean_b if mean_b else 0.0
    numel = min(b.rows, m.rows) * b.row_numel
    return TensorDelta(b.name, mean_d, mean_b, rel, changed / max(n, 1), n, numel, len(b.shape))


def _summarize(cmp: Comparison) -> None:
    """Totals over the weight matrices (2+ dims; norms and biases are small and near 1), each
    tensor's sampled means weighted by its element count."""
    mats = [t for t in cmp.tensors if t.ndim >= 2] or cmp.tensors
    total = sum(t.numel for t in mats)
    n = sum(t.sampled for t in mats)
    if total:
        cmp.mean_abs_delta = sum(t.mean_abs_delta * t.numel for t in mats) / total
        cmp.mean_abs_base = sum(t.mean_abs_base * t.numel for t in mats) / total
        cmp.relative = cmp.mean_abs_delta / cmp.mean_abs_base if cmp.mean_abs_base else 0.0
        cmp.frac_changed = sum(t.frac_changed * t.numel for t in mats) / total
        cmp.sampled = n
    if not cmp.homologous:
        cmp.warnings.append("not homologous with the base: it cannot be merged with it")
    if cmp.rows_differ:
        names = ", ".join(e["name"] for e in cmp.rows_differ[:SHOW])
        cmp.warnings.append(f"row counts differ (added tokens?) in {names}: merge with --vocab base or --vocab union")
    if n and cmp.frac_changed == 0.0:
        cmp.warnings.append("identical to the base in every sampled element")
    if cmp.mean_abs_delta > ABS_DELTA_WARN or cmp.relative > REL_DELTA_WARN:
        cmp.warnings.append(
            f"large deltas (mean |δ| {cmp.mean_abs_delta:.2g}, {cmp.relative:.1%} of mean |θ_base|): this looks like "
            f"continued pre-training, not fine-tuning; DARE degrades when |δ| > {ABS_DELTA_WARN} — prefer a high "
            "density or task_arithmetic"
        )


def format_inspection(ins: Inspection) -> str:
    """The text report of `leanmerge inspect`."""
    lines = [f"{'folder':<40} {'format':<8} {'shards':>6} {'tensors':>7} {'params':>12} {'size':>10}  dtypes"]
    for m in ins.models:
        dtypes = ", ".join(f"{d}×{k}" for d, k in m.dtypes.items())
        lines.append(
            f"{_short(m.path, 40):<40} {m.format:<8} {m.shards:>6} {m.tensors:>7} {m.parameters:>12,} "
            f"{fmt_bytes(m.bytes):>10}  {dtypes}"
        )
        if m.lora:
            lo = m.lora
            lines.append(
                f"    LoRA r={lo['r']} alpha={lo['alpha']} scaling={lo['scaling']:.4g}{' (rslora)' if lo['rslora'] else ''}"
                f", {lo['target_tensors']} target tensor(s): {', '.join(lo['target_modules'])}"
            )
    for c in ins.comparisons:
        lines += ["", f"{c.model} vs base {ins.models[0].path}:"]
        for label, items in (("missing", c.missing), ("extra", c.extra)):
            if items:
                lines.append(f"  {label} {len(items)}: {', '.join(items[:SHOW])}{' ...' if len(items) > SHOW else ''}")
        for label, entries in (("rows differ", c.rows_differ), ("shape differs", c.shape_mismatches)):
            for e in entries[:SHOW]:
                lines.append(f"  {label}: {e['name']} {e['shape']} vs base {e['base_shape']}")
        for e in c.dtype_mismatches[:SHOW]:
            lines.append(f"  dtype differs: {e['name']} {e['dtype']} vs base {e['base_dtype']}")
        if c.sampled:
            lines.append(
                f"  delta (sampled {c.sampled:,} elements of weight matrices): mean |δ| {c.mean_abs_delta:.3g}, "
                f"mean |θ_base| {c.mean_abs_base:.3g}, relative {c.relative:.2%}, changed {c.frac_changed:.1%}"
            )
            top = sorted(c.tensors, key=lambda t: -t.relative)[:SHOW]
            for t in top:
                lines.append(f"    {t.name:<48} |δ| {t.mean_abs_delta:.3g}  rel {t.relative:.2%}")
        lines += [f"  WARNING: {w}" for w in c.warnings]
    return "\n".join(lines)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]
