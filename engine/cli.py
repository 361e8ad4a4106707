"""The `leanmerge` command: parse flags, call the engine, show progress. No merge logic here.

`EngineError`s become one-line `click` errors (exit 1, no traceback); anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

import click

from engine import __version__
from engine.budget import fmt_bytes, parse_bytes
from engine.config import load_config
from engine.device import DevicePlan
from engine.errors import EngineError, Interrupted, SpecError
from engine.inspect import SAMPLE_ELEMS, format_inspection, inspect
from engine.io.write_behind import SYNC_EVERY
from engine.merge import Report, merge, plan_summary, prepare
from engine.methods.registry import METHODS
from engine.plan import DEFAULT_SHARD_SIZE, Plan
from engine.spec import VOCAB_POLICIES, MergeSpec, cli_spec
from engine.verify import verify

F = TypeVar("F", bound=Callable[..., Any])


class ByteSize(click.ParamType):  # type: ignore[type-arg]  # generic only since click 8.5
    """A size flag: `1GiB`, `512MiB`, `5GB` or bytes."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_bytes(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


SIZE = ByteSize()


def spec_options(f: F) -> F:
    """The flags that describe a merge, shared by `merge` and `plan`."""
    options = [
        click.argument("config", required=False, type=click.Path(path_type=Path)),
        click.option("--base", type=click.Path(path_type=Path), help="Base model folder."),
        click.option(
            "--model", "models", multiple=True, metavar="DIR[:WEIGHT]", help="Fine-tuned model folder; repeat."
        ),
        click.option("--method", type=click.Choice(sorted(METHODS)), help="Merge method."),
        click.option("--weight", type=float, help="Weight of every model without its own :WEIGHT."),
        click.option("--lambda", "lambda_", type=float, help="Scale of the merged delta (task arithmetic)."),
        click.option("--density", type=float, help="Fraction of each delta kept (DARE, TIES)."),
        click.option("--normalize/--no-normalize", default=None, help="Divide by the sum of weights."),
        click.option(
            "--rescale/--no-rescale", default=None, help="DARE: divide survivors by density (off = DropOnly)."
        ),
        click.option("--seed", type=int, help="Random seed for DARE masks (default 0)."),
        click.option("--out-dtype", help="Output float dtype: bf16, fp16, fp32 (default: the base's)."),
        click.option(
            "--vocab",
            type=click.Choice(VOCAB_POLICIES),
            help="Embedding rows when models add tokens: the base's (default) or the union of all models'.",
        ),
        click.option(
            "--max-memory", type=SIZE, help="Peak RSS ceiling for the whole process (default: half of free RAM)."
        ),
        click.option("--block-size", type=SIZE, help="Bytes per input stream per block (overrides the planner)."),
        click.option(
            "--device",
            default="auto",
            show_default=True,
            metavar="auto|cpu|cuda[:N]",
            help="Where the arithmetic runs (auto: CUDA when present). Same bytes on both.",
        ),
        click.option("--max-gpu-memory", type=SIZE, help="Device memory ceiling on CUDA (default: 80% of free)."),
        click.option(
            "--hold/--no-hold",
            default=True,
            show_default=True,
            help="Read a tensor with statistics passes (TIES, DELLA, SLERP, ...) once and hold it for all of them "
            "where the budget has room; --no-hold reads it once per pass (the least memory).",
        ),
        click.option(
            "--direct-io/--buffered-io",
            default=True,
            show_default=True,
            help="Read inputs with O_DIRECT (no page cache, no copy); buffered is faster only for inputs already "
            "cached (and then tensors of two passes are read twice rather than held).",
        ),
        click.option(
            "--shard-size", type=SIZE, default=DEFAULT_SHARD_SIZE, show_default=True, help="Largest output shard."
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def planning(kw: dict[str, Any]) -> dict[str, Any]:
    """The `spec_options` flags that shape the plan (not the spec), as `prepare`/`merge` keywords:
    `merge` and `plan` pass the same ones, so the plan shown is the plan run."""
    return {
        "max_memory": kw["max_memory"],
        "block_bytes": kw["block_size"],
        "shard_size": kw["shard_size"],
        "device": kw["device"],
        "max_gpu_memory": kw["max_gpu_memory"],
        "hold": kw["hold"],
        "direct_io": kw["direct_io"],
    }


def build_spec(kw: dict[str, Any]) -> MergeSpec:
    """One MergeSpec from a YAML file and/or flags; flags override the file's globals."""
    params = {
        k: v
        for k, v in {
            "weight": kw["weight"],
            "lambda": kw["lambda_"],
            "density": kw["density"],
            "normalize": kw["normalize"],
            "rescale": kw["rescale"],
        }.items()
        if v is not None
    }
    if kw["config"] is not None:
        if kw["base"] or kw["models"]:
            raise SpecError("give either a CONFIG file or --base/--model flags, not both")
        overrides = {"method": kw["method"], "out_dtype": kw["out_dtype"], "seed": kw["seed"], "vocab": kw["vocab"]}
        spec = load_config(kw["config"], overrides)
        if params:
            spec = dataclasses.replace(spec, params={**spec.params, **params})
        return spec
    takes_models = kw["method"] is None or METHODS[kw["method"]].min_models > 0  # passthrough takes none
    needed = (("--base", kw["base"]), ("--model", kw["models"] or not takes_models), ("--method", kw["method"]))
    missing = [f for f, v in needed if not v]
    if missing:
        raise SpecError(f"missing {', '.join(missing)} (or give a CONFIG.yaml)")
    spec = cli_spec(kw["method"], kw["base"], kw["models"], params, kw["out_dtype"], kw["seed"])
    return dataclasses.replace(spec, vocab=kw["vocab"]) if kw["vocab"] else spec


@contextmanager
def engine_errors() -> Iterator[None]:
    """EngineError -> one line on stderr; an interrupted merge exits 128 + signal number."""
    try:
        yield
    except Interrupted as e:
        click.echo(f"Interrupted: {e}", err=True)
        sys.exit(128 + e.signum)
    except EngineError as e:
        raise click.ClickException(str(e)) from None


@click.group()
@click.version_option(__version__, prog_name="leanmerge")
def main() -> None:
    """Merge homologous models (DARE, task arithmetic, ...) block by block, in bounded memory."""


@main.command("merge")
@spec_options
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output model folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder once the new one is complete.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run of the same command (starts fresh if none).")
@click.option("--sync-every", type=SIZE, default=SYNC_EVERY, hidden=True, help="Bytes between durable journal commits.")
@click.option("--drop-cache", is_flag=True, help="Drop inputs from the page cache as they are read.")
@click.option(
    "--compile",
    "compile_mode",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="Fuse elementwise methods with torch.compile (auto: inputs of 8 GiB or more). Same bytes either way.",
)
@click.option("--threads", type=click.IntRange(1), help="Compute threads (default: the cores this process may use).")
@click.option("--log-json", type=click.Path(path_type=Path), help="Write JSON-lines events (plan, tensor, report).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on when stderr is a TTY).")
def merge_cmd(
    output: Path,
    overwrite: bool,
    resume: bool,
    sync_every: int,
    drop_cache: bool,
    compile_mode: str,
    threads: int | None,
    log_json: Path | None,
    progress: bool | None,
    **kw: Any,
) -> None:
    """Merge models into OUTPUT (from CONFIG.yaml or --base/--model flags).

    The output appears only when complete. A run stopped by SIGINT/SIGTERM, a full disk or an
    I/O error keeps its work in a hidden folder beside OUTPUT: rerun with --resume.
    """
    import torch

    from engine.cores import default_threads

    torch.set_num_threads(threads or default_threads())
    with engine_errors():
        spec = build_spec(kw)
        show_bar = sys.stderr.isatty() if progress is None else progress
        with _events(log_json, show_bar) as on_event:
            report = merge(
                spec,
                output,
                overwrite=overwrite,
                resume=resume,
                drop_cache=drop_cache,
                sync_every=sync_every,
                compile=compile_mode,
                on_event=on_event,
                **planning(kw),
            )
            on_event({"event": "report", **report.to_json()})
    click.echo(format_report(report))


@main.command("plan")
@spec_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_cmd(as_json: bool, **kw: Any) -> None:
    """Show what a merge would do: tensors, blocks, predicted peak RSS, bytes, shards."""
    with engine_errors():
        spec = build_spec(kw)
        _, plan = prepare(spec, **planning(kw))
    if as_json:
        summary = plan_summary(plan)
        summary["tensor_plans"] = [
            {
                "name": t.name,
                "shape": list(t.shape),
                "out_dtype": t.out_dtype,
                "merge": t.merge,
                "block_rows": t.block_rows,
                "blocks": t.n_blocks,
                "shard": t.shard,
            }
            for t in plan.tensors
        ]
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(format_plan(plan))


@main.command("inspect")
@click.argument("folders", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--sample",
    type=click.IntRange(1),
    default=SAMPLE_ELEMS,
    show_default=True,
    help="Elements read per tensor for the delta statistics.",
)
def inspect_cmd(folders: tuple[Path, ...], as_json: bool, sample: int) -> None:
    """Describe model (or LoRA adapter) FOLDERS; with several, compare each with the first
    (the base): homology, sampled delta statistics, and warnings for merges that will not work."""
    with engine_errors():
        result = inspect(folders, sample_elems=sample)
    click.echo(json.dumps(result.to_json(), indent=2) if as_json else format_inspection(result))


@main.command("verify")
@click.argument("folder", type=click.Path(path_type=Path))
@spec_options
def verify_cmd(folder: Path, **kw: Any) -> None:
    """Re-read FOLDER and check every tensor against its recorded crc32; with a CONFIG or
    --base/--model/--method, also check the folder is complete for that spec."""
    with engine_errors():
        against = build_spec(kw) if (kw["config"] or kw["base"]) else None
        result = verify(folder, against)
    for p in result.problems:
        click.echo(f"FAIL {p}", err=True)
    if not result.ok:
        raise click.ClickException(f"{folder}: {len(result.problems)} problem(s) in {result.tensors} tensors")
    click.echo(f"{folder}: OK, {result.tensors} tensors, {fmt_bytes(result.bytes)} match their crc32")


def format_plan(plan: Plan) -> str:
    m = plan.memory
    lines = [
        f"method {plan.spec.method}: {len(plan.spec.models)} model(s) onto {plan.spec.base}",
        f"tensors {len(plan.tensors)}, blocks {plan.n_blocks}, up to {m.block_elems} elements per block",
        f"memory budget {fmt_bytes(m.budget)}: baseline {fmt_bytes(m.baseline)} + buffers {fmt_bytes(m.buffers)}"
        f" + workspace {fmt_bytes(m.workspace)}{f' + held tensors {fmt_bytes(m.resident)}' if m.resident else ''}"
        f" -> predicted peak RSS {fmt_bytes(m.predicted_peak)}",
        f"read {fmt_bytes(plan.bytes_read)} (up to {max((t.passes for t in plan.tensors), default=1)} pass(es) per tensor"
        f"{'' if plan.spec.method_impl.uses_base else '; the base is a template, not read'}),"
        f" write {fmt_bytes(plan.bytes_written)}; kernels {'compiled' if plan.compiled else 'eager'}",
        *_device_line(plan.device),
        *_held_line(plan),
        "",
        f"{'tensor':<48} {'shape':<18} {'dtype':<6} {'rows/block':>10} {'blocks':>7} {'passes':>6}",
    ]
    for t in plan.tensors:
        dtype = t.out_dtype if t.merge else f"{t.out_dtype}*"
        lines.append(
            f"{t.name:<48} {str(list(t.shape)):<18} {dtype:<6} {t.block_rows:>10} {t.n_blocks:>7} {t.passes:>6}"
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
    return (
        f"merged {r.tensors} tensors ({r.blocks} blocks, {r.shards} shard(s)) into {r.output}\n"
        f"wall {r.wall_s:.2f} s, read {fmt_bytes(r.bytes_read)} at {r.read_gbps:.2f} GB/s, "
        f"wrote {fmt_bytes(r.bytes_written)}\n"
        f"peak RSS {fmt_bytes(r.peak_rss)} (budget {fmt_bytes(r.budget)}, predicted {fmt_bytes(r.predicted_peak_rss)}, "
        f"at start {fmt_bytes(r.baseline_rss)}), seed {r.seed}"
        + (f"\non {r.device}: peak GPU memory {fmt_bytes(r.peak_gpu_memory)}" if r.device != "cpu" else "")
    )


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


@contextmanager
def _events(log_json: Path | None, show_bar: bool) -> Iterator[Callable[[dict[str, Any]], None]]:
    """An event sink feeding the JSON-lines log and the progress bar."""
    log: IO[str] | None = open(log_json, "w") if log_json else None  # noqa: SIM115
    bar: Any = None
    try:

        def on_event(e: dict[str, Any]) -> None:
            nonlocal bar
            if e["event"] == "plan" and show_bar:
                from tqdm import tqdm

                bar = tqdm(total=e["bytes_read"], unit="B", unit_scale=True, desc="merge", file=sys.stderr)
            if e["event"] == "block":
                if bar is not None:
                    bar.update(e["bytes"])
                return  # too chatty for the log
            if log is not None:
                log.write(json.dumps(e) + "\n")
                log.flush()

        yield on_event
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()


def run() -> None:
    """The `leanmerge` command: `main`, then a quick exit.

    Tearing the interpreter down after a merge (torch's modules and thread pools) took 0.6 s of a
    6.7 s SLERP command on 2 cores. By the time `main` returns every output is written, synced
    and renamed, so once the exit handlers have run (the log file's among them) and the output
    streams are flushed, the process leaves at once, with `main`'s exit status. A thread still
    running, or an exception, takes the usual way out.
    """
    try:
        main()
    except SystemExit as e:
        code = e.code
    else:  # not in standalone mode: never
        code = 0
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    run()
