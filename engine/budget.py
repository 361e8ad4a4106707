"""The one owner of the byte budget: how many elements a block may hold, and what RSS to expect.

The whole process must stay under `--max-memory` (peak RSS). What we cannot shrink is counted
first: the interpreter and torch as measured at start (`baseline`), a fixed `RESERVE` for the
allocator, threads and Python objects, and the float32 `workspace` the compute stage reuses for
every cache-sized chunk. What is left pays for the block buffers: every input stream's block in
its storage dtype, `depth` times over (one being computed, the rest prefetched), plus `out_depth`
output blocks (one being filled, one being written). No other module sizes a buffer.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from pathlib import Path

import psutil

from engine.cgroup import group_dirs, read_text
from engine.errors import BudgetError

log = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30
CHUNK_ELEMS = 1 << 18  # compute sub-chunk: 1 MiB per float32 array, stays in L2
WORK_ARRAYS = 8  # float32 temporaries a method may hold per chunk besides its inputs
RESERVE = 48 * MiB  # allocator slack, reader thread, Python objects (measured in bench/)
MAX_STREAM_BYTES = 32 * MiB  # larger reads are no faster (DESIGN.md) and only cost RSS
# Input buffer sets: one being merged, two being filled. With two, the reader often idled
# waiting for the merge and then the merge for the reader (dare_ties, 10.2 GB cold: 13.8 s -> 12.3 s).
DEPTH = 3
OUT_DEPTH = 2  # output buffers: one being filled, one being written


@dataclass(frozen=True)
class MemoryPlan:
    """How the budget is spent. Sizes in bytes; `block_elems` is the largest block's elements."""

    budget: int
    baseline: int
    workspace: int
    block_elems: int  # target elements per block; a block is never less than one row
    buffer_elems: int  # max(block_elems, widest row): what each buffer must hold
    in_bytes_per_elem: tuple[int, ...]  # per input stream (base first), widest dtype it reads
    out_bytes_per_elem: int
    chunk_elems: int = CHUNK_ELEMS  # float32 workspace width: a cache-sized chunk, or one row
    depth: int = DEPTH
    out_depth: int = OUT_DEPTH
    reserve: int = RESERVE  # fixed allowance: allocator, threads, Python objects (and what a device loads later)
    resident: int = 0  # tensors held whole for their passes (`Plan.with_resident`), when on the CPU

    @property
    def buffers(self) -> int:
        return self.buffer_elems * (sum(self.in_bytes_per_elem) * self.depth + self.out_bytes_per_elem * self.out_depth)

    @property
    def predicted_peak(self) -> int:
        return self.baseline + self.reserve + self.workspace + self.buffers + self.resident


def plan_memory(
    budget: int,
    baseline: int,
    in_bytes_per_elem: tuple[int, ...],
    out_bytes_per_elem: int,
    max_row_elems: int,
    block_bytes: int | None = None,
    row_aligned: bool = False,
    max_numel: int | None = None,
    extra_reserve: int = 0,
) -> MemoryPlan:
    """Choose the block size (in elements) that fits `budget`.

    Args:
        budget: whole-process peak RSS ceiling in bytes.
        baseline: RSS of this process before any block buffer exists.
        in_bytes_per_elem: per input stream, bytes per element of its widest tensor.
        out_bytes_per_elem: bytes per element of the widest output dtype.
        max_row_elems: elements in the widest row; a block holds at least one row.
        block_bytes: user override of one stream's block size (`--block-size`).
        row_aligned: compute chunks hold whole rows, so the workspace holds at least one row.
        max_numel: elements of the largest tensor: no block needs more.
        extra_reserve: memory kept for what a CUDA device loads later
            (`engine.device.CUDA_HOST_RESERVE`).
    Raises:
        BudgetError: the budget cannot hold one row; the message gives the minimum.
    """
    chunk_elems = max(CHUNK_ELEMS, max_row_elems) if row_aligned else CHUNK_ELEMS
    workspace = chunk_elems * 4 * (len(in_bytes_per_elem) + WORK_ARRAYS)
    per_elem = sum(in_bytes_per_elem) * DEPTH + out_bytes_per_elem * OUT_DEPTH
    fixed = baseline + RESERVE + workspace + extra_reserve
    widest = max(in_bytes_per_elem)
    cap = max(1, (block_bytes if block_bytes is not None else MAX_STREAM_BYTES) // widest)
    fits = (budget - fixed) // per_elem
    minimum = fixed + max_row_elems * per_elem
    if fits < max_row_elems:
        raise BudgetError(
            f"--max-memory {fmt_bytes(budget)} cannot hold one row of the widest tensor "
            f"({max_row_elems} elements x {per_elem} bytes for all buffers) on top of "
            f"{fmt_bytes(fixed)} already in use; the minimum for this merge is {fmt_bytes(minimum)}"
        )
    block_elems = min(fits, cap, max(max_numel or fits, 1))
    buffer_elems = max(block_elems, max_row_elems)
    return MemoryPlan(
        budget,
        baseline,
        workspace,
        block_elems,
        buffer_elems,
        in_bytes_per_elem,
        out_bytes_per_elem,
        chunk_elems,
        reserve=RESERVE + extra_reserve,
    )


def current_rss() -> int:
    """This process's resident set size now, in bytes."""
    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """The highest RSS this process has had, in bytes.

    VmHWM (Linux) is this process image's own high-water mark; `ru_maxrss` would also carry the
    peak of whatever process exec'd us (a notebook, a 2 GB launcher). The kernel updates the
    mark lazily, so it can trail the current RSS slightly.
    """
    try:
        with open("/proc/self/status") as f:
            hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(hwm, current_rss())


# Of a cgroup's memory limit, what the default budget takes: the rest is for page cache the
# cgroup is charged for (written shards' dirty pages until they are synced) and other processes.
CGROUP_SHARE = 0.75
CGROUP_NO_LIMIT = 1 << 62  # v1 writes "no limit" as 2**63 - 1 rounded down to a page


def choose_budget(max_memory: int | None, root: Path | None = None) -> int:
    """`max_memory`, or the default budget; warns (one line) when `max_memory` exceeds what the
    machine or this process's cgroup can give."""
    if max_memory is None:
        return default_budget(root)
    limit = cgroup_limit(root)
    available = psutil.virtual_memory().available
    if limit is not None and max_memory > limit:
        log.warning(
            "--max-memory %s exceeds this process's cgroup memory limit (%s): the kernel kills the merge "
            "before it reaches the budget; the default plans within the limit",
            fmt_bytes(max_memory),
            fmt_bytes(limit),
        )
    elif max_memory > available:
        log.warning("--max-memory %s exceeds the RAM available now (%s)", fmt_bytes(max_memory), fmt_bytes(available))
    return max_memory


def default_budget(root: Path | None = None) -> int:
    """Half of the RAM available now (room for the page cache and other jobs), and never more
    than `CGROUP_SHARE` of this process's cgroup memory limit nor half the address space
    `RLIMIT_AS` leaves (`root`: where /proc and /sys are; tests fake them)."""
    budget = int(psutil.virtual_memory().available // 2)
    limit = cgroup_limit(root)
    if limit is not None:
        budget = min(budget, int(limit * CGROUP_SHARE))
    room = address_space_room()
    if room is not None:
        budget = min(budget, current_rss() + room // 2)
    return budget


def cgroup_limit(root: Path | None = None) -> int | None:
    """The tightest memory limit on this process from its cgroups (v2 `memory.max`, v1
    `memory.limit_in_bytes`), its own group's or an ancestor's; None where there is none."""
    limits: list[int] = []
    for version, folder in group_dirs("memory", root):
        text = read_text(folder, "memory.max" if version == 2 else "memory.limit_in_bytes")
        if text is not None and text.isdigit() and int(text) < CGROUP_NO_LIMIT:  # v2 writes "max" for none
            limits.append(int(text))
    return min(limits, default=None)


def address_space_room() -> int | None:
    """Bytes of address space `RLIMIT_AS` (ulimit -v) still allows this process; None if unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(0, soft - int(psutil.Process().memory_info().vms))


# Decimal and binary byte units; a bare K, M or B is mergekit's thousand, million, billion
# (`--out-shard-size 5B` is five billion bytes there), so a byte count is written without a unit.
UNITS = {
    "": 1,
    "B": 10**9,
    "K": 10**3,
    "KB": 10**3,
    "M": 10**6,
    "MB": 10**6,
    "G": 10**9,
    "GB": 10**9,
    "T": 10**12,
    "TB": 10**12,
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
    "TIB": 1 << 40,
}


SIZE_FORMS = "bytes (1000000), decimal (5GB, 500M, mergekit's 5B = 5e9) or binary units (1GiB, 512MiB)"


def parse_bytes(text: str) -> int:
    """`1GiB`, `512MiB`, `5GB`, `1.5G`, mergekit's `5B` (5e9) or a plain byte count -> bytes."""
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num) :]
    try:
        value = float(num) * UNITS[unit]
    except (KeyError, ValueError):
        raise ValueError(f"cannot read {text!r} as a size; write {SIZE_FORMS}") from None
    if not 0 < value < float("inf"):
        raise ValueError(f"size {text!r} must be a positive number; write {SIZE_FORMS}")
    return int(value)


def fmt_bytes(n: float) -> str:
    """Bytes for people: binary units, three significant digits (whole units from 100 up: 1000
    MiB is "1000 MiB", not "1e+03 MiB")."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" or abs(n) >= 100 else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
