"""Synthetic model families in the benchmark cache, and one measured merge of a family per tool.

A family (base + N fine-tunes of one preset) is generated once by `tools.make_synthetic` into
`CACHE/<preset>-n<N>-<dtype>/` and reused: the big presets take minutes and tens of GB. A
`.complete` marker is written last, so an interrupted generation is redone, not trusted.
Merge outputs go to a scratch folder inside the cache (same disk) and are deleted right after
each run, because a 70B-layer output is another 6 GB.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.common import GB, Params, run_leanmerge, run_mergekit, run_naive, scratch_dir
from bench.naive_merge import EXTRA_COPIES as NAIVE_EXTRA_COPIES
from bench.naive_merge import METHODS as NAIVE_METHODS

DISK_MARGIN = 10 * GB  # left free on the cache's disk for everyone else
NAIVE_RAM_SHARE = 0.8  # of the available RAM a naive run may be predicted to need
TORCH_RSS = 400 << 20  # interpreter + torch + allocator slack of a naive run
MARKER = ".complete"
TOOLS = ("leanmerge", "naive", "mergekit")


@dataclass(frozen=True)
class Family:
    """A base and its fine-tunes on disk, with the sizes the guards and figures need."""

    preset: str
    base: Path
    models: tuple[Path, ...]
    input_bytes: int  # tensor bytes of base + models: what a merge reads
    model_bytes: int  # tensor bytes of one model: what a merge writes
    largest_tensor: int  # elements of the largest tensor: what a whole-tensor merge holds

    @property
    def folders(self) -> list[Path]:
        return [self.base, *self.models]

    @property
    def files(self) -> list[Path]:
        """The safetensors shards of every member, the bytes a merge reads."""
        return sorted(f for d in self.folders for f in d.glob("*.safetensors"))


def preset_sizes(preset: str, dtype: str = "bf16") -> tuple[int, int]:
    """(bytes of one model, elements of its largest tensor), from the preset's shapes alone."""
    from tools.make_synthetic import DTYPES, PRESETS, llama_tensors

    elems = [math.prod(s) for _, s in llama_tensors(PRESETS[preset])]
    return sum(elems) * DTYPES[dtype][0].itemsize, max(elems)


def family_dir(cache: Path, preset: str, n_models: int, dtype: str) -> Path:
    return cache / f"{preset}-n{n_models}-{dtype}"


def disk_needed(cache: Path, preset: str, n_models: int = 3, dtype: str = "bf16") -> int:
    """Bytes a benchmark of this family still needs on disk: the family unless cached, plus one output."""
    model_bytes, _ = preset_sizes(preset, dtype)
    cached = (family_dir(cache, preset, n_models, dtype) / MARKER).exists()
    return (0 if cached else (n_models + 1) * model_bytes) + model_bytes


def fits_on_disk(cache: Path, preset: str, n_models: int = 3, dtype: str = "bf16") -> tuple[bool, str]:
    """Whether the family and one output fit in free disk minus `DISK_MARGIN`; and why not."""
    probe = cache if cache.exists() else cache.parent
    free = shutil.disk_usage(probe).free
    need = disk_needed(cache, preset, n_models, dtype)
    ok = need <= free - DISK_MARGIN
    return (
        ok,
        "" if ok else f"needs {need / GB:.1f} GB of disk, {free / GB:.1f} GB free (keeping {DISK_MARGIN / GB:.0f} GB)",
    )


def ensure_family(cache: Path, preset: str, n_models: int = 3, dtype: str = "bf16") -> Family:
    """The cached family, generated first when missing or incomplete."""
    from tools.make_synthetic import PRESETS, make_family

    folder = family_dir(cache, preset, n_models, dtype)
    names = ["base", *(f"ft{k}" for k in range(1, n_models + 1))]
    if not (folder / MARKER).exists():
        shutil.rmtree(folder, ignore_errors=True)
        make_family(folder, PRESETS[preset], n_models=n_models, dtype=dtype)
        (folder / MARKER).touch()
    model_bytes, largest = preset_sizes(preset, dtype)
    base, *models = (folder / n for n in names)
    return Family(preset, base, tuple(models), model_bytes * (n_models + 1), model_bytes, largest)


def naive_peak_estimate(family: Family, method: str) -> int:
    """What the whole-tensor baseline needs: the output model kept whole, float32 copies of the
    largest tensor (one per model plus the method's temporaries), and torch itself."""
    copies = len(family.models) + NAIVE_EXTRA_COPIES.get(method, max(NAIVE_EXTRA_COPIES.values()))
    return int(family.model_bytes + family.largest_tensor * 4 * copies + TORCH_RSS)


def naive_fits(family: Family, method: str) -> tuple[bool, str]:
    """Whether the naive baseline would fit in RAM now; running it anyway could OOM the box."""
    need, avail = naive_peak_estimate(family, method), psutil.virtual_memory().available
    ok = need <= NAIVE_RAM_SHARE * avail
    return ok, "" if ok else f"would need ~{need / GB:.1f} GB of RAM, {avail / GB:.1f} GB available"


def method_params(method: str) -> dict[str, float]:
    """Flags every tool gets for `method`: density 0.5 where the method has a density."""
    from engine.methods.registry import METHODS

    impl = METHODS.get(method)
    return {"density": 0.5} if impl is not None and impl.param("density") is not None else {}


def method_models(family: Family, method: str) -> tuple[Path, ...]:
    """The fine-tunes `method` is given: all of them, or the first `max_models` (slerp takes one,
    passthrough none)."""
    from engine.methods.registry import METHODS

    most = getattr(METHODS.get(method), "max_models", None)
    return family.models if most is None else family.models[:most]


def input_bytes(family: Family, method: str) -> int:
    """Bytes a merge of `family` by `method` reads: the models it is given, and the base unless
    the method ignores its values (linear)."""
    from engine.methods.registry import METHODS

    reads_base = getattr(METHODS.get(method), "uses_base", True)
    return family.model_bytes * (reads_base + len(method_models(family, method)))


def leanmerge_args(family: Family, method: str, budget: int, out: Path, io: str = "direct") -> list[str]:
    """`leanmerge merge` arguments for `family`, every fine-tune the method takes with weight 1."""
    models = method_models(family, method)
    args = ["--base", str(family.base), *(a for m in models for a in ("--model", str(m)))]
    args += ["--method", method, "--max-memory", str(budget), "-o", str(out)]
    args += ["--buffered-io"] if io == "buffered" else []
    return args + [a for k, v in method_params(method).items() for a in (f"--{k}", str(v))]


def run_tool(
    tool: str,
    family: Family,
    method: str,
    outputs: Path,
    budget: int | None = None,
    io: str = "direct",
) -> dict[str, Any] | None:
    """One measured merge of `family` by `tool` into a scratch folder under `outputs`, deleted
    afterwards.

    `budget` and `io` are leanmerge's `--max-memory` and `--direct-io` (io "direct") or
    `--buffered-io` (io "buffered").
    Returns None when the tool is not installed (mergekit) or does not know `method` (naive).
    """
    work = scratch_dir(outputs)
    out = work / "merged"
    try:
        if tool == "leanmerge":
            if budget is None:
                raise ValueError("leanmerge runs need a budget")
            return run_leanmerge(leanmerge_args(family, method, budget, out, io), work / "events.jsonl")
        runner: Callable[..., dict[str, Any] | None] = run_naive if tool == "naive" else run_mergekit
        if tool == "naive" and method not in NAIVE_METHODS:
            return None
        params: Params = {**method_params(method), "seed": 0} if tool == "naive" else method_params(method)
        return runner(method, family.base, method_models(family, method), out, params)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):  # the last run out leaves no empty folder behind
            work.parent.rmdir()
