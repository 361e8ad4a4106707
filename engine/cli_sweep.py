"""`leanmerge sweep CONFIG --grid PARAM=v1,v2,... -o DIR`: one merge per grid point."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from engine.cli_options import build_spec, plan_options, planning, say_not_needed, spec_options
from engine.cluster.options import executor_options, open_runner, take_executor
from engine.errors import EngineError

SWEEP_EXAMPLES = """\b
Examples:
  leanmerge sweep merge.yaml --grid density=0.3,0.5,0.7 -o ./sweep
  leanmerge sweep merge.yaml --grid density=0.3,0.5 --grid seed=1,2 -o ./sweep \\
      --executor dask --workers 4 --max-memory 4GiB     # DIR/density=0.3,seed=1 ..."""


@click.command("sweep", short_help="Merge once per point of a parameter grid.", epilog=SWEEP_EXAMPLES)
@spec_options
@plan_options
@click.option(
    "--grid",
    "grids",
    multiple=True,
    required=True,
    metavar="PARAM=V1,V2,...",
    help="Values of one parameter (density, weight, lambda, t, gamma, epsilon, normalize, rescale, seed); "
    "repeat for a product of grids.",
)
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder of outputs.")
@click.option("--resume", is_flag=True, help="Continue interrupted points; points already written are kept.")
@click.option("--threads", type=click.IntRange(1), help="Compute threads (per worker with --executor dask).")
@executor_options
def sweep_cmd(grids: tuple[str, ...], out_dir: Path, resume: bool, threads: int | None, **kw: Any) -> None:
    """Merge CONFIG (or --base/--model flags) once per point of the --grid values, each into
    DIR/PARAM=VALUE,...: the bytes `leanmerge merge` writes with those flags. On a Dask cluster
    every point runs at once as one job; with the local executor one after another."""
    say_not_needed(kw)
    ex = take_executor(kw)
    try:
        from engine.sweep import parse_grid, points, sweep

        axes = [parse_grid(g) for g in grids]
        specs = [(p, build_spec({**kw, **p.flags})) for p in points(axes)]
        done = {p.name for p, _ in specs if resume and (out_dir / p.name).is_dir()}
        for name in sorted(done):
            click.echo(f"{name}: already written, kept")
        todo = [(p, s) for p, s in specs if p.name not in done]
        with open_runner(ex, threads, kw["max_memory"]) as runner:
            results = sweep(todo, out_dir, runner, _say, resume=resume, **planning(kw))
    except EngineError as e:
        raise click.ClickException(str(e)) from None
    failed = sum(isinstance(r, BaseException) for r in results)
    if failed:
        click.echo(f"{failed} of {len(results)} point(s) failed; fix the cause and rerun with --resume", err=True)
        sys.exit(1)


def _say(point: Any, result: Any) -> None:
    if isinstance(result, BaseException):
        click.echo(f"{point.name}: failed: {result}", err=True)
    else:
        click.echo(f"{point.name}: {result.tensors} tensors -> {result.output} in {result.wall_s:.1f} s")
