"""`--executor dask --workers N | --scheduler ADDRESS`: the flags, and the cluster they open.

With Dask, `--max-memory` bounds each worker process (the plan's block sizes are per worker);
without it a local cluster shares the default budget among its workers. Tensors are never held
resident across tasks (`--no-hold`): each statistics task reads its tensor once per pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import click

from engine.cli_options import SIZE

if TYPE_CHECKING:
    from engine.cluster.runner import DaskRunner

F = TypeVar("F", bound=Callable[..., Any])
INSTALL = "--executor dask needs dask and distributed, which are not installed: pip install 'leanmerge[dask]'"
LOCAL_WORKERS = 2


def executor_options(f: F) -> F:
    """The executor flags, shared by `merge`, `plan` and `sweep`."""
    for opt in reversed(
        [
            click.option(
                "--executor",
                type=click.Choice(["local", "dask"]),
                default="local",
                show_default=True,
                help="Run the blocks in this process, or as tasks on a Dask cluster (--workers or --scheduler).",
            ),
            click.option(
                "--workers",
                type=click.IntRange(1),
                help=f"--executor dask: start a local cluster of N worker processes (default {LOCAL_WORKERS}).",
            ),
            click.option(
                "--scheduler",
                metavar="ADDRESS",
                help="--executor dask: use the running cluster at ADDRESS (tcp://host:8786, or the JSON file "
                "`dask scheduler --scheduler-file` wrote); its workers must see the inputs and the output folder at "
                "the same paths.",
            ),
            click.option("--band-size", type=SIZE, hidden=True, help="Input bytes per Dask task (tests, tuning)."),
        ]
    ):
        f = opt(f)
    return f


def take_executor(kw: dict[str, Any]) -> dict[str, Any]:
    """Pop the executor flags from `kw` and fit the planning flags to them (per-worker budget, no
    held tensors); returns the executor's settings for `open_runner`."""
    ex = {k: kw.pop(k) for k in ("executor", "workers", "scheduler", "band_size")}
    if ex["executor"] == "local":
        given = [f"--{k}" for k in ("workers", "scheduler") if ex[k] is not None]
        if given:
            raise click.UsageError(f"{' and '.join(given)} need --executor dask")
        return ex
    if ex["workers"] is not None and ex["scheduler"] is not None:
        raise click.UsageError("--workers starts a local cluster and --scheduler uses a running one: give one")
    if ex["scheduler"] is None:
        ex["workers"] = ex["workers"] or LOCAL_WORKERS
    if kw.get("max_memory") is None and ex["workers"]:
        from engine.budget import choose_budget

        kw["max_memory"] = choose_budget(None) // ex["workers"]
    kw["hold"] = False
    return ex


def executor_line(ex: dict[str, Any]) -> str | None:
    """What `leanmerge plan` adds about the executor (None: the local one)."""
    if ex["executor"] == "local":
        return None
    where = (
        f"{ex['workers']} local worker processes" if ex["scheduler"] is None else f"the cluster at {ex['scheduler']}"
    )
    return f"executor dask on {where}: the memory budget and predicted peak RSS above are per worker"


@contextmanager
def open_runner(ex: dict[str, Any], threads: int | None, budget: int | None) -> Iterator[DaskRunner | None]:
    """A `DaskRunner` on the cluster `ex` names (a local one started here, loopback only, and
    closed after), or None for the local executor."""
    if ex["executor"] == "local":
        yield None
        return
    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError:
        raise click.ClickException(INSTALL) from None
    from engine.cluster.runner import BAND_BYTES, DaskRunner, warm_up
    from engine.cores import usable_cores

    if ex["scheduler"] is not None:
        where = ex["scheduler"]
        by_file = where.endswith(".json") and "://" not in where
        with Client(scheduler_file=where) if by_file else Client(where) as client:
            client.run(warm_up)
            yield DaskRunner(client, threads, ex["band_size"] or BAND_BYTES)
        return
    n = ex["workers"]
    # the workers hold no results worth spilling: Dask only watches their memory, the plan bounds it
    watch = {f"distributed.worker.memory.{k}": False for k in ("target", "spill", "pause", "terminate")}
    with (
        dask.config.set(watch),
        LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            memory_limit=budget or "auto",
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(warm_up)
        yield DaskRunner(client, threads or max(1, usable_cores() // n), ex["band_size"] or BAND_BYTES)
