"""`leanmerge convert SRC DST --to zarr|safetensors`: a model folder rewritten in the other format.

A conversion is the merge machinery with one input and no arithmetic (`merge(copy_only=True)`):
row blocks streamed in the planned budget, bytes copied as stored (bit-exact both ways, every
dtype), written under a temporary name with the journal (`--resume` continues a killed run), and
renamed into place only when complete; an existing DST is refused unless `--overwrite` (and then
only a model folder, engine.io.target). The output carries the same checksums `verify` reads.
A DST that is a fsspec URL (`memory://`, `s3://`) is written by `engine.io.zarr_url` instead.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import SpecError
from engine.io.zarr_format import Compression
from engine.io.zarr_url import convert_to_url, is_url, local_path
from engine.merge import Report, merge
from engine.spec import MergeSpec

FORMATS = ("zarr", "safetensors")


def convert(
    src: Path,
    dst: Path,
    to: str,
    *,
    compress: str | None = None,
    max_memory: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    handle_signals: bool = True,
) -> Report:
    """Write the model folder `src` (safetensors or zarr) into the new folder `dst` as `to`.

    Example:
        >>> convert(Path("llama"), Path("llama-zarr"), "zarr", compress="zstd")  # doctest: +SKIP
    """
    spec = MergeSpec("passthrough", Path(src), (), {})
    return merge(
        spec,
        dst,
        max_memory=max_memory,
        resume=resume,
        overwrite=overwrite,
        handle_signals=handle_signals,
        out_format=to,
        compress=compress,
        copy_only=True,
        model_card=False,
        device="cpu",
    )


def convert_url(src: Path | str, url: str, to: str, compress: str | None = None) -> int:
    """Write the local model folder `src` as zarr at the fsspec `url`; returns the tensors written."""
    if to != "zarr":
        raise SpecError(f"{url}: only zarr is written to a URL; give --to zarr, or a local folder for safetensors")
    if is_url(src):
        raise SpecError(f"{src}: read a model from a URL with leanmerge convert into a local folder first")
    return convert_to_url(local_path(src), url, Compression.parse(compress))
