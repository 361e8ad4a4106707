"""The whole job: inventory -> plan -> execute -> finalize, resumable, with a report of its cost."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from engine import __version__
from engine.budget import choose_budget, current_rss, fmt_bytes, peak_rss
from engine.defaults import DEFAULT_SHARD_SIZE, SYNC_EVERY
from engine.device import CUDA_HOST_RESERVE, peak_device_memory, plan_device, resolve_device, start_device
from engine.embed_rows import rebuild_vocabulary
from engine.errors import BudgetError, CheckpointError, NonFiniteError, SpecError
from engine.execute import OnEvent
from engine.io.checkpoint import ReadOptions
from engine.io.inventory import Inventory, take_inventory
from engine.io.lock import output_lock
from engine.io.output import temp_dir_for
from engine.io.safetensors_writer import layout_digest
from engine.io.target import check_target, check_temp, clear_leftovers, commit_output, make_parent, resolve_target
from engine.io.url import local_path, store_url
from engine.io.write_behind import Finite
from engine.io.zarr_format import Compression
from engine.io.zarr_reader import zarr_cache_bytes
from engine.io.zarr_url import StoreTarget
from engine.io.zarr_writer import existing_chunk_rows, zarr_blocks
from engine.io.zarr_writer import layout_digest as zarr_layout
from engine.plan import Plan, make_plan, out_shape
from engine.resume import fingerprints, open_temp
from engine.signals import graceful_stop
from engine.spec import MergeSpec
from engine.stats import pairwise
from engine.vocab import check_tokenizer_fits
from engine.work import Runner, Work, finish, write_blocks

log = logging.getLogger(__name__)
# Fewest passes for a tensor to be held in RAM, by how the inputs are read. With O_DIRECT every
# pass reads the disk, and since both passes of SLERP and model stock run in C the second read
# shows (llama1b-embed, 2-core VM, cold, --max-memory 4GiB, 4 alternating runs, medians of the
# whole command, held vs read per pass: slerp 5.89 vs 7.80 s, model_stock 7.73 vs 8.76 s). Buffered
# reads of cached inputs make a re-read a memory copy, cheaper than the hold's copy and page faults
# (warm: slerp 4.35 vs 3.95 s, model_stock 7.44 vs 6.81 s): there only ties-like tensors of three
# passes or more are held (ties 17.7 vs 22.1 s, breadcrumbs 20.3 vs 21.5 s, cold, medians of 3).
CPU_HOLD_PASSES = {"direct": 2, "buffered": 3}


@dataclass(frozen=True)
class Report:
    """What a merge did and cost; printed by the CLI and written as the last JSON event."""

    output: str
    method: str
    seed: int
    tensors: int
    blocks: int
    shards: int
    resumed_tensors: int  # done by an earlier, interrupted run: not merged again
    device: str
    wall_s: float
    bytes_read: int  # by this run: a resumed run does not count what an earlier run read
    bytes_written: int
    read_gbps: float
    budget: int
    predicted_peak_rss: int
    peak_rss: int
    baseline_rss: int
    predicted_peak_gpu_memory: int
    peak_gpu_memory: int  # what the CUDA caching allocator reserved at most (0 on the CPU)
    resumed_bytes: int = 0  # what the earlier run read for `resumed_tensors`
    nonfinite: dict[str, int] = field(default_factory=dict)  # NaN/Inf per merged tensor this run wrote
    nonfinite_inputs: dict[str, dict[str, int]] = field(default_factory=dict)  # input folder -> tensor -> NaN/Inf

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def prepare(
    spec: MergeSpec,
    *,
    max_memory: int | None = None,
    block_bytes: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    baseline: int | None = None,
    device: str = "auto",
    max_gpu_memory: int | None = None,
    hold: bool = True,
    direct_io: bool = True,
) -> tuple[Inventory, Plan]:
    """Open the inputs and plan the merge, reading headers only.

    On CUDA the methods run eager (the GPU is far faster than any disk) in chunks planned for `max_gpu_memory` (`plan.device`); "auto" falls
    back to the CPU when the GPU's free memory cannot hold one chunk. With `hold`,
    tensors with statistics passes that fit what the budget leaves are read once (`_hold_resident`;
    `direct_io`: how the merge will read, which decides what a re-read costs on the CPU).
    """
    dev = resolve_device(device)
    vocab = "union" if spec.tokenizer is not None else spec.vocab  # any rows: the built vocabulary maps them
    inv = take_inventory(spec.base, [m.path for m in spec.models], vocab, spec.slices)
    if spec.tokenizer is not None:
        inv = rebuild_vocabulary(spec, inv)
    else:
        check_tokenizer_fits(spec.tokenizer_source or spec.base, {n: out_shape(inv, n) for n in inv.base.tensors})
    budget = choose_budget(max_memory)
    kw: dict[str, Any] = {
        "budget": budget,
        "baseline": current_rss() if baseline is None else baseline,
        "block_bytes": block_bytes,
        "shard_size": shard_size,
    }
    cache = zarr_cache_bytes((inv.base, *inv.models))  # zarr inputs decode chunk by chunk: counted here
    if dev.type == "cuda":
        plan = make_plan(spec, inv, **kw, device_reserve=CUDA_HOST_RESERVE + cache)
        numel = max((t.numel for t in plan.tensors), default=1)
        try:
            plan = replace(plan, device=plan_device(dev, max_gpu_memory, plan.memory, numel))
            return inv, _hold_resident(plan, direct_io) if hold else plan
        except BudgetError as e:
            if device.strip().lower() != "auto" or max_gpu_memory is not None:
                raise
            log.warning("--device auto: %s; merging on the CPU instead", e)
    plan = make_plan(spec, inv, **kw, device_reserve=cache)
    return inv, _hold_resident(plan, direct_io) if hold else plan


def _hold_resident(plan: Plan, direct_io: bool) -> Plan:
    """Hold whole on the compute device the multi-pass tensors that fit the room its budget
    leaves (RAM under --max-memory, or the GPU under --max-gpu-memory), so each is read once
    instead of once per statistics pass. On the CPU only tensors of `CPU_HOLD_PASSES` or more,
    by how the inputs are read: a buffered re-read of cached inputs costs less than the hold."""
    d, m = plan.device, plan.memory
    if d.budget:  # a GPU
        plan = plan.with_resident(d.budget - d.predicted_peak)
        return replace(plan, device=replace(d, predicted_peak=d.predicted_peak + sum(plan.resident)))
    plan = plan.with_resident(m.budget - m.predicted_peak, CPU_HOLD_PASSES["direct" if direct_io else "buffered"])
    return replace(plan, memory=replace(m, resident=sum(plan.resident)))


def merge(
    spec: MergeSpec,
    output: Path | str,
    *,
    max_memory: int | None = None,
    block_bytes: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    resume: bool = False,
    drop_cache: bool = False,
    direct_io: bool = True,
    on_event: OnEvent | None = None,
    sync_every: int = SYNC_EVERY,
    handle_signals: bool = True,
    device: str = "auto",
    max_gpu_memory: int | None = None,
    hold: bool = True,
    model_card: bool = True,
    copy_tokenizer: bool = True,
    strict_finite: bool = False,
    runner: Runner | None = None,
    out_format: str = "safetensors",
    compress: str | None = None,
    copy_only: bool = False,
    store_work: Path | None = None,
) -> Report:
    """Merge the models of `spec` into the folder `output`.

    Args:
        spec: what to merge and how.
        output: the folder to create; it appears only once the merge is complete and verified.
        max_memory: whole-process peak RSS ceiling in bytes (default: `budget.default_budget`,
            half the available RAM within the cgroup's limit and RLIMIT_AS).
        block_bytes: fixed block size per input stream, overriding the planner.
        shard_size: largest output shard in bytes.
        overwrite: replace an existing `output` once the new one is complete, where it is a
            folder of model files and nothing else (`engine.io.target`: never other files, a
            link, an input, or the working directory or above).
        resume: continue an interrupted run of the same spec from its journal.
        drop_cache: drop input pages from the page cache as they are read (buffered reads).
        direct_io: read blocks with O_DIRECT where the filesystem allows (no page cache, no
            copy: the fastest cold reads on few cores); False reads through the page cache,
            faster only when the inputs are already cached.
        on_event: called with `{"event": "plan" | "block" | "tensor", ...}` dicts.
        sync_every: bytes written between durable journal commits (the most a crash can lose).
        handle_signals: stop gracefully on SIGINT/SIGTERM (main thread only).
        device: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N": where the arithmetic runs.
        max_gpu_memory: device memory the merge may hold in bytes (default: 80% of what is free).
        hold: read a tensor with statistics passes once and hold it for all of them, where the
            budget has room for it; False reads it once per pass (the least memory).
        model_card: write README.md and mergekit_config.yml into `output`, as mergekit does.
        copy_tokenizer: copy the tokenizer's files (from the base or `spec.tokenizer_source`).
        strict_finite: refuse the merge (`NonFiniteError`, no output) when a merged tensor holds
            NaN or Inf; otherwise they are counted in `Report.nonfinite`.
        runner: what writes the blocks (default: this process, `write_blocks`); `engine.cluster`
            runs them on a Dask cluster.
        out_format: "safetensors" (shards) or "zarr" (a zarr group, engine.io.zarr_writer).
        compress: the zarr chunks' compression, "none", "zstd[:LEVEL]" or "blosc" (zarr only).
        copy_only: copy every tensor's bytes as stored, no arithmetic (`leanmerge convert`).
        store_work: where an output at a store URL (`memory://…`, `s3://…`; zarr only) keeps its
            journal, side files and lock (engine.io.zarr_url); default ~/.cache/leanmerge/stores.
    Returns:
        The run's `Report`.
    Raises:
        Interrupted: a signal stopped the run; run again with `resume=True`.
    Example:
        >>> spec = MergeSpec("task_arithmetic", Path("base"), (ModelRef(Path("ft"), {}),), {})
        >>> merge(spec, "merged", max_memory=1 << 30)  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    start_device(dev)  # before the baseline: a CUDA context costs host RAM too
    baseline = current_rss()
    store = _store_target(output, out_format, runner, store_work)
    target = store.anchor if store is not None else resolve_target(local_path(output))
    skipped = [0]  # bytes of the statistics passes found needless (`Reducer.needed`): not read

    def emit(e: dict[str, Any]) -> None:
        skipped[0] += e["bytes"] if e["event"] == "skipped" else 0
        if on_event is not None:
            on_event(e)

    inv, plan = prepare(
        spec,
        max_memory=max_memory,
        block_bytes=block_bytes,
        shard_size=shard_size,
        baseline=baseline,
        device=device,
        max_gpu_memory=max_gpu_memory,
        hold=hold,
        direct_io=direct_io,
    )
    metadata = {"format": "pt", "leanmerge": f"{__version__} spec-sha256:{spec.digest()}"}
    tmp = temp_dir_for(target)
    zfmt = _zarr_format(out_format, compress)
    if copy_only:  # bit-exact for every dtype (F64 and NaN payloads too): nothing goes through float32
        plan = replace(plan, tensors=tuple(replace(t, merge=False, passes=1, resident=False) for t in plan.tensors))
    if zfmt is not None:  # blocks become chunks: those of the interrupted run where resuming
        zroot = store.zarr_root if store is not None else None
        plan = zarr_blocks(plan, existing_chunk_rows(tmp, zroot) if resume and not tmp.is_symlink() else None)
    header = {
        "spec": spec.to_json(),
        "inputs": fingerprints(inv),
        "layout": zarr_layout(plan, zfmt) if zfmt else layout_digest(plan, metadata),
    }
    side = {"card": (store or target).name if model_card else None, "tokenizer": copy_tokenizer}
    finite = Finite(strict_finite)
    make_parent(target)
    with (
        output_lock(target, store.url if store is not None else None) as lock,
        graceful_stop(handle_signals, lambda: _exit_at_once(tmp, lock)) as stop,
    ):
        clear_leftovers(target)
        inputs = [spec.base, *(m.path for m in spec.models)]
        if store is not None:
            store.check(overwrite, inputs, tmp)
        else:
            check_target(target, overwrite, inputs)
        check_temp(tmp)
        state = open_temp(tmp, plan, header, resume, 0 if store is not None else plan.bytes_written)
        if store is not None and state is None:
            store.reset_temp()
        # What the interrupted run read for the tensors it finished (the progress bar starts there);
        # the report counts those that pass their re-check on disk (`_restore_prefix`).
        journaled = sum(t.bytes_read for t in plan.tensors if state is not None and t.name in state.done)
        emit({"event": "plan", **plan_summary(plan), "resumed": state is not None, "resumed_bytes": journaled})
        reading = ReadOptions(direct=direct_io, drop_cache=drop_cache)
        try:
            work = Work(plan, inv, tmp, metadata, header, state, emit, reading, sync_every, stop, finite, zfmt,
                        store.zarr_root if store is not None else None)  # fmt: skip
            kept = finish(work, side, runner or write_blocks)
        except (CheckpointError, NonFiniteError):  # `finish` removed `tmp`: nothing to resume
            if store is not None:
                store.remove_temp()
            raise
        except torch.OutOfMemoryError as e:  # the work so far stays in `tmp`, journaled
            raise BudgetError(_out_of_memory(plan, tmp, e)) from None
        except RuntimeError as e:  # threading's only signal that the address space ran out
            if "can't start new thread" not in str(e):
                raise
            raise BudgetError(
                f"cannot start a thread: the address space is exhausted (ulimit -v / RLIMIT_AS); raise the limit "
                f"or lower --max-memory, then run the same command with --resume (the work so far is in {tmp})"
            ) from None
        finally:
            pairwise.release()  # the statistics' scratch: a library caller's GPU gets it back
        if store is None:
            commit_output(tmp, target, overwrite)  # a signal that lands after the last block lets the run finish
        else:
            store.publish(tmp, replace=overwrite)
            shutil.rmtree(tmp)
    wall = time.perf_counter() - t0
    earlier = sum(t.bytes_read for t in plan.tensors if t.name in kept)
    read = plan.bytes_read - earlier - skipped[0]
    return Report(
        output=store.url if store is not None else str(local_path(output)),
        method=spec.method,
        seed=spec.seed,
        tensors=len(plan.tensors),
        blocks=plan.n_blocks,
        shards=len(plan.shards),
        resumed_tensors=len(kept),
        device=plan.device.device,
        wall_s=wall,
        bytes_read=read,
        bytes_written=plan.bytes_written,
        read_gbps=read / wall / 1e9,
        budget=plan.memory.budget,
        predicted_peak_rss=plan.memory.predicted_peak,
        peak_rss=peak_rss(),
        baseline_rss=baseline,
        predicted_peak_gpu_memory=plan.device.predicted_peak,
        peak_gpu_memory=peak_device_memory(torch.device(plan.device.device)),  # auto may have fallen back
        resumed_bytes=earlier,
        nonfinite=finite.counts,
        nonfinite_inputs=finite.inputs,
    )


def _exit_at_once(tmp: Path, lock: Path) -> None:
    """A second signal exits at once (engine.signals): remove the lock file as a normal end
    does, and say where the work is and how to continue it."""
    lock.unlink(missing_ok=True)
    saved = (
        f"the work so far is saved in {tmp}: run the same command with --resume"
        if tmp.exists()
        else "nothing was written yet"
    )
    os.write(2, f"Interrupted: exiting at once; {saved}\n".encode())


def _out_of_memory(plan: Plan, tmp: Path, e: BaseException) -> str:
    """What to do when an allocation failed mid-merge: usually something else took the memory
    the plan counted on (another job on the GPU, or the machine's RAM)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    d, m = plan.device, plan.memory
    if d.budget:
        what = f"{d.device} ran out of memory ({first}); the merge planned {fmt_bytes(d.predicted_peak)} of it"
        fix = "free the GPU or lower --max-gpu-memory"
    else:
        what = f"out of memory ({first}); the merge planned a peak RSS of {fmt_bytes(m.predicted_peak)}"
        fix = "free RAM or lower --max-memory"
    return f"{what}, so something else is using it: {fix}, then run the same command with --resume (the work so far is in {tmp})"


def _store_target(output: Path | str, out_format: str, runner: Runner | None, work: Path | None) -> StoreTarget | None:
    """The output's store URL as a `StoreTarget` (None: a local folder; `file://` is one)."""
    url = store_url(output)
    if url is None:
        return None
    if out_format != "zarr":
        raise SpecError(
            f"{url}: a store URL takes --format zarr only: safetensors shards are written at offsets inside "
            "preallocated files, which object storage cannot do; add --format zarr, or write a local folder"
        )
    if runner is not None and url.startswith("memory://"):
        raise SpecError(
            f"{url}: memory:// lives in this process only, where Dask workers cannot write; use a shared store"
        )
    return StoreTarget.of(url, work or Path.home() / ".cache" / "leanmerge" / "stores")


def _zarr_format(out_format: str, compress: str | None) -> Compression | None:
    """The zarr output's compression, or None for safetensors."""
    if out_format == "zarr":
        return Compression.parse(compress)
    if compress is not None and Compression.parse(compress).kind != "none":
        raise SpecError(f"--compress {compress}: only --format zarr output is compressed; add --format zarr")
    return None


def plan_summary(plan: Plan) -> dict[str, Any]:
    """The plan's headline numbers, JSON-ready."""
    m = plan.memory
    return {
        "method": plan.spec.method,
        "tensors": len(plan.tensors),
        "blocks": plan.n_blocks,
        "passes": max((t.passes for t in plan.tensors), default=1),
        "device": plan.device.device,
        "device_chunk_elems": plan.device.chunk_elems,
        "gpu_budget": plan.device.budget,
        "predicted_peak_gpu_memory": plan.device.predicted_peak,
        "resident_tensors": sum(t.resident for t in plan.tensors),
        "resident_bytes": sum(plan.resident),
        "block_elems": m.block_elems,
        "budget": m.budget,
        "baseline_rss": m.baseline,
        "predicted_peak_rss": m.predicted_peak,
        "bytes_read": plan.bytes_read,
        "bytes_written": plan.bytes_written,
        "shards": [{"file": s.file, "tensors": len(s.tensors), "bytes": s.data_bytes} for s in plan.shards],
        "vocab": {
            "policy": plan.spec.vocab,
            "resized": [{"name": r.name, "rows": list(r.rows), "out_rows": r.out_rows} for r in plan.resized],
        },
    }
