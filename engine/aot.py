"""Fused kernels compiled ahead of time and kept on disk, so a merge does not pay for the compiler.

`torch.compile` costs every merge ~2.5 s on 2 cores even with a warm cache: importing the
compiler (1.6 s) and tracing `apply` (0.9 s), all holding the GIL, so the merge's own thread
merges almost nothing meanwhile. That was a quarter of a 10 GB dare_ties merge. Instead, the
first merge with a given method, parameters and dtypes exports `apply` (`torch.export`) and
compiles it with AOTInductor into a package in the kernel cache (~20 s, once); every later merge
loads that package in milliseconds through torch's C++ loader, without importing the compiler.

The kernel is the same fused code `torch.compile` would make: the same IEEE float32 operations
in the same order, so the bytes equal the eager path's (tests check both). The chunk length is a
dynamic dimension, and the chunk's position enters as tensors (`Chunk.traceable`), so one kernel
serves every chunk of every tensor with those dtypes; parameter values are constants in it.

A kernel's file name is a digest of everything its code depends on: the method, its parameters,
the dtypes, torch's version and thread count, the CPU's SIMD sets, and the source of the engine
(any change to it makes new kernels). Packages are written to a temporary name and renamed, so
concurrent merges never see half a file. `LEANMERGE_KERNEL_CACHE` moves the cache (default
`$XDG_CACHE_HOME/leanmerge/kernels`, else `~/.cache/leanmerge/kernels`); deleting it is always safe.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from engine.methods.base import Chunk, Method, Stats, TensorParams

log = logging.getLogger(__name__)
CACHE_ENV = "LEANMERGE_KERNEL_CACHE"
ENGINE = Path(__file__).resolve().parent
Dtypes = tuple[torch.dtype, ...]  # base, each model, output
Kernel = Callable[[torch.Tensor, Sequence[torch.Tensor], Chunk, torch.Tensor], None]


EXAMPLE_LEN = 4096  # chunk length the kernels are traced with: any will do, it is a dynamic dimension


def fused_apply(
    method: Method, base: torch.Tensor, models: Sequence[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk
) -> torch.Tensor:
    """`method.apply` on a chunk in its storage dtypes, as the fused kernels trace it: the casts
    to float32 happen inside, on copies (apply overwrites its model chunks, which must not write
    back into the read buffer)."""
    scratch = [m.to(torch.float32, copy=True) for m in models]
    return method.apply(base.to(torch.float32), scratch, p, stats, c)


def cache_root() -> Path:
    """Where kernels are kept (`LEANMERGE_KERNEL_CACHE`, else the user's cache folder)."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "leanmerge" / "kernels"


def supported() -> bool:
    """Whether this torch can load AOTInductor packages (2.6 and later) without the compiler."""
    aoti = getattr(torch._C, "_aoti", None)
    return aoti is not None and hasattr(aoti, "AOTIModelPackageLoader")


@functools.cache
def engine_digest() -> str:
    """sha256 of the engine's Python source: kernels are rebuilt whenever the code changes."""
    h = hashlib.sha256()
    for f in sorted(ENGINE.rglob("*.py")):
        h.update(f.relative_to(ENGINE).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def kernel_path(method: Method, p: TensorParams, dtypes: Dtypes) -> Path:
    """The package for this method, these parameters and dtypes on this machine and torch."""
    what = {
        "method": method.name,
        "globals": sorted((k, repr(v)) for k, v in p.globals.items()),
        "models": [sorted((k, repr(v)) for k, v in m.items()) for m in p.models],
        "dtypes": [str(d) for d in dtypes],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "simd": sorted(torch.backends.cpu.get_cpu_capability().split()),
        "engine": engine_digest(),
    }
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]
    return cache_root() / f"{method.name}-{digest}.pt2"


def load(path: Path) -> Kernel | None:
    """The kernel in `path`, or None if there is none (or it cannot be loaded: then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
    except Exception as e:  # noqa: BLE001 - a stale or damaged package is rebuilt
        log.warning("cannot load the cached kernel %s (%s); building it again", path, str(e)[:200])
        return None

    def run(base: torch.Tensor, models: Sequence[torch.Tensor], c: Chunk, out: torch.Tensor) -> None:
        t = c.traceable()
        assert t.lo is not None and t.keys is not None
        loader.run([base, *models, t.lo, t.keys, out])  # the kernel stores into `out` itself

    return run


def build(method: Method, p: TensorParams, stats: Stats, example: Chunk, dtypes: Dtypes, path: Path) -> None:
    """Export `method.apply` for inputs of `dtypes` and compile it into the package `path`.

    Args:
        example: any chunk of the merge (its streams give the shapes of the position tensors).
    """
    from torch._inductor import aoti_compile_and_package

    # torch's exporter trips over its own deprecation while pickling the graph; not ours to show
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    base_dtype, *model_dtypes, out_dtype = dtypes
    traceable = example.traceable()

    class Apply(torch.nn.Module):
        def forward(
            self,
            base: torch.Tensor,
            models: list[torch.Tensor],
            lo: torch.Tensor,
            keys: torch.Tensor,
            out: torch.Tensor,
        ) -> tuple[()]:
            # Mutating `out` (rather than returning a new tensor to copy) lets the kernel store its
            # result straight into the output buffer: a fresh result per chunk cost a second pass
            # over the output and its page faults (warm 10 GB merge: 0.6 CPU-seconds, 6.6 -> 6.5 s).
            c = replace(traceable, lo=lo, keys=keys)
            out.copy_(fused_apply(method, base, models, p, stats, c))
            return ()

    models = [torch.zeros(EXAMPLE_LEN, dtype=d) for d in model_dtypes]
    out = torch.zeros(EXAMPLE_LEN, dtype=out_dtype)
    args = (torch.zeros(EXAMPLE_LEN, dtype=base_dtype), models, traceable.lo, traceable.keys, out)
    length = torch.export.Dim("n", min=2, max=(1 << 31) - 1)
    dynamic = ({0: length}, [{0: length} for _ in models], None, None, {0: length})
    exported = torch.export.export(Apply(), args, dynamic_shapes=dynamic)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".pt2", dir=path.parent)
    os.close(fd)
    try:
        aoti_compile_and_package(exported, package_path=tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
