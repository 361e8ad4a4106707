"""Many merges of the same inputs: one output folder per point of a parameter grid.

A point is the merge the same command would run with that parameter's flag given (`--density
0.3`, `--seed 2`), so each output is byte for byte the one `leanmerge merge` writes alone. With a
Dask runner every point's merge runs at once on the cluster, one driver thread each (the driver
only plans, journals and finalizes; the workers read, merge and write), so the cluster works on
all points' blocks as one job; with the local executor they run one after another.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import SpecError
from engine.merge import Report, merge
from engine.spec import MergeSpec
from engine.work import Runner

log = logging.getLogger(__name__)
BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
MAX_DRIVERS = 16  # points merged at once on a cluster; more would only queue on the scheduler


def _bool(v: str) -> bool:
    if v.lower() not in BOOLS:
        raise ValueError(f"{v!r} is not true or false")
    return BOOLS[v.lower()]


# grid parameter -> (its flag's keyword in the command, value parser): "seed" and the parameter flags
GRID_PARAMS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "seed": ("seed", int),
    "weight": ("weight", float),
    "lambda": ("lambda_", float),
    "density": ("density", float),
    "t": ("t", float),
    "gamma": ("gamma", float),
    "epsilon": ("epsilon", float),
    "normalize": ("normalize", _bool),
    "rescale": ("rescale", _bool),
}


@dataclass(frozen=True)
class Axis:
    """One `--grid PARAM=v1,v2,...`: the parameter, its flag's keyword and the values as typed."""

    param: str
    key: str
    values: tuple[tuple[str, Any], ...]  # (as typed, parsed)


def parse_grid(text: str) -> Axis:
    """`PARAM=v1,v2,...` -> an `Axis`; raises `SpecError` naming what is wrong."""
    param, eq, values = text.partition("=")
    param = param.strip().replace("-", "_").replace("lambda_", "lambda")
    if not eq or not values.strip():
        raise SpecError(f"--grid {text!r}: give PARAM=v1,v2,... (e.g. --grid density=0.3,0.5)")
    if param not in GRID_PARAMS:
        raise SpecError(f"--grid {text!r}: {param!r} cannot be swept; one of {', '.join(GRID_PARAMS)}")
    key, parse = GRID_PARAMS[param]
    parsed = []
    for v in (v.strip() for v in values.split(",")):
        try:
            parsed.append((v, parse(v)))
        except ValueError as e:
            raise SpecError(f"--grid {text!r}: value {v!r} of {param}: {e}") from None
    if len({v for v, _ in parsed}) != len(parsed):
        raise SpecError(f"--grid {text!r}: a value is given twice")
    return Axis(param, key, tuple(parsed))


@dataclass(frozen=True)
class Point:
    """One merge of the sweep: its flag values and its output folder's name."""

    flags: dict[str, Any]
    name: str  # e.g. "density=0.3,seed=2"


def points(axes: Sequence[Axis]) -> Iterator[Point]:
    """Every combination of the axes' values, the first axis slowest."""
    if len({a.param for a in axes}) != len(axes):
        raise SpecError("--grid: a parameter is given twice; give all its values in one --grid")
    for combo in itertools.product(*(a.values for a in axes)):
        yield Point(
            {a.key: v for a, (_, v) in zip(axes, combo)},
            ",".join(f"{a.param}={typed}" for a, (typed, _) in zip(axes, combo)),
        )


def sweep(
    specs: Sequence[tuple[Point, MergeSpec]],
    out_dir: Path,
    runner: Runner | None,
    on_done: Callable[[Point, Report | BaseException], None],
    **merge_kw: Any,
) -> list[Report | BaseException]:
    """Merge every (point, spec) into `out_dir/point.name`: at once on a cluster (`runner`), else
    one after another. A failed point does not stop the others; its exception is its result.

    Returns:
        Each point's `Report`, or the exception that stopped it, in the points' order.
    """
    out_dir.mkdir(parents=True, exist_ok=True)

    def one(item: tuple[Point, MergeSpec]) -> Report | BaseException:
        point, spec = item
        try:
            result: Report | BaseException = merge(
                spec, out_dir / point.name, runner=runner, handle_signals=runner is None, **merge_kw
            )
        except Exception as e:  # an EngineError, or a bug: reported with its point, the others go on
            result = e
        on_done(point, result)
        return result

    if runner is None:
        return [one(item) for item in specs]
    with ThreadPoolExecutor(min(len(specs), MAX_DRIVERS), thread_name_prefix="leanmerge-sweep") as pool:
        return list(pool.map(one, specs))
