"""What `leanmerge merge` and `plan` print: the plan's table, the merge report, NaN/Inf warnings
(kept apart from the commands in engine.cli; pure functions of the plan and report)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.budget import fmt_bytes

if TYPE_CHECKING:
    from engine.device import DevicePlan
    from engine.merge import Report
    from engine.plan import Plan, TensorPlan

SHOWN_TENSORS = 5  # tensors named in the NaN/Inf warning


def _reads(t: TensorPlan) -> str:
    """A tensor's reads: a range where a statistics pass may find nothing to count."""
    return f"{t.fewest_reads()}-{t.reads()}" if t.fewest_reads() < t.reads() else str(t.reads())


def _fewer(plan: Plan) -> str:
    return (
        "; fewer where a pass has nothing to count" if any(t.fewest_reads() < t.reads() for t in plan.tensors) else ""
    )


def format_plan(plan: Plan) -> str:
    m = plan.memory
    lines = [
        f"method {plan.spec.method}: {len(plan.spec.models)} model(s) onto {plan.spec.base}",
        f"tensors {len(plan.tensors)}, blocks {plan.n_blocks}, up to {m.block_elems} elements per block",
        f"memory budget {fmt_bytes(m.budget)}: baseline {fmt_bytes(m.baseline)} + buffers {fmt_bytes(m.buffers)}"
        f" + workspace {fmt_bytes(m.workspace)}{f' + held tensors {fmt_bytes(m.resident)}' if m.resident else ''}"
        f" -> predicted peak RSS {fmt_bytes(m.predicted_peak)}",
        f"read up to {fmt_bytes(plan.bytes_read)} (up to {max((t.reads() for t in plan.tensors), default=1)} read(s)"
        f" of a tensor{_fewer(plan)}"
        f"{'' if plan.spec.method_impl.uses_base else '; the base is a template, not read'}),"
        f" write {fmt_bytes(plan.bytes_written)}",
        *_device_line(plan.device),
        *_held_line(plan),
        "",
        f"{'tensor':<48} {'shape':<18} {'dtype':<6} {'rows/block':>10} {'blocks':>7} {'passes':>6} {'reads':>5}",
    ]
    for t in plan.tensors:
        dtype = t.out_dtype if t.merge else f"{t.out_dtype}*"
        lines.append(
            f"{t.name:<48} {str(list(t.shape)):<18} {dtype:<6} {t.block_rows:>10} {t.n_blocks:>7} {t.passes:>6} {_reads(t):>5}"
        )
    lines.append("")
    lines += [
        f"vocab {plan.spec.vocab}: {r.name} rows {list(r.rows)} (base first) -> {r.out_rows}" for r in plan.resized
    ]
    lines += [f"shard {s.file}: {len(s.tensors)} tensors, {fmt_bytes(s.data_bytes)}" for s in plan.shards]
    if any(not t.merge for t in plan.tensors):
        lines.append("* not a float tensor: copied from the base")
    return "\n".join(lines)


def format_report(r: Report) -> str:
    resumed = (
        f"resumed: {r.resumed_tensors} of {r.tensors} tensors were done by the interrupted run "
        f"({fmt_bytes(r.resumed_bytes)} of reads not repeated); this run:\n"
        if r.resumed_tensors
        else ""
    )
    return (
        f"merged {r.tensors} tensors ({r.blocks} blocks, {r.shards} shard(s)) into {r.output}\n{resumed}"
        f"wall {r.wall_s:.2f} s, read {fmt_bytes(r.bytes_read)} at {r.read_gbps:.2f} GB/s, "
        f"wrote {fmt_bytes(r.bytes_written)}\n"
        f"peak RSS {fmt_bytes(r.peak_rss)} (budget {fmt_bytes(r.budget)}, predicted {fmt_bytes(r.predicted_peak_rss)}, "
        f"at start {fmt_bytes(r.baseline_rss)}), seed {r.seed}"
        + (f"\non {r.device}: peak GPU memory {fmt_bytes(r.peak_gpu_memory)}" if r.device != "cpu" else "")
    )


def format_nonfinite(counts: dict[str, int]) -> str:
    """One warning line naming the merged tensors with NaN/Inf, most first."""
    return (
        f"Warning: NaN/Inf in {len(counts)} merged tensor(s): {_worst(counts)} "
        "(from the inputs, or an overflow of --out-dtype; --strict-finite refuses such a merge)"
    )


def format_nonfinite_inputs(inputs: dict[str, dict[str, int]]) -> str:
    """One warning line naming, per input folder, its tensors with NaN/Inf, most first."""
    shown = "; ".join(f"{folder}: {_worst(counts)}" for folder, counts in sorted(inputs.items()))
    return f"Warning: NaN/Inf in the inputs: {shown} (--strict-finite refuses such inputs)"


def _worst(counts: dict[str, int]) -> str:
    """`name count, ...` for the tensors with the most, and how many more there are."""
    worst = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{name} {n}" for name, n in worst[:SHOWN_TENSORS])
    return shown + (f" and {len(worst) - SHOWN_TENSORS} more" if len(worst) > SHOWN_TENSORS else "")


def _held_line(plan: Plan) -> list[str]:
    held = [t for t in plan.tensors if t.resident]
    if not held:
        return []
    where = "on the GPU" if plan.device.budget else "in RAM"
    return [f"{len(held)} tensor(s) read once and held {where} for their passes ({fmt_bytes(sum(plan.resident))})"]


def _device_line(d: DevicePlan) -> list[str]:
    if d.device == "cpu":
        return []
    return [
        f"on {d.device}: chunks of {d.chunk_elems} elements, GPU budget {fmt_bytes(d.budget)}"
        f" -> predicted peak {fmt_bytes(d.predicted_peak)}"
    ]
