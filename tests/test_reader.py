"""Row reads: O_DIRECT reads (aligned around the rows, into aligned buffers) return exactly the
bytes buffered reads do, at any offset, up to the end of the file; buffers that cannot take them
fall back to buffered reads."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from engine.io.checkpoint import ALIGN, BUFFERED, Reader, ReadOptions, direct_buffer, open_checkpoint

from conftest import write_checkpoint

DIRECT = ReadOptions(direct=True)


def odd_checkpoint(folder: Path) -> Path:
    """Tensors whose byte offsets and lengths are not multiples of 4096; reads of the last one's
    last rows hit the end of the file mid-page."""
    g = torch.Generator().manual_seed(3)
    tensors = {
        "a": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b": torch.randn(1000, 37, generator=g),
        "c": torch.randn(4099, generator=g).to(torch.float16),
        "z": torch.randn(517, 13, generator=g).to(torch.bfloat16),
    }
    return write_checkpoint(folder, tensors)


def direct_supported(folder: Path) -> bool:
    try:
        os.close(os.open(folder / "model.safetensors", os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


def test_direct_reads_equal_buffered_reads(tmp_path: Path) -> None:
    ckpt = open_checkpoint(odd_checkpoint(tmp_path / "m"))
    rng = random.Random(0)
    buf = direct_buffer(1 << 20)
    with Reader(ckpt, DIRECT) as direct, Reader(ckpt, BUFFERED) as plain:
        assert bool(direct._direct) == direct_supported(tmp_path / "m")
        for name, info in ckpt.tensors.items():
            cases = [(0, info.rows), (info.rows - 1, info.rows)]
            cases += [tuple(sorted(rng.sample(range(info.rows + 1), 2))) for _ in range(20)]
            for r0, r1 in cases:
                got = direct.read_rows(name, r0, r1, out=buf)
                want = plain.read_rows(name, r0, r1)
                assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
                if got.numel():
                    offset = got.data_ptr() - buf.data_ptr()
                    assert 0 <= offset < ALIGN


def test_buffers_that_cannot_take_a_direct_read_are_read_buffered(tmp_path: Path) -> None:
    ckpt = open_checkpoint(odd_checkpoint(tmp_path / "m"))
    with Reader(ckpt, DIRECT) as direct, Reader(ckpt) as plain:
        want = plain.read_rows("b", 10, 200)
        misaligned = direct_buffer(1 << 20)[64:]
        tight = direct_buffer(190 * 37 * 4)[: 190 * 37 * 4]
        for out in (misaligned, tight, None):
            got = direct.read_rows("b", 10, 200, out=out)
            assert torch.equal(got, want)
            if out is not None:
                assert got.data_ptr() == out.data_ptr()  # read in place, from the buffer's start


def test_truncated_file_is_an_error_either_way(tmp_path: Path) -> None:
    from engine.errors import CheckpointError

    folder = odd_checkpoint(tmp_path / "m")
    ckpt = open_checkpoint(folder)
    f = folder / "model.safetensors"
    os.truncate(f, f.stat().st_size - 100)
    last = max(ckpt.tensors.values(), key=lambda t: t.offset + t.nbytes)
    for options in (DIRECT, BUFFERED):
        with Reader(ckpt, options) as r, pytest.raises(CheckpointError, match="ends past the end of the file"):
            r.read_rows(last.name, 0, last.rows, out=direct_buffer(last.nbytes))


def test_tensor_at_an_odd_offset_is_read_buffered(tmp_path: Path) -> None:
    """Valid safetensors need not align tensors to their itemsize: such a tensor cannot be a
    view at its offset into an aligned buffer, so it is read buffered, to the same bytes."""
    import json
    import struct

    folder = tmp_path / "m"
    folder.mkdir()
    header = {"a": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}}
    header["b"] = {"dtype": "F32", "shape": [3, 2], "data_offsets": [2, 26]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    values = torch.arange(6, dtype=torch.float32)
    data = b"\x01\x02" + values.numpy().tobytes()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    ckpt = open_checkpoint(folder)
    with Reader(ckpt, DIRECT) as r:
        assert torch.equal(r.read_rows("b", 1, 3, out=direct_buffer(1 << 12)), values.view(3, 2)[1:])
