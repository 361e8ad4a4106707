"""The headline memory check: merge Llama-3-8B-sized embeddings under a 1 GiB ceiling.

Base + 3 fine-tunes of the "llama8b-embed" preset (largest tensor 128256 x 4096 bf16 = 1.05 GB,
~2.5 GB per model, ~10 GB of inputs) merged with task_arithmetic and dare_ties at
`--max-memory 1GiB`. A whole-tensor merge needs that 1.05 GB tensor four times over in float32
before it writes anything; leanmerge must keep the whole process, interpreter and torch
included, under the ceiling. Peak RSS is the kernel's figure for the merge process (`wait4`).

Run from the repository root: `python -m bench.bench_memory [--cache DIR]`. Generating the
family takes a few minutes once (cached in bench/cache); each merge reads ~10 GB. Writes
`RESULTS/memory-<UTC timestamp>.json` and exits 1 if a merge failed or went over the ceiling.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import click

from bench.common import BENCH, machine_info
from bench.families import ensure_family, fits_on_disk
from bench.report import fmt_bytes
from bench.sections import GiB, Settings, measure

PRESET = "llama8b-embed"
METHODS = ("task_arithmetic", "dare_ties")


def check(settings: Settings, ceiling: int) -> list[dict[str, Any]]:
    """One entry per method: figures of `settings.repeats` merges at `ceiling`, and the verdict."""
    family = ensure_family(settings.cache, settings.family, settings.n_models)
    entries = []
    for method in settings.registered(METHODS):
        e = measure(settings, "leanmerge", family, method, budget=ceiling)
        if e is not None:
            e["within_budget"] = "error" not in e and e["peak_rss"]["max"] <= ceiling
            entries.append(e)
    return entries


def describe(e: dict[str, Any], ceiling: int) -> str:
    """One line per method for the terminal."""
    if "error" in e:
        return f"{e['method']}: FAILED\n{e['error']}"
    verdict = "OK" if e["within_budget"] else "OVER"
    return (
        f"{e['method']}: peak RSS {fmt_bytes(e['peak_rss']['max'])} of {fmt_bytes(ceiling)} ({verdict}), "
        f"wall {e['wall_s_process']['median']:.1f} s (merge {e['wall_s']['median']:.1f} s, {e['gbps']['median']:.2f} GB/s)"
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=BENCH / "cache", show_default=True)
@click.option(
    "--results", type=click.Path(file_okay=False, path_type=Path), default=BENCH / "results", show_default=True
)
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--preset", default=PRESET, hidden=True, help="Family preset (tests use tiny).")
def main(cache: Path, results: Path, repeats: int, preset: str) -> None:
    """Merge base + 3 fine-tunes of llama8b-embed at --max-memory 1GiB; report peak RSS vs the ceiling."""
    ceiling = 1 * GiB
    ok, why = fits_on_disk(cache, preset)
    if not ok:
        raise click.ClickException(f"{preset}: {why}")
    settings = Settings(cache, repeats, preset, (preset,))
    entries = check(settings, ceiling)
    out = {"machine": machine_info(cache), "check": "memory", "preset": preset, "ceiling": ceiling, "runs": entries}
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"memory-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    for e in entries:
        click.echo(describe(e, ceiling))
    click.echo(f"wrote {path}")
    if not entries or not all(e["within_budget"] for e in entries):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
