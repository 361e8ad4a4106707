"""`leanmerge convert SRC DST --to zarr|safetensors`: a model folder rewritten in the other format.

A conversion is the merge machinery with one input and no arithmetic (`merge(copy_only=True)`):
row blocks streamed in the planned budget, bytes copied as stored (bit-exact both ways, every
dtype), written under a temporary name with the journal (`--resume` continues a killed run), and
renamed into place only when complete; an existing DST is refused unless `--overwrite` (and then
only a model folder, engine.io.target). The output carries the same checksums `verify` reads.
SRC and DST may be store URLs (`memory://`, `s3://`: zarr, engine.io.zarr_url) the way a merge's
inputs and output may.
"""

from __future__ import annotations

from pathlib import Path

from engine.merge import Report, merge
from engine.spec import MergeSpec

FORMATS = ("zarr", "safetensors")


def convert(
    src: Path,
    dst: Path | str,
    to: str,
    *,
    compress: str | None = None,
    max_memory: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    handle_signals: bool = True,
    store_work: Path | None = None,
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
        store_work=store_work,
    )
