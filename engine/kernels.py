"""Compiled kernels: the same `apply`, fused by `torch.compile` into one pass over memory.

Eager torch runs each op of a method as its own pass over the chunk, so a 3-model dare_ties step
costs ~5 ns per input element; compiled into one loop it costs ~0.6 ns (bench/bench_steps.py),
which is what lets a merge keep up with the disk. The compiled code does the same IEEE float32
operations in the same order (elementwise, no reassociation), and the keep masks come from
`rng.keep_traceable`, so the bytes are identical to the eager path: tests check both.

The kernel takes the chunk straight from the read buffer in its storage dtype and returns it in
the output dtype, so the float32 conversions are fused in too. The chunk's position enters as
tensors (`Chunk.traceable`), so full-size chunks share one kernel and the shorter tails of blocks
one more (torch.compile's automatic dynamic shapes). Methods with reducers or whole-row chunks stay eager: their
per-tensor statistics would specialise the kernel and recompile it for every tensor.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable

import torch

from engine.methods.base import Chunk, Method, Stats, TensorParams

log = logging.getLogger(__name__)
# Compiling costs 5-60 s once (less with a warm cache) and saves ~1.5 s per GB of dare_ties input
# on 2 cores, so it pays off only for real models: 8 GiB is one 3B model plus a fine-tune.
AUTO_MIN_BYTES = 8 << 30


def can_compile(method: Method, params: TensorParams) -> bool:
    """Elementwise methods without per-tensor statistics, on a machine with a C++ compiler."""
    if method.row_aligned or method.reducers(params):
        return False
    return shutil.which("g++") is not None or shutil.which("c++") is not None


def want_compiled(
    mode: str, method: Method, params: TensorParams, bytes_read: int, *, per_tensor_params: bool = False
) -> bool:
    """Resolve `--compile auto|on|off` for this merge (auto: inputs of at least 8 GiB, and a
    method whose eager step is slower than the disk).

    Parameters that vary by tensor (gradients, filters) run eager: a compiled kernel
    specialises on parameter values and would recompile for every distinct value.
    """
    if mode == "off" or per_tensor_params or not can_compile(method, params):
        if mode == "on":
            why = "parameters vary by tensor" if per_tensor_params else "it cannot be compiled here"
            log.warning("--compile on: %s runs eager (%s)", method.name, why)
        return False
    return mode == "on" or (method.worth_compiling and bytes_read >= AUTO_MIN_BYTES)


class CompiledApply:
    """`method.apply` through `torch.compile`, falling back to eager if compiling fails.

    With `behind=True` the kernel is compiled in a background thread on a copy of the first
    chunk, and `run` declines (the caller merges eagerly, to the same bytes) until it is ready:
    the merge and its reads go on during the compile (2 s with a warm compiler cache, up to a
    minute cold) instead of waiting for it.
    """

    def __init__(self, method: Method, *, behind: bool = False) -> None:
        def fused(
            base: torch.Tensor, models: list[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk, out: torch.Tensor
        ) -> None:
            # copy=True: apply overwrites its model chunks, which must not write back into the read buffer
            scratch = [m.to(torch.float32, copy=True) for m in models]
            # Writing into `out` inside the graph lets the kernel store its result straight into the
            # output block, in its dtype: 0.50 -> 0.35 ms per dare_ties chunk of 3 x 256K elements.
            out.copy_(method.apply(base.to(torch.float32), scratch, p, stats, c))

        self._fn: Callable[..., None] | None = torch.compile(fused)
        self._ready = not behind
        self._warming: threading.Thread | None = None

    def run(
        self, base: torch.Tensor, models: list[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk, out: torch.Tensor
    ) -> bool:
        """Merge one chunk (inputs in their storage dtypes) into `out`; False if the kernel is
        unavailable, and then nothing was written."""
        if self._fn is None:
            return False
        if not self._ready:
            self._warm_up(base, models, p, stats, c, out)
            return False
        try:
            self._fn(base, models, p, stats, c.traceable(), out)
        except Exception as e:  # a compiler problem must not fail the merge: eager gives the same bytes
            log.warning("torch.compile failed (%s: %s); continuing eager", type(e).__name__, str(e)[:200])
            self._fn = None
            return False
        return True

    def _warm_up(
        self,
        base: torch.Tensor,
        models: list[torch.Tensor],
        p: TensorParams,
        stats: Stats,
        c: Chunk,
        out: torch.Tensor,
    ) -> None:
        """Start compiling on copies of this chunk's inputs (once); the real `out` is merged eagerly."""
        if self._warming is not None or self._fn is None:
            return
        fn, args = self._fn, (base.clone(), [m.clone() for m in models], p, stats, c.traceable(), torch.empty_like(out))

        def compile_now() -> None:
            try:
                fn(*args)
                self._ready = True
            except Exception as e:  # eager gives the same bytes
                log.warning("torch.compile failed (%s: %s); continuing eager", type(e).__name__, str(e)[:200])
                self._fn = None

        self._warming = threading.Thread(target=compile_now, name="leanmerge-compile", daemon=True)
        self._warming.start()

    def wait(self) -> None:
        """Block until a background compile has finished (tests)."""
        if self._warming is not None:
            self._warming.join()
