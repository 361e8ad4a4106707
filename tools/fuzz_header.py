"""Coverage-guided fuzzing of the safetensors header parser and reader with atheris.

    pip install atheris
    python tools/fuzz_header.py -atheris_runs=200000        # or -max_total_time=600

Every input is written as a file and parsed; anything but the engine's own CheckpointError
(HeaderError is one) is a crash that atheris reports with the input that caused it. The
hypothesis fuzz test in tests/test_header_fuzz.py runs a bounded version of this in CI.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from engine.errors import CheckpointError
    from engine.io.checkpoint import Checkpoint, Reader
    from engine.io.header import read_header

_DIR = Path(tempfile.mkdtemp(prefix="leanmerge-fuzz-"))
_FILE = _DIR / "model.safetensors"


def one_input(data: bytes) -> None:
    """Parse `data` as a safetensors file and read every tensor it declares."""
    _FILE.write_bytes(data)
    try:
        header = read_header(_FILE)
        ckpt = Checkpoint(_DIR, {t.name: t for t in header.tensors}, (_FILE,))
        with Reader(ckpt) as reader:
            for t in header.tensors:
                if t.nbytes <= 1 << 20:
                    reader.read_rows(t.name, 0, t.rows)
    except CheckpointError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    try:
        atheris.Fuzz()
    finally:
        _FILE.unlink(missing_ok=True)
        os.rmdir(_DIR)


if __name__ == "__main__":
    main()
