"""The output checksum gives zlib's values whichever backend computes it (journals and
`verify` records written with one must check with the other)."""

from __future__ import annotations

import sys
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.io import crc


@given(st.binary(max_size=5000), st.integers(0, 2**32 - 1))
def test_crc32_equals_zlib(data: bytes, start: int) -> None:
    assert crc.crc32(data, start) == zlib.crc32(data, start)
    assert crc.crc32(data) == zlib.crc32(data)


def test_running_value_over_pieces_equals_whole() -> None:
    data = bytes(range(256)) * 4099
    running = 0
    for i in range(0, len(data), 7919):
        running = crc.crc32(memoryview(data)[i : i + 7919], running)
    assert running == zlib.crc32(data)


def test_zlib_when_isal_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "isal", None)  # makes `import isal` fail
    assert crc._pick() is zlib.crc32
