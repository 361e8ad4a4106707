"""`python -m bench.bench_threads`: warm CPU merge speed at 1, 2, 4, 8, 16 threads and the default,
in one short command for a lent many-core machine (issue 26: "speed never lower at more threads").

Every run is `leanmerge merge ... --device cpu --buffered-io --threads N` (or no `--threads`: the
default) in a fresh process under the lean launcher (bench.common), with the inputs read into
the page cache just before it, as gpu_check's warm mode does; the fraction of input pages
resident is then recorded (mincore), so a table from a machine short of RAM shows it. The output
goes to a scratch folder (RAM-backed /dev/shm where it fits) and is deleted after each run, once
its safetensors shards are hashed: every thread count must write the same bytes.

Repeats go round-robin (repeat, then method, then thread count), so drift on a shared machine
hits every count alike and a budget cut leaves whole passes. The JSON and the Markdown table are
rewritten after every run; runs that would end past `--budget-s` are skipped and listed. The
checks (never slower at more threads, same bytes, the issue's targets) are evaluated and
reported, never asserted: the table is the deliverable, whatever it says.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import hashlib
import importlib.util
import json
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from bench.common import BENCH, GB, READ_BUFFER, RunFailed, files_of, git_commit, machine_info, run_leanmerge, stats
from bench.common import warm_page_cache as warm_files
from bench.families import Family, ensure_family, fits_on_disk, input_bytes, leanmerge_args, preset_sizes
from bench.gpu_check import check_names, parse_size, split_list, write_json
from bench.report import fmt_size

METHODS = ("dare_ties", "ties", "task_arithmetic")
THREADS = (1, 2, 4, 8, 16)
DEFAULT = "default"  # the setting without --threads
TOLERANCE = 0.05  # a count may be this much slower than the one before it and still pass: run-to-run noise
TARGETS = {"dare_ties": 5.0, "ties": 2.5}  # GB/s of input at default threads, issue 26
Setting = int | str  # a thread count, or DEFAULT


@dataclass(frozen=True)
class Plan:
    """Everything one invocation does, from the flags."""

    cache: Path
    scratch: Path
    out: Path
    preset: str = "llama1b-embed"
    methods: tuple[str, ...] = METHODS
    threads: tuple[int, ...] = THREADS
    repeats: int = 3
    budget_s: float = 420.0
    run_timeout_s: float = 240.0  # one merge still running after this (or past the budget) is killed
    max_memory: int = 1 << 30
    tolerance: float = TOLERANCE
    n_models: int = 3
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def say(plan: Plan, text: str) -> None:
    """A progress line with the seconds since the start: the log of a run that gets cut."""
    print(f"[{plan.elapsed():6.1f}s] {text}", flush=True)


def settings_for(threads: Sequence[int], cores: int) -> tuple[list[Setting], list[dict[str, Any]]]:
    """The thread counts this process can use (ascending, then the default) and those skipped, with why:
    more threads than usable cores measure the scheduler's time slicing, not the engine."""
    kept = sorted({t for t in threads if t <= cores})
    skipped = [{"threads": t, "reason": f"only {cores} usable cores"} for t in sorted(set(threads) - set(kept))]
    return [*kept, DEFAULT], skipped


# ----------------------------------------------------------------------- inputs and outputs


def resident_fraction(files: Sequence[Path]) -> float | None:
    """Share of the files' pages in the page cache (mincore over a read-only mapping); None where
    libc cannot be called. Proves "inputs in RAM" instead of assuming it."""
    try:
        mincore = ctypes.CDLL(None).mincore
    except (OSError, AttributeError):
        return None
    low_bit = bytes(b & 1 for b in range(256))  # the other bits of mincore's vector are reserved
    resident = total = 0
    for f in (f for f in files if f.stat().st_size):
        with f.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) as mm:
            vec = ctypes.create_string_buffer((len(mm) + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
            anchor = ctypes.c_char.from_buffer(mm)  # a private mapping is writable, so it has an address
            ok = mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(len(mm)), vec) == 0
            del anchor  # the mapping cannot close while it is exported
        if not ok:
            return None
        resident += vec.raw.translate(low_bit).count(1)
        total += len(vec.raw)
    return resident / total if total else None


def warm(fam: Family) -> dict[str, Any]:
    """Read the inputs into the page cache (gpu_check's warm mode) and say how fast and how resident."""
    t0 = time.perf_counter()
    warm_files(fam.files)
    seconds = time.perf_counter() - t0
    return {"warm_read_gbps": fam.input_bytes / seconds / GB, "resident": resident_fraction(fam.files)}


def output_digest(folder: Path) -> str | None:
    """sha256 over the output's safetensors shards in name order (the other files name paths and
    flags, so they differ by design); None when the merge wrote none."""
    shards = sorted(f for f in files_of([folder]) if f.suffix == ".safetensors") if folder.exists() else []
    h, buffer = hashlib.sha256(), bytearray(READ_BUFFER)
    for f in shards:
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            while n := fh.readinto(buffer):
                h.update(memoryview(buffer)[:n])
    return h.hexdigest() if shards else None


def one_run(plan: Plan, fam: Family, method: str, setting: Setting, repeat: int) -> dict[str, Any]:
    """One warm merge in a fresh process; a crash is an entry with its exit code and stderr tail."""
    entry: dict[str, Any] = {"method": method, "threads": setting, "repeat": repeat, **warm(fam)}
    entry["loadavg_1m"] = os.getloadavg()[0]  # a busy machine skews the figure: say so per run
    work = Path(tempfile.mkdtemp(prefix=f"thr-{method}-", dir=plan.scratch))
    try:
        args = leanmerge_args(fam, method, plan.max_memory, work / "out", io="buffered") + ["--device", "cpu"]
        args += [] if setting == DEFAULT else ["--threads", str(setting)]
        nbytes = input_bytes(fam, method)
        try:
            timeout = min(plan.run_timeout_s, max(30.0, plan.budget_s - plan.elapsed()))  # a hang ends in time
            r = run_leanmerge(args, work / "events.jsonl", timeout)
        except RunFailed as e:
            failed = work / "leanmerge.measure.json"  # the launcher's figures survive a crashed merge
            figures = json.loads(failed.read_text()) if failed.exists() else {}
            rc = figures.get("returncode")
            signal = -rc if isinstance(rc, int) and rc < 0 else None
            entry |= {"error": str(e)[-2000:], "returncode": rc, "signal": signal}
            entry |= {k: figures[k] for k in ("wall_s", "cpu_s", "peak_rss") if k in figures}
            return entry
        engine_wall = (r.get("report") or {}).get("wall_s") or r["wall_s"]
        entry |= {"returncode": r["returncode"], "wall_s": engine_wall, "wall_s_process": r["wall_s"]}
        entry |= {"gbps": nbytes / engine_wall / GB, "cpu_s": r["cpu_s"], "peak_rss": r["peak_rss"]}
        entry["output_sha256"] = output_digest(work / "out")
        return entry
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------- checks


def scaling_check(medians: dict[int, float], tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Whether each thread count's median GB/s is >= the previous (smaller) count's times
    (1 - tolerance); the pairs that fail. Fewer than two counts: not evaluated (ok None)."""
    counts = sorted(medians)
    bad = [
        {"from": a, "to": b, "gbps": [medians[a], medians[b]]}
        for a, b in zip(counts, counts[1:])
        if medians[b] < medians[a] * (1 - tolerance)
    ]
    return {"ok": None if len(counts) < 2 else not bad, "tolerance": tolerance, "slower": bad}


def target_check(method: str, default_gbps: float | None) -> dict[str, Any] | None:
    """The issue's target for `method` at default threads as met / not met / not measured; None
    where the issue sets none."""
    if method not in TARGETS:
        return None
    want = TARGETS[method]
    verdict = "not measured" if default_gbps is None else "met" if default_gbps >= want else "not met"
    return {"target_gbps": want, "gbps": default_gbps, "verdict": verdict}


def summarize(runs: Sequence[dict[str, Any]], tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Per method: figures per setting as stats, the scaling, same-bytes and target checks, and
    the failed runs. A setting whose runs all failed has no figures but counts as a failure."""
    out: dict[str, Any] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        cells: dict[str, Any] = {}
        for setting in dict.fromkeys(r["threads"] for r in mine):
            good = [r for r in mine if r["threads"] == setting and "error" not in r]
            cells[str(setting)] = (
                {k: stats([r[k] for r in good]) for k in ("gbps", "wall_s", "cpu_s", "peak_rss")} if good else {}
            )
        medians = {int(s): c["gbps"]["median"] for s, c in cells.items() if s != DEFAULT and c}
        digests: dict[str, set[str | None]] = {}  # every repeat's, so a repeat that differs shows too
        for r in (r for r in mine if "error" not in r):
            digests.setdefault(str(r["threads"]), set()).add(r.get("output_sha256"))
        distinct = set().union(*digests.values())
        default = cells.get(DEFAULT, {}).get("gbps", {}).get("median")
        out[method] = {
            "cells": cells,
            "scaling": scaling_check(medians, tolerance),
            "same_bytes": {
                "ok": len(distinct) <= 1 and None not in distinct,
                "sha256": {k: sorted(map(str, v)) for k, v in digests.items()},
            },
            "target": target_check(method, default),
            "failed": [
                {"threads": r["threads"], "repeat": r["repeat"], "returncode": r.get("returncode")}
                for r in mine
                if "error" in r
            ],
        }
    return out


# ------------------------------------------------------------------------------- output


def ok_word(ok: bool | None) -> str:
    return "n/a" if ok is None else "yes" if ok else "**NO**"


def markdown(res: dict[str, Any]) -> str:
    """The README table: rows methods, columns thread counts then default, cells median GB/s of
    input (speedup over 1 thread), then the three checks."""
    m, fam = res["machine"], res.get("family", {})
    cols = [str(s) for s in res["settings_run"]]
    head = [f"{c} thr" if c != DEFAULT else f"default ({res['default_threads']})" for c in cols]
    lines = [
        f"Warm `--device cpu --buffered-io` merges, {fam.get('preset')} family (base + {fam.get('n_models')}, "
        f"{fmt_size(fam.get('input_bytes', 0))}), {m['cpu']}, {m['usable_cores']} usable cores, torch {m['torch']}, "
        f"C kernels {ok_word(res.get('c_extension'))}, commit {(res['commit'] or '?')[:10]}, {m['timestamp']}; "
        f"median GB/s of input over the engine's wall time of up to {res['plan']['repeats']} runs (speedup over "
        "1 thread)" + (" - PARTIAL" if res.get("unfinished") else ""),
        "",
        "| method | "
        + " | ".join(head)
        + f" | never slower (tol {res['plan']['tolerance']:.0%}) | same bytes | target |",
        "|---" * (len(cols) + 4) + "|",
    ]
    for method, s in res["summary"].items():
        one = s["cells"].get("1", {}).get("gbps", {}).get("median")
        row = []
        for c in cols:
            g = s["cells"].get(c, {}).get("gbps", {}).get("median")
            failed = any(str(f["threads"]) == c for f in s["failed"])
            row.append(
                ("-" if g is None else f"{g:.2f}" + (f" ({g / one:.1f}x)" if one else ""))
                + (" CRASH" if failed else "")
            )
        t = s["target"]
        target = "-" if t is None else f"{t['verdict']} (>= {t['target_gbps']} GB/s)"
        checks = [ok_word(s["scaling"]["ok"]), ok_word(s["same_bytes"]["ok"]), target]
        lines.append(f"| {method} | " + " | ".join(row + checks) + " |")
    lines += [""] + [f"- skipped {t['threads']} threads: {t['reason']}" for t in res["threads_skipped"]]
    if skipped := res["skipped"]:
        first = skipped[0]
        lines.append(
            f"- {len(skipped)} runs skipped, from {first['method']} {first['threads']} #{first['repeat']}: "
            + first["reason"]
        )
    for method, s in res["summary"].items():
        lines += [
            f"- {method}: {b['from']} -> {b['to']} threads: {b['gbps'][0]:.2f} -> {b['gbps'][1]:.2f} GB/s"
            for b in s["scaling"]["slower"]
        ]
        for f in s["failed"]:
            how = "killed at the timeout" if f["returncode"] is None else f"exit {f['returncode']}"
            lines.append(f"- {method}: {how} at {f['threads']} threads #{f['repeat']}")
        if not s["same_bytes"]["ok"]:
            lines.append(
                f"- {method}: outputs differ: "
                + ", ".join(f"{k}: {'/'.join(d[:12] for d in v)}" for k, v in s["same_bytes"]["sha256"].items())
            )
    return "\n".join(lines) + "\n"


def timed_runs(
    plan: Plan, fam: Family, settings: list[Setting], res: dict[str, Any], write: Callable[[], None]
) -> None:
    """Round-robin over repeats, methods and settings while the budget lasts; a run whose
    forecast (the last time of the same method and setting, else the slowest so far) would end
    past the budget is skipped and listed."""
    took: dict[tuple[str, Setting], float] = {}
    for repeat in range(plan.repeats):
        for method in plan.methods:
            for setting in settings:
                left = plan.budget_s - plan.elapsed()
                if took.get((method, setting), max(took.values(), default=0.0)) > left:
                    why = f"time budget ({left:.0f} s left)"
                    res["skipped"].append({"method": method, "threads": setting, "repeat": repeat, "reason": why})
                    continue
                t0 = time.perf_counter()
                res["runs"].append(e := one_run(plan, fam, method, setting, repeat))
                took[(method, setting)] = time.perf_counter() - t0
                figure = (
                    f"exit {e.get('returncode')}" if "error" in e else f"{e['gbps']:.2f} GB/s, {e['cpu_s']:.1f} CPU-s"
                )
                say(plan, f"{method} threads={setting} #{repeat}: {figure}, resident {e['resident']}")
                write()


def run_plan(plan: Plan) -> dict[str, Any]:
    """Family, then the runs; JSON and Markdown rewritten after each run."""
    from engine.cores import usable_cores

    cores = usable_cores()
    settings, threads_skipped = settings_for(plan.threads, cores)
    plan_json = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(plan).items() if k != "started"}
    res: dict[str, Any] = {"machine": machine_info(plan.cache), "commit": git_commit(BENCH.parent)[0]}
    res |= {"plan": plan_json, "usable_cores": cores, "default_threads": cores, "settings_run": settings}
    res |= {"threads_skipped": threads_skipped, "runs": [], "skipped": [], "unfinished": "family"}
    res["c_extension"] = importlib.util.find_spec("engine.stats._fused") is not None  # else the slow torch path

    def write() -> None:
        res["total_wall_s"] = plan.elapsed()
        res["summary"] = summarize(res["runs"], plan.tolerance)
        write_json(plan.out, res)
        plan.out.with_suffix(".md").write_text(markdown(res))

    ok, why = fits_on_disk(plan.cache, plan.preset, plan.n_models)
    if not ok:
        raise click.ClickException(f"the {plan.preset} family does not fit in {plan.cache}: {why}")
    say(plan, f"family {plan.preset} in {plan.cache}")
    t0 = time.perf_counter()
    fam = ensure_family(plan.cache, plan.preset, plan.n_models)
    res["family"] = {
        "preset": fam.preset,
        "n_models": plan.n_models,
        "input_bytes": fam.input_bytes,
        "setup_s": time.perf_counter() - t0,
    }
    res["unfinished"] = "runs"
    write()
    timed_runs(plan, fam, settings, res, write)
    del res["unfinished"]
    write()
    return res


def default_scratch(cache: Path, preset: str) -> Path:
    """/dev/shm when it has room for two outputs (RAM-backed: the write is not the disk's), else the cache's tmp."""
    shm = Path("/dev/shm")
    need = 2 * preset_sizes(preset)[0]
    return shm if shm.is_dir() and shutil.disk_usage(shm).free > need else cache / "tmp"


PATH = click.Path(path_type=Path)


def int_list(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    """`--threads 1,2,4` as counts >= 1."""
    try:
        counts = tuple(int(t) for t in split_list(ctx, param, value) or ())
    except ValueError:
        raise click.BadParameter(f"takes counts like 1,2,4, got {value!r}") from None
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"counts must be >= 1, got {value!r}")
    return counts


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=PATH, help="JSON, and the table beside it as .md [default: bench/results/threads-<UTC>].")
@click.option("--cache", type=PATH, default=BENCH / "cache", show_default=True, help="Synthetic families (reused).")
@click.option("--scratch", type=PATH, help="Merge outputs, deleted after each [default: /dev/shm if it has room].")
@click.option("--preset", default="llama1b-embed", show_default=True, help="Family merged: tiny, small, ...")
@click.option("--methods", callback=split_list, default=",".join(METHODS), show_default=True)
@click.option("--threads", callback=int_list, default="1,2,4,8,16", show_default=True, help="Above the cores: skipped.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Runs per cell (median).")
@click.option("--budget-s", type=float, default=420.0, show_default=True, help="Runs ending past it are skipped.")
@click.option("--max-memory", callback=parse_size, default="1GiB", show_default=True, help="leanmerge --max-memory.")
@click.option("--tolerance", type=click.FloatRange(0, 1), default=TOLERANCE, show_default=True, help="Per step up.")
@click.option("--run-timeout-s", type=float, default=240.0, show_default=True, help="A merge running longer is killed.")
def main(out: Path | None, cache: Path, scratch: Path | None, **kw: Any) -> None:
    """Warm CPU merge speed at each thread count and the default, with the scaling checks."""
    check_names((kw["preset"],), kw["methods"])
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = out or BENCH / "results" / f"threads-{stamp}.json"
    parent = scratch or default_scratch(cache, kw["preset"])
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-threads-", dir=parent))
    try:
        res = run_plan(Plan(cache=cache, scratch=work, out=out, **kw))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if parent == cache / "tmp":  # the cache's own scratch folder, when nothing else is in it
            with contextlib.suppress(OSError):
                parent.rmdir()
    click.echo("\n" + markdown(res))
    click.echo(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
