"""The whole job: inventory -> plan -> execute -> finalize, with a report of what it cost."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine import __version__
from engine.budget import current_rss, default_budget, peak_rss
from engine.execute import OnEvent, execute
from engine.io.inventory import Inventory, take_inventory
from engine.io.output import abort_output, check_target, commit_output, start_output, write_side_files
from engine.io.safetensors_writer import ShardWriter
from engine.plan import DEFAULT_SHARD_SIZE, Plan, make_plan
from engine.spec import MergeSpec


@dataclass(frozen=True)
class Report:
    """What a merge did and cost; printed by the CLI and written as the last JSON event."""

    output: str
    method: str
    seed: int
    tensors: int
    blocks: int
    shards: int
    wall_s: float
    bytes_read: int
    bytes_written: int
    read_gbps: float
    budget: int
    predicted_peak_rss: int
    peak_rss: int
    baseline_rss: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def prepare(
    spec: MergeSpec,
    *,
    max_memory: int | None = None,
    block_bytes: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    baseline: int | None = None,
) -> tuple[Inventory, Plan]:
    """Open the inputs and plan the merge, reading headers only."""
    inv = take_inventory(spec.base, [m.path for m in spec.models])
    plan = make_plan(
        spec,
        inv,
        budget=max_memory if max_memory is not None else default_budget(),
        baseline=current_rss() if baseline is None else baseline,
        block_bytes=block_bytes,
        shard_size=shard_size,
    )
    return inv, plan


def merge(
    spec: MergeSpec,
    output: Path | str,
    *,
    max_memory: int | None = None,
    block_bytes: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    drop_cache: bool = False,
    on_event: OnEvent | None = None,
) -> Report:
    """Merge the models of `spec` into the folder `output`.

    Args:
        spec: what to merge and how.
        output: the folder to create; it appears only once the merge is complete.
        max_memory: whole-process peak RSS ceiling in bytes (default: half the available RAM).
        block_bytes: fixed block size per input stream, overriding the planner.
        shard_size: largest output shard in bytes.
        overwrite: replace an existing `output` (only once the new one is complete).
        drop_cache: drop input and output pages from the page cache as they are used.
        on_event: called with `{"event": "plan" | "block" | "tensor", ...}` dicts.
    Returns:
        The run's `Report`.
    Example:
        >>> spec = MergeSpec("task_arithmetic", Path("base"), (ModelRef(Path("ft"), {}),), {})
        >>> merge(spec, "merged", max_memory=1 << 30)  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    baseline = current_rss()
    output = Path(output)
    emit = on_event or (lambda e: None)
    inv, plan = prepare(spec, max_memory=max_memory, block_bytes=block_bytes, shard_size=shard_size, baseline=baseline)
    check_target(output, overwrite, [spec.base, *(m.path for m in spec.models)])
    emit({"event": "plan", **plan_summary(plan)})
    tmp = start_output(output)
    try:
        writer = ShardWriter(tmp, plan, {"format": "pt", "leanmerge": f"{__version__} spec-sha256:{spec.digest()}"})
        try:
            execute(plan, inv, writer, emit, drop_cache=drop_cache)
            writer.finish()
        finally:
            writer.close()
        write_side_files(tmp, plan)
        commit_output(tmp, output)
    except BaseException:
        abort_output(tmp)
        raise
    wall = time.perf_counter() - t0
    return Report(
        output=str(output),
        method=spec.method,
        seed=spec.seed,
        tensors=len(plan.tensors),
        blocks=plan.n_blocks,
        shards=len(plan.shards),
        wall_s=wall,
        bytes_read=plan.bytes_read,
        bytes_written=plan.bytes_written,
        read_gbps=plan.bytes_read / wall / 1e9,
        budget=plan.memory.budget,
        predicted_peak_rss=plan.memory.predicted_peak,
        peak_rss=peak_rss(),
        baseline_rss=baseline,
    )


def plan_summary(plan: Plan) -> dict[str, Any]:
    """The plan's headline numbers, JSON-ready."""
    m = plan.memory
    return {
        "method": plan.spec.method,
        "tensors": len(plan.tensors),
        "blocks": plan.n_blocks,
        "block_elems": m.block_elems,
        "budget": m.budget,
        "baseline_rss": m.baseline,
        "predicted_peak_rss": m.predicted_peak,
        "bytes_read": plan.bytes_read,
        "bytes_written": plan.bytes_written,
        "shards": [{"file": s.file, "tensors": len(s.tensors), "bytes": s.data_bytes} for s in plan.shards],
    }
