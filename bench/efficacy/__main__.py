"""`python -m bench.efficacy [--quick]`: the DARE paper in miniature; see `bench/efficacy/__init__.py`."""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from transformers.utils import logging as transformers_logging

from bench.common import BENCH, machine_info
from bench.efficacy.report import findings, save_plot, text_report
from bench.efficacy.run import FULL, QUICK, run


@click.command()
@click.option("--quick", is_flag=True, help="Shorter training and sweeps (a few minutes): for development.")
@click.option("--results", type=click.Path(path_type=Path), default=BENCH / "results", show_default=True)
@click.option("--workdir", type=click.Path(path_type=Path), default=BENCH / "cache" / "efficacy", show_default=True)
@click.option(
    "--threads",
    type=int,
    default=None,
    help="torch threads for training and evaluation (default 2; the figures depend on it).",
)
@click.option(
    "--seed",
    type=int,
    default=None,
    help="Seed of the model init and every training batch (default 0): another base and other fine-tunes.",
)
@click.option(
    "--replot",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Only rewrite the tables and PNG of this results JSON (no training).",
)
def main(quick: bool, results: Path, workdir: Path, threads: int | None, seed: int | None, replot: Path | None) -> None:
    """Train a tiny Llama and its fine-tunes, drop and merge them with leanmerge, and score them."""
    if replot:
        write(json.loads(replot.read_text()), replot.parent, replot.with_suffix(""))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    transformers_logging.disable_progress_bar()  # one bar per saved model otherwise
    cfg = QUICK if quick else FULL
    cfg = replace(cfg, threads=threads) if threads else cfg
    cfg = replace(cfg, seed=seed) if seed is not None else cfg
    res = {"machine": machine_info(), "mode": "quick" if quick else "full", **run(cfg, workdir)}
    write(res, results)


def write(res: dict[str, Any], results: Path, stem: Path | None = None) -> Path:
    """`efficacy-<UTC stamp>.json` (with the findings), `.md` (the tables) and `.png` in
    `results`, or at `stem`; returns the JSON's path."""
    results.mkdir(parents=True, exist_ok=True)
    stem = stem or results / f"efficacy-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}"
    res = {**res, "findings": findings(res)}
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    table = text_report(res)
    stem.with_suffix(".md").write_text(table)
    png = save_plot(res, stem.with_suffix(".png"))
    click.echo(table)
    click.echo(f"wrote {stem}.json, .md" + (", .png" if png else " (no matplotlib: no PNG)"))
    return stem.with_suffix(".json")


if __name__ == "__main__":
    main()
