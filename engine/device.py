"""Where the arithmetic runs: on the CPU, straight out of the read buffers, or on a CUDA device
fed through pinned host buffers and three streams.

The executor is the same for both. It hands a `Mover` each chunk's raw input views (storage
dtype, in host buffers) and gets back float32 work tensors on the compute device; it hands the
method's result back with the host view it belongs in. On CUDA (`Staged`):

- the host block buffers are page-locked in place (`cudaHostRegister`), so they stay the exact
  size the RAM budget counted and keep the alignment O_DIRECT needs (torch's pinned allocator
  would round each up to a power of two, all of it resident);
- a copy-in stream moves chunk i+1's raw bytes into one of two device staging sets while the
  compute stream casts and merges chunk i, and a copy-out stream brings chunk i-1's result
  back; events order them, so the CPU thread only waits when a host buffer must be given back
  (its inputs all copied in) and the writer thread waits for a block's last copy out;
- chunks are large (up to `DEVICE_CHUNK_ELEMS`), sized by `--max-gpu-memory` the way blocks are
  sized by `--max-memory` (`plan_device`).

The arithmetic is the methods' own torch code on the device's tensors, and the keyed DARE
masks use int32 operations that give the same bits on both, so the output bytes match the CPU's
wherever the operations are correctly rounded on both (add, multiply, divide, sqrt); others
(slerp's trigonometry) may differ in the last place, which `bench/gpu_check.py` counts.

`Staged` also runs on the CPU (no streams or events there): the tests drive the whole staging
path through it without a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from engine.budget import WORK_ARRAYS, MemoryPlan, MiB, fmt_bytes
from engine.errors import BudgetError, SpecError

log = logging.getLogger(__name__)

DEVICE_CHUNK_ELEMS = 1 << 24  # 64 MiB per float32 array: launch overhead is ~1% at this size
DEFAULT_GPU_FRACTION = 0.8  # of the device memory free at start, when --max-gpu-memory is not given
GPU_RESERVE = 64 * MiB  # the caching allocator's rounding and the methods' small tensors
# Host RAM a CUDA merge takes after the context exists: torch loads each kernel's module on first
# use. Measured on an H200 (torch 2.11+cu130) over the planned peak: linear +4 MiB, dare_ties
# +101 MiB, ties +232 MiB.
CUDA_HOST_RESERVE = 256 * MiB
STAGES = 2  # device staging sets per direction: one being copied while the other is used


def resolve_device(text: str = "auto") -> torch.device:
    """`--device` as a torch device: auto (CUDA when present, else CPU), cpu, cuda or cuda:N.

    Raises:
        SpecError: an unknown device, CUDA asked for where there is none, or no such index.
    """
    want = text.strip().lower()
    if want == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(want)
    except RuntimeError:
        raise SpecError(f"--device {text!r}: write auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise SpecError(f"--device {text!r}: leanmerge computes on cpu or cuda, not {dev.type}")
    if not torch.cuda.is_available():
        why = (
            f"this torch ({torch.__version__}) was built without CUDA"
            if torch.version.cuda is None
            else "torch finds no CUDA device (driver, CUDA_VISIBLE_DEVICES?)"
        )
        raise SpecError(f"--device {text}: {why}; use --device cpu, or auto to take CUDA only where it is")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= count:
        raise SpecError(f"--device {text}: this machine has {count} CUDA device(s): cuda:0 .. cuda:{count - 1}")
    return torch.device("cuda", index)


def start_device(dev: torch.device) -> None:
    """Create the CUDA context now, so that the RSS it adds (hundreds of MiB on the host) is in
    the baseline the RAM budget is planned from, not a surprise in the middle of the merge."""
    if dev.type == "cuda":
        torch.empty(1, device=dev)
        torch.cuda.reset_peak_memory_stats(dev)


@dataclass(frozen=True)
class DevicePlan:
    """How the device memory is spent: `chunk_elems` elements per chunk, staged `STAGES` deep."""

    device: str  # "cpu", "cuda:0", ...
    chunk_elems: int
    budget: int  # bytes of device memory the merge may hold (0 on the CPU: the RAM plan covers it)
    predicted_peak: int


def device_bytes_per_elem(in_bytes_per_elem: tuple[int, ...], out_bytes_per_elem: int) -> int:
    """Device bytes per chunk element: raw staging both ways, and the float32 work arrays (one
    per input stream plus the temporaries a method may hold, as on the CPU)."""
    return STAGES * (sum(in_bytes_per_elem) + out_bytes_per_elem) + 4 * (len(in_bytes_per_elem) + WORK_ARRAYS)


def plan_device(dev: torch.device, budget: int | None, memory: MemoryPlan, max_numel: int) -> DevicePlan:
    """Choose the device chunk that fits `budget` bytes of device memory.

    Args:
        dev: the compute device; on the CPU the RAM plan's chunk stands and this only records it.
        budget: `--max-gpu-memory`; None takes `DEFAULT_GPU_FRACTION` of the memory free now.
        memory: the RAM plan: streams, dtypes, and its chunk, the smallest a device chunk may be
            (it holds a whole row for row-aligned methods).
        max_numel: elements of the largest tensor: no chunk needs more.
    Raises:
        BudgetError: the budget cannot hold the smallest chunk; the message gives the minimum.
    """
    floor = memory.chunk_elems
    if dev.type != "cuda":
        return DevicePlan(str(dev), floor, 0, 0)
    flag = "--max-gpu-memory"
    if budget is None:
        free, _ = torch.cuda.mem_get_info(dev)
        budget, flag = int(free * DEFAULT_GPU_FRACTION), f"{DEFAULT_GPU_FRACTION:.0%} of the free GPU memory"
    per_elem = device_bytes_per_elem(memory.in_bytes_per_elem, memory.out_bytes_per_elem)
    fits = (budget - GPU_RESERVE) // per_elem
    if fits < floor:
        raise BudgetError(
            f"{flag} ({fmt_bytes(budget)}) cannot hold one chunk of {floor} elements on {dev} "
            f"({per_elem} bytes each, plus {fmt_bytes(GPU_RESERVE)}); the minimum for this merge is "
            f"{fmt_bytes(GPU_RESERVE + floor * per_elem)}"
        )
    chunk = max(floor, min(fits, DEVICE_CHUNK_ELEMS, max(max_numel, 1)))
    return DevicePlan(str(dev), chunk, budget, GPU_RESERVE + chunk * per_elem)


def peak_device_memory(dev: torch.device) -> int:
    """Bytes of device memory the merge held at most (what the caching allocator reserved)."""
    return int(torch.cuda.max_memory_reserved(dev)) if dev.type == "cuda" else 0


# --------------------------------------------------------------------------- page-locked host buffers


class PinnedBuffers:
    """Page-locks host tensors in place for as long as it is open (a no-op off CUDA).

    A buffer that cannot be locked (no rights, a driver limit) still works: its copies are
    synchronous instead of overlapped, which `pinned` counts for the report.
    """

    def __init__(self, dev: torch.device, buffers: list[torch.Tensor]) -> None:
        self._ptrs: list[int] = []
        self.failed = 0
        if dev.type != "cuda":
            return
        cudart: Any = torch.cuda.cudart()  # type: ignore[no-untyped-call]
        seen: set[int] = set()
        for b in buffers:
            storage = b.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
            if ptr in seen or size == 0:
                continue
            seen.add(ptr)
            try:
                locked = _ok(cudart.cudaHostRegister(ptr, size, 0))
            except (AttributeError, RuntimeError, TypeError):  # a torch without the binding
                locked = False
            if locked:
                self._ptrs.append(ptr)
            else:
                self.failed += 1
        if self.failed:
            log.warning(
                "%d host buffer(s) could not be page-locked: their copies to %s will not overlap", self.failed, dev
            )

    @property
    def locked(self) -> int:
        """How many buffers are page-locked now."""
        return len(self._ptrs)

    def close(self) -> None:
        if self._ptrs:
            torch.cuda.synchronize()
            cudart: Any = torch.cuda.cudart()  # type: ignore[no-untyped-call]
            for ptr in self._ptrs:
                cudart.cudaHostUnregister(ptr)
            self._ptrs = []


def _ok(code: Any) -> bool:
    """cudart calls return an error enum (or a tuple starting with one); 0 is success."""
    first: Any = code[0] if isinstance(code, tuple) else code
    value: Any = getattr(first, "value", first)
    return int(value) == 0


# --------------------------------------------------------------------------- movers


class Mover:
    """The CPU path: chunks are cast straight from the read buffers into a float32 workspace and
    the result is cast straight into the output buffer. Nothing to wait for."""

    # The compute may read the read buffers and write the output buffer itself (the C paths:
    # `Reducer.raw_chunk`, `engine.methods.steps.fused`) instead of going through `to_work`.
    reads_host = True

    def __init__(self, work: list[torch.Tensor], chunk_elems: int) -> None:
        self.work = work
        self.chunk_elems = chunk_elems
        self.device = torch.device("cpu")

    def to_work(self, raw: list[torch.Tensor], reads_base: bool) -> list[torch.Tensor]:
        """Float32 copies of the chunk views `raw` (base first); a base that was not read is not
        copied (its workspace keeps whatever it held)."""
        work = [w[: raw[0].numel()] for w in self.work]
        first = 0 if reads_base else 1
        for w, x in zip(work[first:], raw[first:]):
            w.copy_(x)
        return work

    def store(self, result: torch.Tensor, out: torch.Tensor) -> None:
        """Put a chunk's float32 result into `out`, a view of a host output buffer."""
        out.copy_(result)

    def upload(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy raw block data `src` (a read buffer's view) into `dst` (a resident buffer's)."""
        dst.copy_(src)

    def inputs_done(self) -> None:
        """Return once every chunk handed to `to_work` has left the host buffers."""

    def outputs_ready(self) -> torch.cuda.Event | None:
        """What the writer must wait for before the stored chunks are in the host buffer."""
        return None


class Staged(Mover):
    """Chunks go through device staging buffers (see the module docstring); on CUDA with streams
    and events, on the CPU with plain copies (for tests)."""

    reads_host = False

    def __init__(self, dev: torch.device, plan: DevicePlan, in_bytes: tuple[int, ...], out_bytes: int) -> None:
        n = plan.chunk_elems
        super().__init__([torch.empty(n, dtype=torch.float32, device=dev) for _ in in_bytes], n)
        self.device = dev
        self._in = [[torch.empty(n * b, dtype=torch.uint8, device=dev) for b in in_bytes] for _ in range(STAGES)]
        self._out = [torch.empty(n * out_bytes, dtype=torch.uint8, device=dev) for _ in range(STAGES)]
        self._cuda = dev.type == "cuda"
        self._copy_in = _stream(dev) if self._cuda else None
        self._copy_out = _stream(dev) if self._cuda else None
        self._compute = torch.cuda.current_stream(dev) if self._cuda else None
        self._in_free: list[torch.cuda.Event | None] = [None] * STAGES  # staging set i may be overwritten
        self._out_free: list[torch.cuda.Event | None] = [None] * STAGES
        self._turn_in = self._turn_out = 0
        self._last_in: torch.cuda.Event | None = None
        self._last_out: torch.cuda.Event | None = None

    def to_work(self, raw: list[torch.Tensor], reads_base: bool) -> list[torch.Tensor]:
        i, self._turn_in = self._turn_in, (self._turn_in + 1) % STAGES
        n = raw[0].numel()
        first = 0 if reads_base else 1
        with self._on(self._copy_in):
            self._wait(self._copy_in, self._in_free[i])
            staged = [s[: x.numel() * x.element_size()].view(x.dtype) for s, x in zip(self._in[i], raw)]
            for s, x in zip(staged[first:], raw[first:]):
                s.copy_(x, non_blocking=True)
            self._last_in = self._record(self._copy_in)
        self._wait(self._compute, self._last_in)
        work = [w[:n] for w in self.work]
        for w, s in zip(work[first:], staged[first:]):
            w.copy_(s)
        self._in_free[i] = self._record(self._compute)
        return work

    def store(self, result: torch.Tensor, out: torch.Tensor) -> None:
        j, self._turn_out = self._turn_out, (self._turn_out + 1) % STAGES
        self._wait(self._compute, self._out_free[j])
        staged = self._out[j][: out.numel() * out.element_size()].view(out.dtype)
        staged.copy_(result)
        cast = self._record(self._compute)
        with self._on(self._copy_out):
            self._wait(self._copy_out, cast)
            out.copy_(staged, non_blocking=True)
            self._out_free[j] = self._last_out = self._record(self._copy_out)

    def upload(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """On the copy-in stream, which also reads the resident buffers: no other ordering needed."""
        with self._on(self._copy_in):
            dst.copy_(src, non_blocking=True)
            self._last_in = self._record(self._copy_in)

    def inputs_done(self) -> None:
        if self._last_in is not None:
            self._last_in.synchronize()

    def outputs_ready(self) -> torch.cuda.Event | None:
        return self._last_out

    def _on(self, stream: torch.cuda.Stream | None) -> Any:
        return torch.cuda.stream(stream) if stream is not None else nullcontext()

    def _record(self, stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
        if stream is None:
            return None
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(stream)
        return event

    def _wait(self, stream: torch.cuda.Stream | None, event: torch.cuda.Event | None) -> None:
        if stream is not None and event is not None:
            stream.wait_event(event)


def _stream(dev: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(dev)  # type: ignore[no-untyped-call]


@contextmanager
def on_device(dev: torch.device) -> Iterator[None]:
    """Make `dev` the current CUDA device for the block of code (ops that allocate without a
    device argument then land there); nothing on the CPU."""
    with torch.cuda.device(dev) if dev.type == "cuda" else nullcontext():
        yield
