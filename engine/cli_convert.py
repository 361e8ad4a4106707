"""`leanmerge convert`: its flags; the work is `engine.convert` (registered in engine.cli)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from engine.cli_options import SIZE
from engine.errors import EngineError, Interrupted

CONVERT_EXAMPLES = """\b
Examples:
  leanmerge convert ./llama ./llama-zarr --to zarr --compress zstd
  leanmerge convert ./llama-zarr ./llama-st --to safetensors
  leanmerge convert ./llama ./llama-zarr --to zarr --resume   # continue a killed run"""


@click.command("convert", short_help="Rewrite a model folder as zarr or safetensors.", epilog=CONVERT_EXAMPLES)
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst")
@click.option("--to", "to", type=click.Choice(["zarr", "safetensors"]), required=True, help="Output format.")
@click.option("--compress", metavar="none|zstd[:LEVEL]|blosc", help="Compression of zarr chunks (default none).")
@click.option("--max-memory", type=SIZE, help="Peak RSS ceiling (default: half the available RAM).")
@click.option("--resume", is_flag=True, help="Continue an interrupted conversion.")
@click.option("--overwrite", is_flag=True, help="Replace an existing model folder DST once complete.")
def convert_cmd(
    src: Path, dst: str, to: str, compress: str | None, max_memory: int | None, resume: bool, overwrite: bool
) -> None:
    """Write the model folder SRC (safetensors or zarr) into the new folder DST in format --to,
    bit for bit, streaming row blocks in bounded memory; DST appears only when complete. SRC and DST may
    be store URLs for zarr (memory://, s3:// with leanmerge[s3] installed; file:// is a local path)."""
    from engine import load

    load()
    from engine.budget import fmt_bytes
    from engine.convert import convert
    from engine.io.url import local_path, store_url

    try:
        r = convert(
            src,
            dst if store_url(dst) else local_path(dst),
            to,
            compress=compress,
            max_memory=max_memory,
            resume=resume,
            overwrite=overwrite,
        )
    except Interrupted as e:
        click.echo(f"Interrupted: {e}", err=True)
        sys.exit(128 + e.signum)
    except EngineError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{dst}: {r.tensors} tensors, {fmt_bytes(r.bytes_written)} as {to} in {r.wall_s:.1f} s")
