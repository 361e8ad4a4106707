"""The `leanmerge` command: parse flags, call the engine, show progress. No merge logic here.

`EngineError`s become one-line `click` errors (exit 1, no traceback); anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import click

from engine import __version__, load
from engine.budget import fmt_bytes
from engine.cli_convert import convert_cmd
from engine.cli_format import format_nonfinite, format_nonfinite_inputs, format_plan, format_report
from engine.cli_options import (
    SIZE,
    build_spec,
    hub_folders,
    mergekit_options,
    plan_options,
    planning,
    say_not_needed,
    spec_options,
)
from engine.cli_sweep import sweep_cmd
from engine.cluster.options import executor_line, executor_options, open_runner, take_executor
from engine.defaults import SAMPLE_ELEMS, SYNC_EVERY
from engine.errors import EngineError, Interrupted
from engine.hub import hub_cache

# The commands import the engine (and torch, ~2 s) only when they run: `--help` and `--version`
# answer without it (tests/test_cli_help.py keeps it so).


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


@click.group(
    epilog="Example: leanmerge merge merge.yaml ./merged --max-memory 8GiB   "
    "(leanmerge COMMAND --help: each command's flags and an example)"
)
@click.version_option(__version__, prog_name="leanmerge")
def main() -> None:
    """Merge homologous models (DARE, TIES, SLERP, ...) block by block, in bounded memory.

    Reads mergekit's YAML configs and takes mergekit's flags.
    """


main.add_command(sweep_cmd)

MERGE_EXAMPLES = """\b
Examples:
  leanmerge merge merge.yaml ./merged                  # a mergekit config, positional output
  leanmerge merge --method dare_ties --base ./base --model ./math:0.6 \\
      --model ./code:0.4 --density 0.5 -o ./merged --max-memory 8GiB
  leanmerge merge merge.yaml ./merged --resume         # continue an interrupted run

mergekit's --lazy-unpickle, --allow-crimes, --low-cpu-memory, --trust-remote-code and
--clone-tensors are accepted; each says in one line why it is not needed here."""


@main.command("merge", short_help="Merge models into an output folder.", epilog=MERGE_EXAMPLES)
@spec_options
@click.argument("output_arg", required=False, metavar="[OUTPUT]", type=click.Path(path_type=Path))
@plan_options
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output model folder (or give it as OUTPUT).")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing model folder once the new merge is complete: only a folder holding model files and "
    "nothing else (*.safetensors, its index, config, tokenizer files, README.md); never one with other files or "
    "subfolders, a symbolic link, an input, or the working directory or a folder above it.",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run of the same command (starts fresh if none).")
@click.option("--sync-every", type=SIZE, default=SYNC_EVERY, hidden=True, help="Bytes between durable journal commits.")
@click.option("--drop-cache", is_flag=True, help="Drop inputs from the page cache as they are read.")
@click.option("--threads", type=click.IntRange(1), help="Compute threads (default: the cores this process may use).")
@click.option("--log-json", type=click.Path(path_type=Path), help="Write JSON-lines events (plan, tensor, report).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on when stderr is a TTY).")
@click.option(
    "--model-card/--no-model-card",
    "--write-model-card/--no-write-model-card",
    "model_card",
    default=True,
    show_default=True,
    help="Write README.md (the merge's method, inputs, parameters, seed and config) and mergekit_config.yml.",
)
@click.option(
    "--copy-tokenizer/--no-copy-tokenizer",
    default=True,
    show_default=True,
    help="Copy the tokenizer's files (from the base, or the config's tokenizer_source).",
)
@click.option(
    "--strict-finite",
    is_flag=True,
    help="Refuse the merge (exit 1, no output) when a merged tensor holds NaN or Inf; by default they are counted "
    "and reported.",
)
@click.option(
    "--format",
    "out_format",
    type=click.Choice(["safetensors", "zarr"]),
    default="safetensors",
    show_default=True,
    help="Output format: safetensors shards, or a zarr group (model.zarr/, one array per tensor, one chunk per block).",
)
@click.option("--compress", metavar="none|zstd[:LEVEL]|blosc", help="Compression of zarr chunks (default none).")
@mergekit_options
@executor_options
def merge_cmd(
    output_arg: Path | None,
    output: Path | None,
    overwrite: bool,
    resume: bool,
    sync_every: int,
    drop_cache: bool,
    threads: int | None,
    log_json: Path | None,
    progress: bool | None,
    model_card: bool,
    copy_tokenizer: bool,
    strict_finite: bool,
    out_format: str,
    compress: str | None,
    **kw: Any,
) -> None:
    """Merge models into OUTPUT, from CONFIG.yaml (mergekit's YAML) or --base/--model flags.

    The output appears only when complete. A run stopped by SIGINT/SIGTERM, a full disk or an
    I/O error keeps its work in a hidden folder beside OUTPUT: rerun with --resume.
    """
    target = _output_folder(kw, output_arg, output)
    say_not_needed(kw)
    ex = take_executor(kw)
    with engine_errors():
        spec = build_spec(kw, hub_cache(os.environ))  # imports the engine (engine.load)
    import torch

    from engine.cores import default_threads
    from engine.merge import merge

    torch.set_num_threads(threads or default_threads())
    with engine_errors():
        show_bar = sys.stderr.isatty() if progress is None else progress
        with _events(log_json, show_bar) as on_event, open_runner(ex, threads, kw["max_memory"]) as runner:
            report = merge(
                spec,
                target,
                overwrite=overwrite,
                resume=resume,
                drop_cache=drop_cache,
                sync_every=sync_every,
                on_event=on_event,
                model_card=model_card,
                copy_tokenizer=copy_tokenizer,
                strict_finite=strict_finite,
                runner=runner,
                out_format=out_format,
                compress=compress,
                **planning(kw),
            )
            on_event({"event": "report", **report.to_json()})
    click.echo(format_report(report))
    if report.nonfinite_inputs:
        click.echo(format_nonfinite_inputs(report.nonfinite_inputs), err=True)
    if report.nonfinite:
        click.echo(format_nonfinite(report.nonfinite), err=True)


def _output_folder(kw: dict[str, Any], output_arg: Path | None, output: Path | None) -> Path:
    """The output folder, given as mergekit does (`merge CONFIG OUT`) or with -o; with flags and
    no CONFIG, a lone positional is the output (`merge --base B --model M OUT`)."""
    if output_arg is None and output is None and kw["config"] is not None and (kw["base"] or kw["models"]):
        kw["config"], output_arg = None, kw["config"]
    if output_arg is not None and output is not None:
        raise click.UsageError(f"two output folders: {output_arg} and -o {output}; give one")
    target = output if output is not None else output_arg
    if target is None:
        raise click.UsageError("missing the output folder: leanmerge merge CONFIG.yaml OUTPUT, or -o OUTPUT")
    return target


@main.command(
    "plan",
    short_help="Show what a merge would do, reading headers only.",
    epilog="\b\nExample:\n  leanmerge plan merge.yaml --max-memory 4GiB",
)
@spec_options
@plan_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@executor_options
def plan_cmd(as_json: bool, **kw: Any) -> None:
    """Show what a merge would do: tensors, blocks, predicted peak RSS, bytes, shards."""
    say_not_needed(kw)
    ex = take_executor(kw)
    with engine_errors():
        spec = build_spec(kw, hub_cache(os.environ))  # imports the engine (engine.load)
        from engine.merge import plan_summary, prepare

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
                "passes": t.passes,
                "reads": t.reads(),
                "fewest_reads": t.fewest_reads(),
                "shard": t.shard,
            }
            for t in plan.tensors
        ]
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(format_plan(plan) + (f"\n{executor_line(ex)}" if executor_line(ex) else ""))


@main.command(
    "inspect",
    short_help="Describe models and check they can be merged.",
    epilog="\b\nExamples:\n  leanmerge inspect ./base ./math-ft ./code-ft\n  leanmerge inspect meta-llama/Llama-3.2-1B ./math-ft",
)
@click.argument("folders", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--sample",
    type=click.IntRange(1),
    default=SAMPLE_ELEMS,
    show_default=True,
    help="Elements read per tensor for the delta statistics.",
)
def inspect_cmd(folders: tuple[str, ...], as_json: bool, sample: int) -> None:
    """Describe model (or LoRA adapter) FOLDERS, local paths or Hub ids OWNER/NAME[@REV] (read
    from the Hugging Face cache, as merge does); with several, compare each with the first (the
    base): homology, sampled delta statistics, and warnings for merges that will not work.
    Exits 1 when a model is not homologous with the base."""
    load()
    from engine.inspect import format_inspection, inspect

    with engine_errors():
        result = inspect(hub_folders(folders, hub_cache(os.environ)), sample_elems=sample)
    click.echo(json.dumps(result.to_json(), indent=2) if as_json else format_inspection(result))
    problem = result.not_homologous()
    if problem:
        raise click.ClickException(problem)


@main.command(
    "verify",
    short_help="Re-read a merged folder and check its checksums.",
    epilog="\b\nExamples:\n  leanmerge verify ./merged\n  leanmerge verify ./merged merge.yaml   "
    "# and that it is the merge of this config\n  leanmerge verify s3://bucket/merged   # a zarr model at a URL",
)
@click.argument("folder", type=click.Path(path_type=Path))
@spec_options
def verify_cmd(folder: Path, **kw: Any) -> None:
    """Re-read FOLDER and check every tensor against its recorded crc32, and each shard header,
    config and tokenizer file against its recorded sha256; with a CONFIG or
    --base/--model/--method, also check the folder is complete for that spec. FOLDER may be
    the URL of a zarr model (file://, s3://, ... as merge -o takes it)."""
    with engine_errors():
        against = build_spec(kw, hub_cache(os.environ)) if (kw["config"] or kw["base"]) else None
        load()
        from engine.io.url import local_path, shown
        from engine.verify import verify

        result = verify(folder, against)
    for n in result.notes:
        click.echo(f"note: {n}", err=True)
    for p in result.problems:
        click.echo(f"FAIL {p}", err=True)
    where = shown(local_path(folder))  # a store URL as typed (pathlib folds `//`), a file:// URL as its path
    if not result.ok:
        raise click.ClickException(f"{where}: {len(result.problems)} problem(s) in {result.tensors} tensors")
    files = f"; {result.files} shard headers and files match their sha256" if result.files else ""
    click.echo(f"{where}: OK, {result.tensors} tensors, {fmt_bytes(result.bytes)} match their crc32{files}")


main.add_command(convert_cmd)


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

                bar = tqdm(
                    total=e["bytes_read"],
                    initial=e["resumed_bytes"],  # what an interrupted run did: this one does the rest
                    unit="B",
                    unit_scale=True,
                    desc="merge",
                    file=sys.stderr,
                )
            if e["event"] in ("block", "skipped"):
                if bar is not None and e["event"] == "block":
                    bar.update(e["bytes"])
                elif bar is not None:  # a statistics pass found needless: its bytes are not read
                    bar.total -= e["bytes"]
                    bar.refresh()
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
