"""Fused kernels: the same `apply`, compiled into one pass over memory.

Eager torch runs each op of a method as its own pass over the chunk, so a 3-model dare_ties step
costs ~5 ns per input element; compiled into one loop it costs ~0.6 ns (bench/bench_steps.py),
which is what lets a merge keep up with the disk. The compiled code does the same IEEE float32
operations in the same order (elementwise, no reassociation), and the keep masks come from
`rng.keep_traceable`, so the bytes are identical to the eager path: tests check both.

The kernel takes the chunk straight from the read buffer in its storage dtype and returns it in
the output dtype, so the float32 conversions are fused in too. The chunk's position enters as
tensors (`Chunk.traceable`) and its length is a dynamic dimension, so one kernel serves every
chunk with the same dtypes. Kernels are compiled ahead of time and cached on disk
(`engine.aot`); where torch cannot load such packages, `torch.compile` makes them in every merge.
Methods with reducers or whole-row chunks stay eager: their per-tensor statistics would
specialise the kernel for every tensor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import queue
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from engine import aot
from engine.methods.base import Chunk, Method, Stats, TensorParams
from engine.stats import pairwise

log = logging.getLogger(__name__)
# A kernel costs 7-20 s to build once per settings (then milliseconds to load) and saves ~1.5 s per
# GB of dare_ties input on 2 cores, so it pays off for real models: 8 GiB is one 3B model plus a fine-tune.
AUTO_MIN_BYTES = 8 << 30


def can_compile(method: Method, params: TensorParams) -> bool:
    """Elementwise methods without per-tensor statistics, on a machine with a C++ compiler, that
    the C extension does not run already (`Method.steps`: faster than any compiled kernel)."""
    if method.row_aligned or method.reducers(params):
        return False
    if pairwise.fused_kernel(torch.device("cpu")) and method.steps(params, {}, len(params.models)) is not None:
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


def all_cached(method: Method, params: TensorParams, dtype_sets: Iterable[aot.Dtypes]) -> bool:
    """Whether the kernel cache holds a fused kernel for every dtype set: then the merge only
    loads them (~1 MiB each) and needs no memory for the compiler."""
    return aot.supported() and all(aot.kernel_path(method, params, d).is_file() for d in dtype_sets)


def skip_repeated_isa_probe() -> None:
    """Let inductor trust the CPU's SIMD flags once it has checked them on this machine.

    Before its first kernel in every process, inductor compiles a test library per instruction
    set the CPU reports (AVX-512 VNNI, AVX-512, AVX2, ...) and loads each in a fresh Python, in case
    one crashes: 1.35 s of a 2.5 s cached compile here, paid by every merge. The answer changes
    only with the CPU and torch, so the first process records it in inductor's cache folder and
    later ones set `vec_isa_ok` when the probe agreed with the flags (the same instruction sets,
    so the same kernels). Any surprise in torch's internals leaves inductor to probe as usual.
    """
    try:
        from torch._inductor import config, cpu_vec_isa
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        if config.cpp.vec_isa_ok is not None:  # the user's TORCHINDUCTOR_VEC_ISA_OK wins
            return
        flags = cpu_vec_isa.x86_isa_checker()
        by_flags = [str(i) for i in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(i).split())]
        key = hashlib.sha256(json.dumps([torch.__version__, platform.machine(), by_flags]).encode()).hexdigest()[:16]
        marker = Path(cache_dir()) / "leanmerge" / f"vec-isa-{key}.ok"
        if not marker.exists():
            if not by_flags or [str(i) for i in cpu_vec_isa.valid_vec_isa_list()] != by_flags:
                return
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        config.cpp.vec_isa_ok = True
    except Exception as e:  # noqa: BLE001 - an optimisation only
        log.debug("vec ISA probe shortcut unavailable: %s", e)


class CompiledApply:
    """`method.apply` as one fused kernel per set of dtypes; eager (same bytes) when there is none.

    A kernel built by an earlier merge loads from the cache in milliseconds. Otherwise it is built
    on the first chunk with those dtypes: exported and compiled into the cache (~20 s here, once per
    machine, method, parameters and dtypes), or, where torch cannot load such packages, through
    `torch.compile` (~2.5 s in every merge). With `behind=True` building happens in a background
    thread and `run` declines (the caller merges that chunk eagerly) until the kernel is ready;
    without it the first chunk waits. An instance serves one merge: its parameters are constants
    in the kernels, so they must not vary by tensor (`want_compiled` sees to that).
    """

    MIN_LEN = 2  # shorter chunks run eager: a dynamic dimension of 0 or 1 would be specialised

    def __init__(self, method: Method, *, behind: bool = False, use_cache: bool = True) -> None:
        self.method = method
        self._behind = behind
        self._use_cache = use_cache and aot.supported()
        self._kernels: dict[aot.Dtypes, aot.Kernel] = {}
        self._asked: set[aot.Dtypes] = set()  # looked up, being built, built, or given up
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._jit: Callable[..., None] | None = None

    def run(
        self, base: torch.Tensor, models: list[torch.Tensor], p: TensorParams, stats: Stats, c: Chunk, out: torch.Tensor
    ) -> bool:
        """Merge one chunk (inputs in their storage dtypes) into `out`; False if no kernel is
        ready for it, and then `out` is for the caller to fill."""
        if base.numel() < self.MIN_LEN:
            return False
        dtypes = (base.dtype, *(m.dtype for m in models), out.dtype)
        kernel = self._kernels.get(dtypes)
        if kernel is None:
            if dtypes in self._asked:
                return False
            self._asked.add(dtypes)
            kernel = self._cached(p, dtypes)
            if kernel is None:
                job = (p, stats, c, dtypes)
                if self._behind:
                    self._start_worker()
                    self._jobs.put(job)
                    return False
                self._build(job)
                kernel = self._kernels.get(dtypes)
                if kernel is None:
                    return False
        try:
            kernel(base, models, c, out)
        except Exception as e:  # a kernel problem must not fail the merge: eager gives the same bytes
            log.warning("fused kernel failed (%s: %s); continuing eager", type(e).__name__, str(e)[:200])
            self._kernels.pop(dtypes, None)
            return False
        return True

    def wait(self) -> None:
        """Block until every kernel asked for so far is built or given up (tests)."""
        if self._worker is not None:
            self._jobs.join()

    def close(self, *, wait: bool = True) -> None:
        """Stop the build thread; `wait` lets a build under way finish and land in the cache
        (a merge that completed), otherwise it is left to die with the process (one that stopped)."""
        if self._worker is not None and self._worker.is_alive():
            self._jobs.put(None)
            if wait:
                if self._jobs.unfinished_tasks > 1:  # a build besides the stop just queued
                    log.info("finishing the fused kernel build for later merges (once per settings)")
                self._worker.join()

    def _cached(self, p: TensorParams, dtypes: aot.Dtypes) -> aot.Kernel | None:
        kernel = aot.load(aot.kernel_path(self.method, p, dtypes)) if self._use_cache else None
        if kernel is not None:
            self._kernels[dtypes] = kernel
        return kernel

    def _start_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="leanmerge-compile", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._build(job)
            finally:
                self._jobs.task_done()
        self._jobs.task_done()

    def _build(self, job: _Job) -> None:
        """Make the kernel for `job`'s dtypes: into the cache, else with torch.compile, else none."""
        p, stats, c, dtypes = job
        try:
            skip_repeated_isa_probe()
            if self._use_cache:
                path = aot.kernel_path(self.method, p, dtypes)
                log.info("compiling a fused %s kernel into %s (once for these settings)", self.method.name, path)
                try:
                    aot.build(self.method, p, stats, c, dtypes, path)
                except Exception as e:  # noqa: BLE001 - torch.compile may still manage
                    log.warning(
                        "ahead-of-time compile failed (%s: %s); using torch.compile", type(e).__name__, str(e)[:200]
                    )
                else:
                    if (kernel := aot.load(path)) is not None:
                        self._kernels[dtypes] = kernel
                        return
            self._kernels[dtypes] = self._jit_kernel(p, stats, c, dtypes)
        except Exception as e:  # eager gives the same bytes
            log.warning("torch.compile failed (%s: %s); continuing eager", type(e).__name__, str(e)[:200])

    def _jit_kernel(self, p: TensorParams, stats: Stats, c: Chunk, dtypes: aot.Dtypes) -> aot.Kernel:
        """`torch.compile` the method for these dtypes, traced once with the chunk length dynamic."""
        if self._jit is None:
            method = self.method

            def fused(
                base: torch.Tensor,
                models: list[torch.Tensor],
                p: TensorParams,
                stats: Stats,
                c: Chunk,
                out: torch.Tensor,
            ) -> None:
                # Writing into `out` inside the graph lets the kernel store its result straight into the
                # output block, in its dtype: 0.50 -> 0.35 ms per dare_ties chunk of 3 x 256K elements.
                out.copy_(aot.fused_apply(method, base, models, p, stats, c))

            self._jit = torch.compile(fused)
        fn = self._jit
        *ins, out_dtype = dtypes
        base, *models = (torch.zeros(aot.EXAMPLE_LEN, dtype=d) for d in ins)
        out = torch.empty(aot.EXAMPLE_LEN, dtype=out_dtype)
        for t in (base, *models, out):  # without this, the first shorter chunk recompiles (1.6 s here)
            torch._dynamo.maybe_mark_dynamic(t, 0)
        fn(base, models, p, stats, c.traceable(), out)

        def run(base: torch.Tensor, models: Sequence[torch.Tensor], c: Chunk, out: torch.Tensor) -> None:
            fn(base, list(models), p, stats, c.traceable(), out)

        return run


_Job = tuple[TensorParams, Stats, Chunk, "aot.Dtypes"]
