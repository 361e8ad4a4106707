"""The reused buffers of one run: the read slots that circulate between the reader thread and
the compute stage, the output blocks, the resident hold, and the `Mover` to the compute device.

Allocated once from the plan's `MemoryPlan` and reused for every block (a fresh float32 tensor
per block costs ~1.9 ns/element in page faults alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.device import Mover, PinnedBuffers, Staged
from engine.io.checkpoint import direct_buffer
from engine.plan import Plan
from engine.prefetch import Slot


@dataclass
class Pipeline:
    """The reused buffers of one run, and the mover that takes chunks to the compute device."""

    slots: list[Slot]
    outs: list[torch.Tensor]  # uint8 output blocks: one being filled, one being written
    mover: Mover
    pinned: PinnedBuffers
    resident: list[torch.Tensor]  # uint8 per input stream, on the compute device: a held tensor

    @classmethod
    def allocate(cls, plan: Plan, staged: bool | None = None) -> Pipeline:
        """Buffers for `plan`; `staged` (default: on CUDA) moves chunks through device staging
        buffers, page-locking the host buffers when the device is a GPU."""
        m = plan.memory
        dev = torch.device(plan.device.device)
        slots = [[direct_buffer(m.buffer_elems * b) for b in m.in_bytes_per_elem] for _ in range(m.depth)]
        outs = [torch.empty(m.buffer_elems * m.out_bytes_per_elem, dtype=torch.uint8) for _ in range(m.out_depth)]
        if staged if staged is not None else dev.type == "cuda":
            mover: Mover = Staged(dev, plan.device, m.in_bytes_per_elem, m.out_bytes_per_elem)
        else:  # float32 (chunk_elems,) per stream; separate tensors, never aliased
            mover = Mover([torch.empty(m.chunk_elems, dtype=torch.float32) for _ in m.in_bytes_per_elem], m.chunk_elems)
        resident = [torch.empty(b, dtype=torch.uint8, device=dev) for b in plan.resident]
        return cls(slots, outs, mover, PinnedBuffers(dev, [b for s in slots for b in s] + outs), resident)

    def close(self) -> None:
        self.pinned.close()
