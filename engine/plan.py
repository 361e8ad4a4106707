"""From headers alone, decide every block, every output offset and the memory it will take.

The plan is data: it allocates nothing and reads no tensor bytes, so `leanmerge plan` can show
exactly what a merge will do before it starts, and tests can assert the exact block list.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

from engine.budget import CHUNK_ELEMS, MemoryPlan, plan_memory
from engine.defaults import DEFAULT_SHARD_SIZE
from engine.device import DevicePlan
from engine.dtypes import MERGEABLE, itemsize
from engine.errors import SpecError
from engine.gradient import count_layers
from engine.io.inventory import Inventory
from engine.methods.base import TensorParams
from engine.spec import MergeSpec
from engine.vocab import Resized


@dataclass(frozen=True)
class Block:
    """A band of rows of one tensor; in row-major storage one contiguous byte range."""

    tensor: str
    r0: int
    r1: int
    start: int  # flat index of the block's first element: keys the random streams
    numel: int


@dataclass(frozen=True)
class TensorPlan:
    """How one output tensor is produced and where it goes."""

    name: str
    shape: tuple[int, ...]
    in_dtypes: tuple[str, ...]  # base first, then each model
    out_dtype: str
    merge: bool  # False: not a float tensor, copied from the base unchanged
    rows: int
    row_numel: int
    block_rows: int
    shard: int  # index into Plan.shards
    offset: int  # byte offset inside the shard's data section
    passes: int = 1  # reduce passes + the apply pass
    reads_base: bool = True  # False: the method ignores the base's values (`Method.uses_base`)
    resident: bool = False  # read once and held whole on the compute device for every pass
    folds_ahead: bool = False  # the last reduce pass may run on the apply pass's reads (`Reducer.folds_ahead`)
    skippable: tuple[int, ...] = ()  # reduce passes (0 is the first) that may find nothing to count (`Reducer.needed`)

    def scans(self, first_row: int | None = 0) -> int:
        """Reduce passes that read the whole tensor before its apply pass from `first_row`: all
        but a last one that folds ahead of the merge, which it does from row 0 (None: the
        statistics are computed apart from the merge, by another process, and read every pass)."""
        return self.passes - 1 - (self.folds_ahead and self.passes > 1 and first_row == 0)

    def fewest_scans(self, first_row: int | None = 0) -> int:
        """`scans` less those of passes that may be skipped: known only once the passes before them
        have run (`Reducer.needed`)."""
        scans = self.scans(first_row)
        return scans - sum(i < scans for i in self.skippable)

    def reads(self, first_row: int | None = 0) -> int:
        """Times at most the tensor's bytes are read (`scans`' `first_row`): once per scan and once
        to merge, or once if it fits one block or is held resident."""
        return 1 if self.read_once else self.scans(first_row) + 1

    def fewest_reads(self, first_row: int | None = 0) -> int:
        """`reads` where every pass that may be skipped is."""
        return 1 if self.read_once else self.fewest_scans(first_row) + 1

    @property
    def read_once(self) -> bool:
        return self.n_blocks <= 1 or self.resident

    @property
    def resident_bytes(self) -> tuple[int, ...]:
        """Bytes per input stream (base first) that holding it resident takes."""
        return tuple(self.numel * itemsize(d) for d in self.in_dtypes)

    @property
    def streams(self) -> tuple[int, ...]:
        """The input streams read (0 is the base): only the base for a copy; only the models
        when the method ignores the base's values (a linear merge reads 3 files of 4)."""
        if not self.merge:
            return (0,)
        return tuple(range(0 if self.reads_base else 1, len(self.in_dtypes)))

    @property
    def read_dtypes(self) -> tuple[str, ...]:
        """The dtypes of the streams actually read (`streams`)."""
        return tuple(self.in_dtypes[i] for i in self.streams)

    @property
    def numel(self) -> int:
        return self.rows * self.row_numel if self.shape else 1

    @property
    def out_nbytes(self) -> int:
        return self.numel * itemsize(self.out_dtype)

    @property
    def scan_bytes(self) -> int:
        """What one read of the whole tensor reads: every stream read."""
        return self.numel * sum(itemsize(d) for d in self.read_dtypes)

    @property
    def bytes_read(self) -> int:
        """What merging this tensor reads at most: every pass over every stream read."""
        return self.reads() * self.scan_bytes

    @property
    def n_blocks(self) -> int:
        return -(-self.rows // self.block_rows) if self.numel else 0

    def blocks(self, first_row: int = 0) -> Iterator[Block]:
        """The row bands from `first_row` on, in order; derived on demand (a 70B model has
        millions of them). A resumed tensor starts at its first unwritten row."""
        if not self.numel:
            return
        for r0 in range(first_row, self.rows, self.block_rows):
            r1 = min(r0 + self.block_rows, self.rows)
            yield Block(self.name, r0, r1, r0 * self.row_numel, (r1 - r0) * self.row_numel)


def hold_resident(
    tensors: Sequence[TensorPlan], room: int, min_passes: int = 2
) -> tuple[tuple[TensorPlan, ...], tuple[int, ...]]:
    """Mark resident the tensors read `min_passes` times or more (`TensorPlan.reads`), in several
    blocks, that fit `room` bytes together with the others marked: one buffer per input stream,
    reused tensor after tensor, so what counts is each stream's largest. Smallest first, so that
    as many tensors as possible skip re-reads.

    Returns:
        The tensors (in their order) and the bytes of each stream's resident buffer.
    """
    n = max((len(t.in_dtypes) for t in tensors), default=0)
    held = [0] * n
    chosen: set[str] = set()
    candidates = [
        t for t in tensors if t.merge and t.reads_base and t.scans() + 1 >= max(min_passes, 2) and t.n_blocks > 1
    ]
    for t in sorted(candidates, key=lambda t: sum(t.resident_bytes)):
        grown = [max(h, b) for h, b in zip(held, t.resident_bytes)]
        if sum(grown) > room:
            break
        held, chosen = grown, chosen | {t.name}
    return tuple(replace(t, resident=t.name in chosen) for t in tensors), tuple(held)


@dataclass(frozen=True)
class ShardPlan:
    """One output file: its name, tensors in write order and data size."""

    file: str
    tensors: tuple[str, ...]
    data_bytes: int


@dataclass(frozen=True)
class Plan:
    spec: MergeSpec
    tensors: tuple[TensorPlan, ...]
    shards: tuple[ShardPlan, ...]
    memory: MemoryPlan
    n_layers: int = 0  # numbered layers of the base: positions for parameter gradients
    resized: tuple[Resized, ...] = ()  # embedding-like tensors whose rows differ (engine.vocab)
    device: DevicePlan = DevicePlan("cpu", CHUNK_ELEMS, 0, 0)  # where chunks are computed (`prepare` plans CUDA)
    resident: tuple[int, ...] = ()  # bytes per input stream held for resident tensors, on the device
    params: Mapping[str, TensorParams] = field(default_factory=dict)  # per tensor, where they vary

    def with_resident(self, room: int, min_passes: int = 2) -> Plan:
        """This plan with the tensors that fit `room` bytes held resident (see `hold_resident`)."""
        tensors, held = hold_resident(self.tensors, room, min_passes)
        return replace(self, tensors=tensors, resident=held if any(held) else ())

    def params_for(self, name: str) -> TensorParams:
        """The method parameters of tensor `name` (they vary with gradients and filters)."""
        p = self.params.get(name)
        return p if p is not None else self.spec.tensor_params(name, self.n_layers)

    @property
    def bytes_read(self) -> int:
        return sum(t.bytes_read for t in self.tensors)

    @property
    def bytes_written(self) -> int:
        return sum(s.data_bytes for s in self.shards)

    @property
    def n_blocks(self) -> int:
        return sum(t.n_blocks for t in self.tensors)


def make_plan(
    spec: MergeSpec,
    inv: Inventory,
    *,
    budget: int,
    baseline: int,
    block_bytes: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    device_reserve: int = 0,
) -> Plan:
    """Plan the merge of `inv` by `spec` under a whole-process RSS `budget`.

    Args:
        spec: the validated merge description.
        inv: the opened, homology-checked checkpoints.
        budget: peak RSS ceiling in bytes; `baseline` is the RSS already in use.
        block_bytes: fixed block size per input stream (tuning, tests); default from the budget.
        shard_size: largest output shard in bytes (a bigger tensor gets a shard of its own).
        device_reserve: host memory the compute device takes after the baseline was measured.
    Raises:
        BudgetError: the budget cannot hold one row of the widest tensor.
    """
    sources = (inv.base, *inv.models)
    names = list(inv.base.tensors)
    in_dtypes = {
        n: inv.resized[n].dtypes if n in inv.resized else tuple(c.tensors[n].dtype for c in sources) for n in names
    }
    shapes = {n: out_shape(inv, n) for n in names}
    out_dtypes = {n: _out_dtype(spec, inv.base.tensors[n].dtype) for n in names}
    memory = plan_memory(
        budget,
        baseline,
        tuple(max((itemsize(in_dtypes[n][i]) for n in names), default=1) for i in range(len(sources))),
        max((itemsize(d) for d in out_dtypes.values()), default=1),
        max((inv.base.tensors[n].row_numel for n in names), default=1),
        block_bytes,
        spec.method_impl.row_aligned,
        max((math.prod(shapes[n]) for n in names), default=1),
        device_reserve,
    )
    n_layers = count_layers(names)
    params = (
        {n: spec.tensor_params(n, n_layers, _sources(spec, inv, n)) for n in names} if spec.varies_by_tensor else {}
    )
    for n, p in params.items():
        try:
            spec.method_impl.validate(p)
        except SpecError as e:
            raise SpecError(f"tensor {n!r}: {e}") from None
    reducers = {n: spec.method_impl.reducers(params.get(n) or spec.tensor_params()) for n in names}
    layout = _shard_layout([(n, math.prod(shapes[n]) * itemsize(out_dtypes[n])) for n in names], shard_size)
    tensors = []
    for n in names:
        info = inv.base.tensors[n]
        shard, offset = layout[n]
        tensors.append(
            TensorPlan(
                name=n,
                shape=shapes[n],
                in_dtypes=in_dtypes[n],
                out_dtype=out_dtypes[n],
                merge=info.dtype in MERGEABLE,
                rows=shapes[n][0] if shapes[n] else 1,
                row_numel=info.row_numel,
                block_rows=max(1, memory.block_elems // max(info.row_numel, 1)),
                shard=shard,
                offset=offset,
                passes=1 + len(reducers[n]) if info.dtype in MERGEABLE else 1,
                folds_ahead=info.dtype in MERGEABLE and bool(reducers[n]) and reducers[n][-1].folds_ahead,
                skippable=tuple(i for i, r in enumerate(reducers[n]) if r.skippable) if info.dtype in MERGEABLE else (),
                reads_base=spec.method_impl.uses_base,
            )
        )
    resized = tuple(inv.resized.values())
    cpu = DevicePlan("cpu", memory.chunk_elems, 0, 0)
    return Plan(spec, tuple(tensors), _shards(tensors), memory, n_layers, resized, cpu, params=params)


def _sources(spec: MergeSpec, inv: Inventory, name: str) -> tuple[str, ...]:
    """The tensor each input reads for output tensor `name` (base first), where slices move
    layers; () when every input reads `name` itself."""
    return tuple(c.tensors[name].name for c in (inv.base, *inv.models)) if spec.slices else ()


def out_shape(inv: Inventory, name: str) -> tuple[int, ...]:
    """The base's shape, with the vocabulary policy's row count for resized tensors."""
    shape = inv.base.tensors[name].shape
    rz = inv.resized.get(name)
    return (rz.out_rows, *shape[1:]) if rz is not None else shape


def _out_dtype(spec: MergeSpec, base_dtype: str) -> str:
    return spec.out_dtype if spec.out_dtype and base_dtype in MERGEABLE else base_dtype


def _shard_layout(sizes: list[tuple[str, int]], shard_size: int) -> dict[str, tuple[int, int]]:
    """Greedy packing in order: tensor -> (shard index, offset); a shard closes when full."""
    layout: dict[str, tuple[int, int]] = {}
    shard, used = 0, 0
    for name, nbytes in sizes:
        if used and used + nbytes > shard_size:
            shard, used = shard + 1, 0
        layout[name] = (shard, used)
        used += nbytes
    return layout


def _shards(tensors: list[TensorPlan]) -> tuple[ShardPlan, ...]:
    count = max((t.shard for t in tensors), default=0) + 1
    groups: list[list[TensorPlan]] = [[] for _ in range(count)]
    for t in tensors:
        groups[t.shard].append(t)
    return tuple(
        ShardPlan(shard_file_name(i, count), tuple(t.name for t in g), sum(t.out_nbytes for t in g))
        for i, g in enumerate(groups)
    )


def shard_file_name(i: int, count: int) -> str:
    """Hugging Face naming; a single shard is plain `model.safetensors`."""
    return "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
