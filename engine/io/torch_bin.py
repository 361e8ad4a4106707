"""PyTorch `.bin` checkpoints as merge inputs, indexed without running code from them.

`pytorch_model.bin` (or the shards that `pytorch_model.bin.index.json` names) written by
`torch.save` since torch 1.6 is a zip archive, stored uncompressed: `*/data.pkl`, a pickle that
describes the tensors, and one record `*/data/<key>` of raw bytes per storage. The pickle is read
only by torch's weights-only unpickler (`torch.load(weights_only=True)`), which builds tensors,
dicts and plain values and refuses every other global (a `__reduce__` calling `os.system`): what
it refuses stays refused. With `mmap=True` each storage is a slice of one private mapping of the
whole file, and no tensor bytes are read.

The loaded tensors serve only for their layout. All storages are slices of one page-aligned
mapping, so a storage's address minus its record's file offset is the same for every storage: the
record offsets come from the zip's own directory (Python's `zipfile`), the shift is found from
the storages' addresses and sizes, and each match is checked by size and by the storage's first
bytes. Then the mapping is dropped (only those first bytes were touched) and each tensor becomes
a `TensorInfo` (dtype, shape, absolute offset), as a safetensors header gives them: the same
`Reader` then reads row blocks with `preadv` / O_DIRECT into reused buffers, so a `.bin` input
costs the RSS of a safetensors one and gives the same bytes.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
import zipfile
from pathlib import Path
from typing import IO, Any

import torch

from engine.dtypes import NAMES
from engine.errors import CheckpointError
from engine.io.header import Header, TensorInfo, short_repr

BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
CHECKED = 64  # first bytes of each storage compared between the mapping and the file
_RECORD = re.compile(r"^[^/]+/data/([^/]+)$")
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length
CONVERT = (
    "`python -c \"import torch, safetensors.torch as s; s.save_file(torch.load('{name}', weights_only=True), "
    "'model.safetensors')\"` in that folder"
)


def read_bin_header(path: Path) -> Header:
    """Index the tensors of the torch zip checkpoint `path` (a state dict), reading no tensor data.

    Raises:
        CheckpointError: naming `path` and what is wrong; the fix where there is one.
    """
    records = _records(path)
    state = _load_layout(path)
    infos = _tensor_infos(path, state, records)
    del state  # drops the mapping; of it only each storage's first bytes were touched
    infos.sort(key=lambda t: (t.offset, t.nbytes))
    return Header(path, tuple(infos), {}, 0)


def _records(path: Path) -> dict[int, int]:
    """Data offset -> size of each storage record, from the zip directory (before torch sees the
    file), after checking that the archive is one torch can map: a zip, stored, little-endian."""
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    if not zipped:
        raise CheckpointError(
            f"{path}: not a zip archive: a pickle in torch's legacy format (before torch 1.6), which leanmerge "
            f"never unpickles. Convert it once: {CONVERT.format(name=path.name)}"
        )
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
            size = os.fstat(f.fileno()).st_size
            order = [i for i in zf.infolist() if i.filename.endswith("/byteorder")]
            if order and zf.read(order[0]).strip() != b"little":
                raise CheckpointError(
                    f"{path}: big-endian storages ({order[0].filename}) cannot be read in place; convert it to "
                    "safetensors on the machine that wrote it"
                )
            return dict(_data_start(path, f, i, size) for i in zf.infolist() if _RECORD.match(i.filename))
    except (zipfile.BadZipFile, OSError, EOFError, struct.error) as e:
        raise CheckpointError(
            f"{path}: unreadable zip archive ({e}); re-download it or convert it to safetensors"
        ) from None


def _data_start(path: Path, f: IO[bytes], info: zipfile.ZipInfo, size: int) -> tuple[int, int]:
    """(offset of the first data byte, size) of the stored record `info`: its local header's
    name and extra field (torch pads the extra field to align the data) come first."""
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise CheckpointError(f"{path}: record {short_repr(info.filename)} is compressed; convert it to safetensors")
    f.seek(info.header_offset)
    sig, n_name, n_extra = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    start = info.header_offset + _LOCAL_HEADER.size + n_name + n_extra
    if sig != b"PK\x03\x04" or start + info.file_size > size:
        raise CheckpointError(f"{path}: record {short_repr(info.filename)} runs past the end of the file (truncated?)")
    return start, info.file_size


def _load_layout(path: Path) -> Any:
    """The state dict through torch's weights-only unpickler, every storage a slice of one
    private mapping of the file (nothing read).

    torch's loader is the one parser of untrusted pickle bytes here: whatever it raises (a
    refused global, a damaged archive) means the file is unusable, and becomes one line.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - see the docstring
        raise CheckpointError(
            f"{path}: refused by torch's weights-only loader ({_reason(e)}); leanmerge never runs code from a "
            "checkpoint. If you trust the file, re-save it as safetensors where it was made "
            "(`model.save_pretrained(DIR, safe_serialization=True)`)"
        ) from None


def _reason(e: Exception) -> str:
    """The telling line of a loader error: torch's message is a paragraph."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    line = next((ln for ln in lines if re.search(r"unsupported|GLOBAL|not an allowed", ln)), lines[0])
    return line if len(line) <= 200 else line[:197] + "..."


def _tensor_infos(path: Path, state: Any, records: dict[int, int]) -> list[TensorInfo]:
    """Each tensor's TensorInfo, its storage located in the file through `records`."""
    if not isinstance(state, dict) or not state:
        kind = type(state).__name__
        raise CheckpointError(f"{path}: holds a {kind}, not a state dict of tensors; convert it to safetensors")
    for name, t in state.items():
        _check_tensor(path, name, t)
    shift = _shift(path, [t.untyped_storage() for t in state.values()], records)
    size = os.path.getsize(path)
    return [_info(path, name, t, shift, size) for name, t in state.items()]


def _shift(path: Path, storages: list[torch.UntypedStorage], records: dict[int, int]) -> int:
    """The mapping's address minus file offset 0: the one shift, page-aligned, under which every
    storage is a whole record of its own size, and starts with that record's bytes."""
    spans = sorted({(s.data_ptr(), s.nbytes()): s for s in storages if s.nbytes()}.items())
    if not spans:
        return 0
    (ptr0, n0), _ = spans[0]
    for offset in sorted(o for o, n in records.items() if n == n0):
        shift = ptr0 - offset
        sizes_match = shift % mmap.PAGESIZE == 0 and all(records.get(p - shift) == n for (p, n), _ in spans)
        if sizes_match and _first_bytes_match(path, spans, shift):
            return shift
    raise CheckpointError(
        f"{path}: its storages do not match the archive's records (in size or first bytes); re-download it or "
        "convert it to safetensors"
    )


def _first_bytes_match(path: Path, spans: list[tuple[tuple[int, int], torch.UntypedStorage]], shift: int) -> bool:
    """Each storage's first `CHECKED` bytes, through the mapping, equal the file's at its place."""
    with open(path, "rb") as f:
        for (ptr, n), storage in spans:
            k = min(n, CHECKED)
            mapped = bytes(torch.empty(0, dtype=torch.uint8).set_(storage, 0, (k,), (1,)).tolist())
            if os.pread(f.fileno(), k, ptr - shift) != mapped:
                return False
    return True


def _check_tensor(path: Path, name: Any, t: Any) -> None:
    """A named, dense, row-major tensor of a dtype leanmerge reads."""
    if not isinstance(name, str) or not isinstance(t, torch.Tensor):
        raise CheckpointError(
            f"{path}: entry {short_repr(name)} is a {type(t).__name__}, not a named tensor; a model folder's "
            "weights file holds only tensors (convert it to safetensors keeping those)"
        )
    where = f"{path}: tensor {short_repr(name)}"
    if t.dtype not in NAMES:
        raise CheckpointError(
            f"{where}: dtype {t.dtype} is not one leanmerge reads (known: {', '.join(NAMES.values())})"
        )
    if t.layout != torch.strided or not t.is_contiguous():
        raise CheckpointError(
            f"{where}: stored as a {t.layout} tensor with strides {list(t.stride()) if t.layout == torch.strided else '-'}, "
            "not as row-major rows; convert it to safetensors (saving `tensor.contiguous()`)"
        )


def _info(path: Path, name: str, t: torch.Tensor, shift: int, size: int) -> TensorInfo:
    """`t` as a TensorInfo, its bytes checked to lie inside its storage."""
    storage = t.untyped_storage()
    start, nbytes = int(t.storage_offset()) * t.element_size(), t.numel() * t.element_size()
    if start + nbytes > storage.nbytes():
        raise CheckpointError(
            f"{path}: tensor {short_repr(name)}: bytes {start}..{start + nbytes} exceed its {storage.nbytes()}-byte storage"
        )
    offset = storage.data_ptr() - shift + start
    if not nbytes and not 0 <= offset <= size:  # an empty tensor reads nothing: any offset in the file does
        offset = 0
    return TensorInfo(name, NAMES[t.dtype], tuple(t.shape), path, offset, nbytes)


def directory_bytes(f: IO[bytes]) -> bytes:
    """What stands for a `.bin` shard's header in its fingerprint: its zip directory (each
    record's name, size, CRC-32 and place), which changes with the pickle or any storage's
    recorded checksum."""
    try:
        with zipfile.ZipFile(f) as zf:
            rows = [(i.filename, i.file_size, i.CRC, i.header_offset) for i in zf.infolist()]
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{getattr(f, 'name', '?')}: no longer a readable zip archive ({e})") from None
    return json.dumps(rows).encode()
