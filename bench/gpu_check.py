"""`python -m bench.gpu_check`: one run on a lent GPU machine, under five minutes, that answers
two questions: does `--device cuda` write the same bytes as `--device cpu`, and how fast is it.

1. Equality: every registered method that merges fine-tunes (passthrough does not) merges a small
   family (`--equal-preset`, default small) once on `--device-a` and once on `--device-b` with
   the same seed; each output tensor is compared by sha256 and, where it differs, by the count of
   differing elements and the largest distance in units in the last place of its dtype.
2. Timing: `--time-methods` on a bigger family (`--time-preset`, default llama1b-embed, 5.18 GB)
   on both devices, cold (inputs dropped from the page cache, read with O_DIRECT) and warm
   (inputs cached, `--buffered-io`), beside the disk's cold read limit and the pinned
   host<->device copy speed. Runs that would end past `--budget-s` are skipped and listed, so
   a machine lent for minutes always gets its JSON (also written after each phase and run).

Every merge is `leanmerge merge` in a fresh process under the lean launcher (bench.common), so
its wall time and peak RSS are its own; the engine's report adds the device it ran on and its
peak GPU memory. `--device-a cpu --device-b cpu` runs the whole check on a machine without a GPU
(the test does, on the tiny preset).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import psutil

from bench.common import (
    BENCH,
    GB,
    RunFailed,
    drop_from_page_cache,
    git_commit,
    last_event,
    machine_info,
    read_limit,
    run_leanmerge,
    stats,
    warm_page_cache,
)
from bench.families import (
    MARKER,
    Family,
    ensure_family,
    family_dir,
    fits_on_disk,
    input_bytes,
    leanmerge_args,
    preset_sizes,
)
from bench.report import fmt_bytes, fmt_size
from bench.sections import WARM_RAM_SHARE, figures, mergeable

# The elementwise methods (issue 7's target) and one of each statistics kind; those whose GPU
# path changed after the last GPU run first, so that a short budget still times them.
TIME_METHODS = ("dare_ties", "ties", "model_stock", "linear", "task_arithmetic", "dare_linear")
CACHES = ("cold", "warm")
SEED = 0
COPY_BYTES = 256 << 20  # per direction: large enough that launch latency is noise
COPY_REPEATS = 5
# Conservative speeds that forecast the timing family's setup, so it is skipped, not overrun:
# tools.make_synthetic writes ~0.19 GB/s on 2 cores (more with more), a cold read >= 1 GB/s.
GENERATE_BPS = 0.2 * GB
READ_BPS = 1.0 * GB
# Same-width signed ints for the float dtypes the engine writes: their bit patterns, read as
# sign-magnitude integers, are ordered like the floats, so a difference counts ulps.
ORDERED_INT_BITS = {"bfloat16": 16, "float16": 16, "float32": 32}


@dataclass(frozen=True)
class Check:
    """Everything one check run does, from the flags."""

    cache: Path
    scratch: Path
    out: Path
    device_a: str = "cpu"
    device_b: str = "cuda"
    equal_preset: str = "small"
    equal_methods: tuple[str, ...] | None = None  # None: every registered method
    time_preset: str = "llama1b-embed"
    time_methods: tuple[str, ...] = TIME_METHODS
    caches: tuple[str, ...] = CACHES
    repeats: int = 1
    budget_s: float = 270.0
    max_memory: int = 1 << 30
    max_gpu_memory: int | None = None
    n_models: int = 3
    dtype: str = "bf16"
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if not self.caches or set(self.caches) - set(CACHES):
            raise ValueError(f"caches must be among {', '.join(CACHES)}, got {self.caches}")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def device_args(self, device: str) -> list[str]:
        """The flags that pick the device; the seed is explicit so both devices draw the same masks."""
        gpu = ["--max-gpu-memory", str(self.max_gpu_memory)] if self.max_gpu_memory and device != "cpu" else []
        return ["--device", device, "--seed", str(SEED), *gpu]


def say(check: Check, text: str) -> None:
    """A progress line with the seconds since the start: the log of a run that gets killed."""
    print(f"[{check.elapsed():6.1f}s] {text}", flush=True)


def one_merge(
    check: Check, family: Family, method: str, device: str, out: Path, io: str = "direct", extra: Sequence[str] = ()
) -> dict[str, Any]:
    """One measured `leanmerge merge` of `family` by `method` on `device` into `out`.

    Raises:
        RunFailed: the merge exited non-zero.
    """
    args = leanmerge_args(family, method, check.max_memory, out, io=io) + check.device_args(device) + list(extra)
    log = out.parent / f"{out.name}.events.jsonl"
    return {**run_leanmerge(args, log), "device_event": last_event(log, "device")}


# ----------------------------------------------------------------------------- equality


def int_view(t: Any) -> Any:
    """The float tensor's bits as same-width signed ints, flat."""
    import torch

    width = ORDERED_INT_BITS[str(t.dtype).removeprefix("torch.")]
    return t.contiguous().reshape(-1).view({16: torch.int16, 32: torch.int32}[width])


def ordered_bits(t: Any) -> Any:
    """The float tensor's bit patterns as int64 keys ordered like the values (+0 and -0 both map
    to 0), so `|key_a - key_b|` is the distance in ulps of its dtype."""
    import torch

    width = t.element_size() * 8
    bits = int_view(t).to(torch.int64)
    magnitude = bits & ((1 << (width - 1)) - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def tensor_digest(t: Any) -> str:
    """sha256 of the tensor's raw bytes (dtype and shape are compared separately)."""
    import torch

    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def compare_tensor(a: Any, b: Any) -> dict[str, Any]:
    """sha256 equality; when unequal, how many elements differ bitwise and by how many ulps at most."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        why = f"{a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        return {"equal": False, "elements_differing": a.numel(), "max_ulp": None, "why": why}
    if tensor_digest(a) == tensor_digest(b):
        return {"equal": True, "elements_differing": 0, "max_ulp": 0}
    if str(a.dtype).removeprefix("torch.") not in ORDERED_INT_BITS:  # an integer or exotic tensor
        return {"equal": False, "elements_differing": int(torch.ne(a, b).sum()), "max_ulp": None}
    differing = int(torch.ne(int_view(a), int_view(b)).sum())  # bitwise: counts NaN payloads and -0 too
    return {
        "equal": False,
        "elements_differing": differing,
        "max_ulp": int((ordered_bits(a) - ordered_bits(b)).abs().max()),
    }


def read_outputs(folder: Path) -> dict[str, Any]:
    """Every tensor of an output folder, from all its shards (safetensors only: nothing is unpickled)."""
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out |= load_file(str(shard))
    return out


def compare_outputs(a: Path, b: Path) -> dict[str, Any]:
    """Per output: tensors, how many are equal, elements differing, the largest ulp distance and
    the worst few tensors by name (the first place to look when a kernel rounds differently)."""
    ta, tb = read_outputs(a), read_outputs(b)
    rows = {n: compare_tensor(ta[n], tb[n]) for n in sorted(set(ta) & set(tb))}
    ulps = [r["max_ulp"] for r in rows.values() if r["max_ulp"] is not None]
    unequal = sorted((n for n, r in rows.items() if not r["equal"]), key=lambda n: -(rows[n]["max_ulp"] or 0))
    only = sorted(set(ta) ^ set(tb))
    return {
        "tensors": len(set(ta) | set(tb)),
        "tensors_equal": sum(r["equal"] for r in rows.values()),
        "elements": sum(t.numel() for t in ta.values()),
        "elements_differing": sum(r["elements_differing"] for r in rows.values()),
        "max_ulp": max(ulps, default=0) if all(r["max_ulp"] is not None for r in rows.values()) else None,
        "equal": not only and len(unequal) == 0,
        "only_in_one": only,
        "worst": {n: rows[n] for n in unequal[:5]},
    }


def equality(check: Check, write: Callable[[], None]) -> dict[str, Any]:
    """Merge the small family with every method on both devices and compare the outputs."""
    from engine.methods.registry import METHODS

    fam = ensure_family(check.cache, check.equal_preset, check.n_models, check.dtype)
    skipped: list[dict[str, Any]] = []
    methods = mergeable(fam, [m for m in check.equal_methods or sorted(METHODS) if m in METHODS], skipped)
    section: dict[str, Any] = {"preset": fam.preset, "input_bytes": fam.input_bytes, "seed": SEED, "runs": []}
    section["skipped"] = skipped
    for method in methods:
        section["runs"].append(equal_run(check, fam, method))
        write()
    return section


def uneven_args(method: str) -> list[str]:
    """Parameters whose divisions are inexact (density 0.3, weights summing to 2.1, normalized):
    a device that divides by a reciprocal instead of the divisor would show here, not with 0.5
    and weights of 1."""
    from engine.methods.registry import METHODS

    impl = METHODS[method]
    args = [a for name, v in (("density", "0.3"), ("weight", "0.7")) if impl.param(name) for a in (f"--{name}", v)]
    return args + (["--normalize"] if impl.param("normalize") else [])


def equal_run(check: Check, fam: Family, method: str) -> dict[str, Any]:
    """One method's two merges and their comparison; a failed merge is an entry with an `error`."""
    work = Path(tempfile.mkdtemp(prefix=f"eq-{method}-", dir=check.scratch))
    entry: dict[str, Any] = {"method": method, "devices": [check.device_a, check.device_b]}
    try:
        extra = uneven_args(method)
        entry["args"] = extra
        runs = [
            one_merge(check, fam, method, d, work / f"out-{k}", extra=extra) for k, d in enumerate(entry["devices"])
        ]
        reports = [r.get("report") or {} for r in runs]
        entry |= {
            "reported_devices": [r.get("device") for r in reports],
            "wall_s": [r["wall_s"] for r in runs],
            "peak_gpu_memory": [r.get("peak_gpu_memory") for r in reports],
            **compare_outputs(work / "out-0", work / "out-1"),
        }
    except RunFailed as e:
        entry["error"] = str(e)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    verdict = "error" if "error" in entry else "equal" if entry["equal"] else f"DIFFERS, max {entry['max_ulp']} ulp"
    say(check, f"equality {method}: {check.device_a} vs {check.device_b}: {verdict}")
    return entry


# ------------------------------------------------------------------------------- timing


def copy_speeds(device: str) -> dict[str, Any]:
    """Pinned host <-> `device` copy speed in GB/s, both directions (null on the CPU).

    Into preallocated buffers (`copy_(non_blocking=True)`, then synchronize), so the figure is the
    link's and not the allocator's; the engine's staging copies are of this kind.
    """
    if device == "cpu":
        return {"h2d_gbps": None, "d2h_gbps": None, "bytes": COPY_BYTES}
    import torch

    if not torch.cuda.is_available():
        return {"h2d_gbps": None, "d2h_gbps": None, "bytes": COPY_BYTES, "error": "torch.cuda is not available"}
    host = torch.ones(COPY_BYTES, dtype=torch.uint8).pin_memory()
    dev = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)

    def timed(dst: Any, src: Any) -> float:
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        return COPY_BYTES / (time.perf_counter() - t0) / GB

    for dst, src in ((dev, host), (host, dev)):  # first touch: context, page tables
        timed(dst, src)
    out = {
        "h2d_gbps": stats([timed(dev, host) for _ in range(COPY_REPEATS)]),
        "d2h_gbps": stats([timed(host, dev) for _ in range(COPY_REPEATS)]),
        "bytes": COPY_BYTES,
    }
    del host, dev
    torch.cuda.empty_cache()  # the merges run in other processes: leave them the device's memory
    return out


def timed_entry(check: Check, fam: Family, method: str, device: str, cache: str) -> dict[str, Any]:
    """`check.repeats` merges, each after putting the inputs in the `cache` state; figures as stats."""
    io = "buffered" if cache == "warm" else "direct"  # direct reads bypass the cache: warm would be cold
    entry: dict[str, Any] = {"method": method, "device": device, "cache": cache, "io": io}
    entry["input_bytes"] = nbytes = input_bytes(fam, method)
    results = []
    try:
        for _ in range(check.repeats):
            if cache == "cold":
                drop_from_page_cache(fam.folders)
            else:
                warm_page_cache(fam.files)
            work = Path(tempfile.mkdtemp(prefix=f"t-{method}-", dir=check.scratch))
            try:
                results.append(one_merge(check, fam, method, device, work / "out", io))
            finally:
                shutil.rmtree(work, ignore_errors=True)
    except RunFailed as e:
        return {**entry, "error": str(e)}
    reports = [r.get("report") or {} for r in results]
    gpu = [r["peak_gpu_memory"] for r in reports if r.get("peak_gpu_memory") is not None]
    entry |= figures(results, nbytes)
    entry["reported_device"] = sorted({str(r.get("device")) for r in reports})
    entry["peak_gpu_memory"] = stats(gpu) if gpu else None
    entry["predicted_peak_gpu_memory"] = reports[-1].get("predicted_peak_gpu_memory")
    entry["host_buffers"] = results[-1].get("device_event")  # pinned / not_pinned counts on CUDA
    return entry


def timing_family(check: Check, skip: list[dict[str, Any]]) -> Family | None:
    """The timing family, generated unless cached; None (all listed as skipped) when it would not
    fit on disk or the time budget is already spent."""
    ok, why = fits_on_disk(check.cache, check.time_preset, check.n_models, check.dtype)
    family_bytes = preset_sizes(check.time_preset, check.dtype)[0] * (check.n_models + 1)
    cached = (family_dir(check.cache, check.time_preset, check.n_models, check.dtype) / MARKER).exists()
    setup_s = family_bytes * (0 if cached else 1 / GENERATE_BPS) + 2 * family_bytes / READ_BPS  # + read_limit
    if ok and check.elapsed() + setup_s < check.budget_s:
        say(check, f"timing family {check.time_preset} ({'cached' if cached else 'generating'})")
        return ensure_family(check.cache, check.time_preset, check.n_models, check.dtype)
    why = why or f"time budget: {check.elapsed():.0f} s spent of {check.budget_s:.0f}, ~{setup_s:.0f} s to set up"
    skip += [{"method": m, "reason": why} for m in check.time_methods]
    return None


def timing(check: Check, write: Callable[[], None]) -> dict[str, Any]:
    """Each time method on device B then A, cold then warm, while the time budget lasts.

    Methods go in the outer loop so that a budget running out leaves whole device pairs, not
    every method on one device and none on the other.
    """
    section: dict[str, Any] = {"preset": check.time_preset, "runs": [], "skipped": []}
    skip = section["skipped"]
    if (fam := timing_family(check, skip)) is None:
        return section
    section["input_bytes"] = fam.input_bytes
    section["read_limit_gbps"] = read_limit(fam.files)
    say(check, f"cold read limit {section['read_limit_gbps']:.2f} GB/s over {fmt_size(fam.input_bytes)}")
    caches = list(check.caches)
    if "warm" in caches and fam.input_bytes > WARM_RAM_SHARE * psutil.virtual_memory().available:
        caches.remove("warm")
        skip.append({"method": "all", "cache": "warm", "reason": "inputs larger than the page cache can hold"})
    took: dict[tuple[str, str], float] = {}  # the last step's seconds per (device, cache): the next one's forecast
    for method in mergeable(fam, list(check.time_methods), skip):
        for cache in caches:
            for device in dict.fromkeys((check.device_b, check.device_a)):
                left, where = check.budget_s - check.elapsed(), {"method": method, "device": device, "cache": cache}
                if took.get((device, cache), max(took.values(), default=0.0)) > left:  # a first step: the slowest
                    skip.append({**where, "reason": f"time budget ({left:.0f} s left)"})
                    continue
                t0 = time.perf_counter()
                section["runs"].append(e := timed_entry(check, fam, method, device, cache))
                took[(device, cache)] = time.perf_counter() - t0
                figure = "error" if "error" in e else f"{e['gbps']['median']:.2f} GB/s"
                say(check, f"timing {method} {device} {cache}: {figure}")
                write()
    return section


# ------------------------------------------------------------------------------- output


def median_of(e: dict[str, Any] | None, key: str) -> float | None:
    fig = (e or {}).get(key)
    return float(fig["median"]) if isinstance(fig, dict) else None


def equality_lines(sec: dict[str, Any]) -> list[str]:
    lines = [
        f"equality, {sec['preset']} family ({fmt_size(sec['input_bytes'])}), seed {sec['seed']}",
        f"{'method':<18}{'tensors':>8}{'equal':>7}{'elem differ':>13}{'max ulp':>9}  devices reported",
    ]
    for r in sec["runs"]:
        if "error" in r:
            lines.append(f"{r['method']:<18}error: {r['error'].splitlines()[-1][:90]}")
            continue
        ulp = "-" if r["max_ulp"] is None else str(r["max_ulp"])
        lines.append(
            f"{r['method']:<18}{r['tensors']:>8}{r['tensors_equal']:>7}{r['elements_differing']:>13}{ulp:>9}"
            f"  {' / '.join(str(d) for d in r['reported_devices'])}"
        )
    return lines + [f"skipped {s['method']}: {s['reason']}" for s in sec["skipped"]]


def timing_lines(sec: dict[str, Any]) -> list[str]:
    limit = sec.get("read_limit_gbps")
    lines = [
        f"timing, {sec['preset']} family ({fmt_size(sec.get('input_bytes', 0))}), cold read limit "
        + (f"{limit:.2f} GB/s" if limit else "-")
        + " (medians; wall s: the engine's, GB/s over it; proc s: the whole process)",
        f"{'method':<18}{'device':<8}{'cache':<6}{'wall s':>8}{'proc s':>8}{'GB/s':>7}{'peak RSS':>11}{'peak GPU':>11}"
        "  ran on",
    ]
    for r in sec["runs"]:
        head = f"{r['method']:<18}{r['device']:<8}{r['cache']:<6}"
        if "error" in r:
            lines.append(head + f"error: {r['error'].splitlines()[-1][:80]}")
            continue
        gpu = median_of(r, "peak_gpu_memory")
        lines.append(
            head + f"{median_of(r, 'wall_s') or 0:>8.2f}{median_of(r, 'wall_s_process') or 0:>8.2f}"
            f"{median_of(r, 'gbps') or 0:>7.2f}"
            f"{fmt_bytes(median_of(r, 'peak_rss') or 0):>11}{'-' if gpu is None else fmt_bytes(gpu):>11}"
            f"  {','.join(r['reported_device'])}"
        )
    lines += [
        f"skipped {s['method']} {s.get('device', '')} {s.get('cache', '')}: {s['reason']}" for s in sec["skipped"]
    ]
    return lines


def text_table(res: dict[str, Any]) -> str:
    """One screen: machine line, equality table, copy speeds, timing table, verdict."""
    m = res["machine"]
    copy = res.get("copy") or {}
    link = " ".join(f"{k} {v['median']:.1f} GB/s" for k in ("h2d_gbps", "d2h_gbps") if (v := copy.get(k)))
    lines = [
        f"leanmerge gpu check, {m['timestamp']}, {res.get('total_wall_s', 0):.0f} s"
        + (f", PARTIAL ({res['unfinished']} not done)" if res.get("unfinished") else ""),
        f"{m['cpu']} | {m['cores']} cores | RAM {fmt_bytes(m['ram_total'])} | {res['gpu'] or 'no GPU'} | "
        f"torch {res['torch']} | {(res['commit'] or '?')[:10]}",
    ]
    if "equality" in res:
        lines += ["", *equality_lines(res["equality"])]
    lines += ["", f"pinned copy {res['devices'][1]}: {link or '-'}"]
    if "timing" in res:
        lines += ["", *timing_lines(res["timing"])]
    if "all_equal" in res:
        bad = [
            r["method"] + (" (error)" if "error" in r else "") for r in res["equality"]["runs"] if not r.get("equal")
        ]
        lines += [
            "",
            "ALL EQUAL" if res["all_equal"] else f"NOT ALL EQUAL: {', '.join(bad)} (the JSON has the worst tensors)",
        ]
    return "\n".join(lines)


def write_json(path: Path, res: dict[str, Any]) -> None:
    """Replace `path` whole, so a run killed mid-write keeps the previous version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, path)


def run_check(check: Check) -> dict[str, Any]:
    """Equality, copy speed, then timing; the JSON is rewritten after every step."""
    import torch

    try:  # an absent device is the merges' error to report, with the engine's words
        gpu = (
            torch.cuda.get_device_name(check.device_b)
            if torch.cuda.is_available() and check.device_b != "cpu"
            else None
        )
    except (RuntimeError, AssertionError, ValueError):
        gpu = None
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(check).items() if k != "started"}
    res: dict[str, Any] = {"machine": machine_info(check.cache), "commit": git_commit(BENCH.parent)[0]}
    res |= {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": gpu, "settings": settings}
    res |= {"devices": [check.device_a, check.device_b], "unfinished": "equality"}

    def write() -> None:
        res["total_wall_s"] = check.elapsed()
        write_json(check.out, res)

    say(check, f"equality on {check.equal_preset}: {check.device_a} vs {check.device_b}")
    res["equality"] = equality(check, write)
    res["all_equal"] = all(r.get("equal", False) for r in res["equality"]["runs"])
    res["unfinished"] = "timing"
    try:
        res["copy"] = copy_speeds(check.device_b)
    except RuntimeError as e:  # a CUDA error here must not cost the equality results or the timing
        res["copy"] = {"h2d_gbps": None, "d2h_gbps": None, "error": str(e)}
    write()
    res["timing"] = timing(check, write)
    del res["unfinished"]
    write()
    return res


# ---------------------------------------------------------------------------------- CLI


def split_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    """A comma-separated flag as a tuple (None when not given)."""
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


def parse_size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    from engine.budget import parse_bytes

    try:
        return None if value is None else parse_bytes(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def check_names(presets: Sequence[str], methods: Sequence[str]) -> None:
    """Fail before any work on a preset or method name nobody registers."""
    from engine.methods.registry import METHODS
    from tools.make_synthetic import PRESETS

    if bad := [p for p in presets if p not in PRESETS]:
        raise click.BadParameter(f"unknown preset {bad[0]!r}; choose from {', '.join(PRESETS)}")
    if bad := [m for m in methods if m not in METHODS]:
        raise click.BadParameter(f"unknown method {bad[0]!r}; registered: {', '.join(METHODS)}")


PATH = click.Path(path_type=Path)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=PATH, help="JSON results [default: bench/results/gpu-<UTC timestamp>.json].")
@click.option("--cache", type=PATH, default=BENCH / "cache", show_default=True, help="Synthetic families (reused).")
@click.option("--scratch", type=PATH, help="Merge outputs, deleted after each [default: a temp dir in --cache/tmp].")
@click.option("--device-a", default="cpu", show_default=True, help="The reference device.")
@click.option("--device-b", default="cuda", show_default=True, help="The device checked against it.")
@click.option("--equal-preset", default="small", show_default=True, help="Family the equality runs merge.")
@click.option("--equal-methods", callback=split_list, help="Comma-separated [default: every registered method].")
@click.option("--time-preset", default="llama1b-embed", show_default=True, help="Family the timing runs merge.")
@click.option("--time-methods", callback=split_list, default=",".join(TIME_METHODS), show_default=True)
@click.option("--caches", callback=split_list, default=",".join(CACHES), show_default=True, help="cold, warm.")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True, help="Runs per timing figure.")
@click.option("--budget-s", type=float, default=270.0, show_default=True, help="Timing runs past this are skipped.")
@click.option("--max-memory", callback=parse_size, default="1GiB", show_default=True, help="leanmerge --max-memory.")
@click.option("--max-gpu-memory", callback=parse_size, help="leanmerge --max-gpu-memory for non-CPU runs.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True)
def main(out: Path | None, cache: Path, scratch: Path | None, **kw: Any) -> None:
    """Check that --device-b writes the bytes --device-a does, and time both, in one short run."""
    check_names((kw["equal_preset"], kw["time_preset"]), (*(kw["equal_methods"] or ()), *kw["time_methods"]))
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = out or BENCH / "results" / f"gpu-{stamp}.json"
    parent = scratch or cache / "tmp"  # the inputs' disk, gitignored, as bench.common.scratch_dir
    parent.mkdir(parents=True, exist_ok=True)
    try:
        check = Check(cache=cache, scratch=parent, out=out, **kw)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    work = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=parent))
    try:
        res = run_check(dataclasses.replace(check, scratch=work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):  # the default parent, when nothing else is in it
            (cache / "tmp").rmdir()
    click.echo(text_table(res))
    click.echo(f"\nwrote {out}")


if __name__ == "__main__":
    main()
