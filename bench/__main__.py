"""`python -m bench`: leanmerge's memory and throughput benchmarks.

Sections (`--sections`, default all):

- rss_vs_budget: peak RSS of task_arithmetic, dare_ties (and ties once registered) at
  `--max-memory` 512MiB, 1GiB, 2GiB, 4GiB, and whether it stayed under; naive for scale.
- rss_vs_size: base + 3 fine-tunes of growing presets (tiny, small, llama1b-embed,
  llama8b-embed, llama70b-layer: 1.75 MB to 23.7 GB of inputs) at 1GiB; leanmerge should stay
  flat once the models outgrow the budget, while the naive whole-tensor merge grows.
  A size whose family would not fit in free disk minus 10 GB is skipped, and so is a baseline
  predicted not to fit in RAM (the naive 70B-layer merge would need ~25 GB).
- throughput: GB/s of input of every registered method, cold cache (inputs dropped with
  fadvise before each run) and warm, next to this disk's cold read limit measured in the
  same run; `cold/limit` = leanmerge cold GB/s / read limit.
- naive and, when `mergekit-yaml` is installed, mergekit are columns of each section
  (`--baselines mergekit` runs only the peer: the naive baseline is the slow half of a full run).
  mergekit 0.1.5 installs beside the CPU torch wheel in its own venv (`python -m venv /tmp/mk;
  /tmp/mk/bin/pip install torch==2.13.0 mergekit==0.1.5`); put its bin folder on PATH.

Modes: `--quick` uses the tiny and small presets, budgets 512MiB and 1GiB, 1 repeat and every
registered method: about two minutes on an idle 2-core box (twice that when others use it). Full
mode uses 3 repeats and the big presets. It writes ~39 GB of synthetic models into the cache (a
few minutes, once). Measured on a 2-core machine with a ~1.2 GB/s disk (2026-11-27): rss_vs_budget +
rss_vs_size with both baselines 33 min; throughput of linear, task_arithmetic, dare_linear,
dare_ties and ties beside mergekit 63 min, beside the naive merge 54 min (a naive DARE merge takes
1.3-2.2 min: `torch.bernoulli` over 1 GB tensors); the seven other methods, leanmerge alone, 52 min
(della: 2-2.5 min per merge then, 2.3x faster since 8a7eedf). Every section, method and baseline in
one run is therefore about 3.5 hours here: narrow it with `--methods`, `--baselines` and `--caches
cold` (the throughput section without its warm runs).
Run it on an otherwise idle machine: contention skews the time and the engine's threads.
Merge outputs share the inputs' disk unless `--scratch` puts them elsewhere: on one disk the
output's writes take their share of its bandwidth (a cold linear merge here: 7.0-8.3 s with the
output beside the inputs, 4.1-4.5 s with it on tmpfs).

Outputs: `RESULTS/<UTC timestamp>.json` (machine, mode, every figure as min/median/max of
the repeats), `.txt` (the table printed here) and `.png` (if matplotlib is installed), written
after every section: a long run that is stopped keeps the sections it finished, and its JSON's
`unfinished` (its table's PARTIAL line) names the ones it did not.
Synthetic families are cached in `--cache` (default bench/cache, gitignored); `--clean`
deletes it and exits.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import click

from bench.common import BENCH, machine_info
from bench.families import preset_sizes
from bench.plot import save_plot
from bench.report import text_table
from bench.sections import RUNNERS, SECTIONS, Settings

log = logging.getLogger("bench")
QUICK = {
    "family": "small",
    "sizes": ("tiny", "small"),
    "repeats": 1,
    "budgets": (512 << 20, 1 << 30),  # the small family fits in any of them: two show the floor
}
FULL = {
    "family": "llama8b-embed",
    "sizes": ("tiny", "small", "llama1b-embed", "llama8b-embed", "llama70b-layer"),
    "repeats": 3,
}


def split_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    """A comma-separated flag as a tuple (None when not given)."""
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


def check_presets(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    from tools.make_synthetic import PRESETS

    names = split_list(ctx, param, value)
    bad = [n for n in names or () if n not in PRESETS]
    if bad:
        raise click.BadParameter(f"unknown preset {bad[0]!r}; choose from {', '.join(PRESETS)}")
    return names


def check_preset(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    names = check_presets(ctx, param, value)
    if names is not None and len(names) != 1:
        raise click.BadParameter(f"one preset, got {value!r}")
    return names[0] if names else None


def parse_budgets(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    from engine.budget import parse_bytes

    try:
        return tuple(parse_bytes(v) for v in split_list(ctx, param, value) or ()) or None
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def parse_budget(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    budgets = parse_budgets(ctx, param, value)
    if budgets is not None and len(budgets) != 1:
        raise click.BadParameter(f"one size, got {value!r}")
    return budgets[0] if budgets else None


def check_methods(methods: tuple[str, ...] | None) -> None:
    """Fail early on a `--methods` name the engine does not register (it would just run nothing)."""
    from engine.methods.registry import METHODS

    bad = [m for m in methods or () if m not in METHODS]
    if bad:
        raise click.BadParameter(f"unknown method {bad[0]!r}; registered: {', '.join(METHODS)}", param_hint="--methods")


def settings_for(quick: bool, cache: Path, repeats: int | None, hidden: dict[str, Any]) -> Settings:
    """Mode defaults, overridden by the flags; the family defaults to the largest size asked for."""
    mode: dict[str, Any] = QUICK if quick else FULL
    sizes = tuple(sorted(hidden["sizes"] or mode["sizes"], key=lambda p: preset_sizes(p)[0]))
    family = hidden["family"] or (sizes[-1] if hidden["sizes"] else mode["family"])
    extra: dict[str, Any] = {k: hidden[k] or mode.get(k) for k in ("budgets", "methods") if hidden[k] or mode.get(k)}
    if hidden.get("caches"):
        extra["caches"] = hidden["caches"]
    if hidden.get("baselines") is not None:
        extra["baselines"] = hidden["baselines"]
    if hidden.get("max_memory") is not None:
        extra["size_budget"] = hidden["max_memory"]
    return Settings(cache, repeats or mode["repeats"], family, sizes, **extra)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` whole: a run killed mid-write leaves the previous version, never half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_outputs(results: dict[str, Any], out_dir: Path, stamp: str) -> tuple[str, list[Path]]:
    """`<stamp>.json`, `.txt` and `.png` in `out_dir`; returns the table and the files written.

    Called after every section with the same stamp, so a run stopped after hours keeps the
    sections it finished (the JSON's `unfinished` lists the rest)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = text_table(results)
    paths = [out_dir / f"{stamp}.json", out_dir / f"{stamp}.txt"]
    write_atomic(paths[0], json.dumps(results, indent=2) + "\n")
    write_atomic(paths[1], table + "\n")
    png = save_plot(results, out_dir / f"{stamp}.png")
    if png is None:
        table += "\n(no PNG: matplotlib is not installed; pip install -e '.[bench]')"
    return table, paths + ([png] if png else [])


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", is_flag=True, help="tiny/small presets, 1 repeat: a few minutes. Default: full (hours).")
@click.option("--clean", is_flag=True, help="Delete the model cache and exit.")
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    default=BENCH / "cache",
    show_default=True,
    help="Synthetic model families (reused) and, unless --scratch, merge outputs (deleted after each run).",
)
@click.option(
    "--results",
    type=click.Path(file_okay=False, path_type=Path),
    default=BENCH / "results",
    show_default=True,
    help="Where <timestamp>.json/.txt/.png go.",
)
@click.option(
    "--scratch",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where merge outputs go (deleted after each run) [default: inside --cache]. Another disk (or"
    " /dev/shm) takes the output's writes off the inputs' disk.",
)
@click.option("--repeats", type=click.IntRange(min=1), help="Runs per figure [default: 1 quick, 3 full].")
@click.option("--sections", callback=split_list, default=",".join(SECTIONS), show_default=True, help="Comma-separated.")
@click.option("--sizes", callback=check_presets, hidden=True, help="Presets for rss_vs_size (tests: tiny).")
@click.option(
    "--family",
    callback=check_preset,
    help="Model family preset for rss_vs_budget and throughput (e.g. llama1b-embed).",
)
@click.option("--methods", callback=split_list, help="Only these methods, comma-separated [default: all registered].")
@click.option("--budgets", callback=parse_budgets, hidden=True, help="Budgets for rss_vs_budget.")
@click.option("--caches", callback=split_list, help="Page-cache states for throughput: cold, warm [default: both].")
@click.option(
    "--max-memory",
    callback=parse_budget,
    help="leanmerge's --max-memory in rss_vs_size and throughput [default: 1GiB]. Larger budgets hold"
    " two-pass tensors (SLERP, model stock) and read them once.",
)
@click.option(
    "--baselines",
    callback=lambda ctx, param, value: (
        None if value is None else tuple(v for v in value.split(",") if v not in ("", "none"))
    ),
    help="Other tools to run beside leanmerge: naive, mergekit, or none [default: both; mergekit where"
    " mergekit-yaml is on PATH].",
)
def main(
    quick: bool,
    clean: bool,
    cache: Path,
    results: Path,
    scratch: Path | None,
    repeats: int | None,
    sections: tuple[str, ...],
    **hidden: Any,
) -> None:
    """Benchmark leanmerge's peak RSS and throughput against a naive whole-tensor merge."""
    handler = logging.StreamHandler()  # progress on stderr; the table goes to stdout
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    if clean:
        shutil.rmtree(cache, ignore_errors=True)
        click.echo(f"removed {cache}")
        return
    unknown = [s for s in sections if s not in RUNNERS]
    if unknown:
        raise click.BadParameter(
            f"unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}", param_hint="--sections"
        )
    check_methods(hidden["methods"])
    if scratch is not None:  # fail before any work, not after the first model family is written
        try:
            scratch.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise click.BadParameter(f"cannot create {scratch}: {e.strerror}", param_hint="--scratch") from None
    try:
        s = dataclasses.replace(settings_for(quick, cache, repeats, hidden), scratch=scratch)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    t0 = time.perf_counter()
    out: dict[str, Any] = {"machine": machine_info(cache), "mode": "quick" if quick else "full"}
    out["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(s).items()}
    out["sections"] = {}
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for i, name in enumerate(sections):
        log.info("section %s", name)
        out["sections"][name] = RUNNERS[name](s)
        out["elapsed_s"] = time.perf_counter() - t0
        if rest := list(sections[i + 1 :]):
            _, paths = write_outputs({**out, "unfinished": rest}, results, stamp)
            log.info("section %s done; results so far in %s", name, paths[0])
    table, paths = write_outputs(out, results, stamp)
    click.echo(table)
    click.echo("\n" + "\n".join(f"wrote {p}" for p in paths))


if __name__ == "__main__":
    main()
