"""Hostile safetensors headers: parse cleanly or fail with `HeaderError`, never anything else.

`read_header` is the only code that reads data from outside before trusting it, and `Reader`
is the only code that turns what it parsed into reads and allocations. The fuzz test starts from
valid small files and damages them at three levels (the parsed JSON, the JSON text, the raw
bytes); every result must either raise `HeaderError` naming the file, or parse into tensors that
lie inside the file and that `Reader.read_rows` reads back byte for byte (or refuses with
`CheckpointError`). A per-example alarm turns a hang into a failure, and peak RSS is checked so
that a header cannot make us allocate what the file does not hold.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.dtypes import DTYPES, itemsize
from engine.errors import CheckpointError, HeaderError
from engine.io.checkpoint import Checkpoint, Reader
from engine.io.header import MAX_HEADER_BYTES, Header, read_header

FUZZ_EXAMPLES = int(os.environ.get("LEANMERGE_FUZZ_EXAMPLES", "2000"))
EXAMPLE_SECONDS = 10  # one example is milliseconds; anything near this is a hang
MAX_FILE = 1 << 20  # every fuzzed file stays under 1 MB
HUGE_BYTES = 300_000  # at most two text mutations of at most this many bytes each
RSS_GROWTH_LIMIT = 256 << 20
DTYPE_NAMES = list(DTYPES)

Pairs = list[tuple[str, Any]]  # the header as ordered (key, value) pairs: keys may repeat


# --- guards ---------------------------------------------------------------------------------


class Hang(Exception):
    """Raised by the alarm: the code under test ran far longer than any file this size needs."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# --- building files -------------------------------------------------------------------------


def st_file(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def pattern(n: int) -> bytes:
    """Recognisable, position-dependent data bytes (cheap, and no two tensors read alike)."""
    return bytes((i * 131 + 17) & 0xFF for i in range(n))


def valid_pairs(tensors: list[tuple[str, list[int]]], metadata: dict[str, str] | None) -> tuple[Pairs, int]:
    """A valid header for `(dtype, shape)` tensors packed back to back; returns it and the data size."""
    pairs: Pairs = [] if metadata is None else [("__metadata__", metadata)]
    offset = 0
    for i, (dtype, shape) in enumerate(tensors):
        nbytes = math.prod(shape) * itemsize(dtype)
        pairs.append((f"t{i}", {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}))
        offset += nbytes
    return pairs, offset


def to_text(pairs: Pairs | Any) -> str:
    """JSON text that keeps repeated keys (a dict could not)."""
    if not is_pairs(pairs):
        return _dumps(pairs)
    return "{" + ", ".join(f"{_dumps(k)}: {v.text if isinstance(v, Raw) else _dumps(v)}" for k, v in pairs) + "}"


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)  # raw UTF-8 in the file: the decoder sees it


def is_pairs(header: Any) -> bool:
    return isinstance(header, list) and all(isinstance(p, tuple) for p in header)


class Raw:
    """A value spliced into the JSON text as is (deep nesting, huge numbers)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:20]!r}... {len(self.text)} chars)"


# --- strategies -----------------------------------------------------------------------------

HOSTILE_INTS = [-1, -(2**63), 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**64 + 1, 10**30, -(10**30)]
ints = st.one_of(st.integers(-3, 40), st.sampled_from(HOSTILE_INTS))
scalars = st.one_of(
    ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=6),
    st.sampled_from(["3", "F32", "0x10", "1e3"]),
)
json_values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=6
)
hostile_shapes = st.one_of(
    st.lists(ints, max_size=4),
    st.sampled_from(
        [
            [2**32, 2**32, 2**32],  # product overflows int64
            [2**62, 4],
            [0, 2**64],  # zero elements, one dimension beyond int64
            [2**64, 0],
            [0, 2**40, 2**40],  # zero elements, a row beyond int64
            [1] * 65,
            [1.0, 2],
            [True, 2],
            ["2", 2],
            [[2], 2],
        ]
    ),
    json_values,
)
zero_shapes = st.one_of(
    st.none(),  # the tensor's own shape with a leading 0
    st.sampled_from(
        [[0], [0] * 64, [0, 2**63 - 1], [0, 2**63], [0, 2**64], [2**64, 0], [0, 2**40, 2**40], [3, 0, 2**70]]
    ),
)
hostile_offsets = st.one_of(
    st.lists(ints, max_size=3),
    st.integers(0, 64).map(lambda b: [b, b]),  # an empty span: valid with a zero-element shape
    st.tuples(ints, ints).map(list),
    st.sampled_from([[0.0, 8.0], [False, True], ["0", "8"], [None, None], [0, float("inf")]]),
    json_values,
)
hostile_dtypes = st.one_of(
    st.sampled_from(DTYPE_NAMES), st.sampled_from(["f32", "F7", "", "F32 ", "FLOAT32", "U128"]), json_values
)
FIELDS = {"dtype": hostile_dtypes, "shape": hostile_shapes, "data_offsets": hostile_offsets}
bad_metadata = st.one_of(
    st.dictionaries(st.text(max_size=4), json_values, max_size=3), json_values, st.just({"format": "pt"})
)
odd_bytes = st.one_of(
    st.sampled_from(
        [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x00", b'"', b"\\", b"\\ud800", b"}"]
    ),
    st.binary(min_size=1, max_size=4),
)


@st.composite
def obj_mutation(draw: st.DrawFn) -> tuple[Any, ...]:
    kinds = ["set", "set", "set", "del", "extra", "top", "meta", "entry", "replace", "empty", "empty", "alias"]
    kind = draw(st.sampled_from(kinds))
    i = draw(st.integers(0, 7))
    if kind == "set":
        key = draw(st.sampled_from(sorted(FIELDS)))
        return (kind, i, key, draw(FIELDS[key]))
    if kind == "del":
        return (kind, i, draw(st.sampled_from(sorted(FIELDS))))
    if kind == "extra":
        return (kind, i, draw(st.text(max_size=5)), draw(json_values))
    if kind == "top":
        return (kind, draw(st.text(max_size=5)), draw(json_values))
    if kind == "meta":
        return (kind, draw(bad_metadata))
    if kind == "entry":
        return (kind, i, draw(json_values))
    if kind == "replace":
        return (kind, draw(json_values))
    if kind == "alias":  # tensor i takes tensor j's data_offsets: overlaps, or a copy
        return (kind, i, draw(st.integers(0, 7)))
    return (kind, i, draw(zero_shapes))  # "empty": tensor i gets zero elements and an empty span


@st.composite
def text_mutation(draw: st.DrawFn) -> tuple[Any, ...]:
    kind = draw(st.sampled_from(["dup", "nest", "nest_all", "huge", "insert", "bigint"]))
    i = draw(st.integers(0, 7))
    if kind == "dup":
        return (kind, i)
    if kind in ("nest", "nest_all"):
        return (
            kind,
            i,
            draw(st.sampled_from([10, 999, 1000, 5000, 100_000])),
            draw(st.sampled_from("[{")),
            draw(st.booleans()),
        )
    if kind == "huge":
        where = draw(st.sampled_from(["name", "dtype", "meta"]))
        return (
            kind,
            i,
            where,
            draw(st.integers(1000, 200_000)),
            draw(st.sampled_from(["a", "\u00e9", "\U0001f600", '"', "\x00"])),
        )
    if kind == "insert":
        return (kind, draw(st.integers(0, 1 << 16)), draw(odd_bytes))
    return (
        kind,
        i,
        draw(st.sampled_from(["shape", "data_offsets"])),
        draw(st.sampled_from([19, 20, 400, 4300, 4301, 5000])),
    )


@st.composite
def byte_mutation(draw: st.DrawFn) -> tuple[Any, ...]:
    kind = draw(st.sampled_from(["flip", "flip", "len", "len_delta", "truncate", "extend", "insert"]))
    if kind == "flip":
        region = draw(st.sampled_from(["prefix", "header", "header", "data", "any"]))
        return (kind, region, draw(st.integers(0, 1 << 16)), draw(st.integers(1, 255)))
    if kind == "len":
        near = [2**64 - 1, 2**64 - 8, 2**63, 2**63 - 1, 2**32, MAX_HEADER_BYTES, MAX_HEADER_BYTES + 1, 0, 1, 2, 7]
        return (kind, draw(st.one_of(st.sampled_from(near), st.integers(0, 2**64 - 1))))
    if kind == "len_delta":
        return (kind, draw(st.integers(-16, 16)))
    if kind == "truncate":
        return (kind, draw(st.integers(0, 1 << 16)))
    if kind == "extend":
        return (kind, draw(st.one_of(st.binary(max_size=16), st.integers(1, 4096).map(bytes))))
    return (kind, draw(st.integers(0, 1 << 16)), draw(odd_bytes))


@st.composite
def fuzz_cases(draw: st.DrawFn) -> tuple[Any, ...]:
    shapes = st.lists(st.integers(0, 5), max_size=3)
    tensors = draw(st.lists(st.tuples(st.sampled_from(DTYPE_NAMES), shapes), max_size=4))
    metadata = draw(st.one_of(st.none(), st.just({"format": "pt"})))
    objs = draw(st.lists(obj_mutation(), max_size=3))
    texts = draw(st.lists(text_mutation(), max_size=2))
    raws = draw(st.lists(byte_mutation(), max_size=2))
    return tensors, metadata, objs, texts, raws


# --- applying mutations (plain functions of the drawn data, so failures replay) --------------


def apply_obj(pairs: Pairs, m: tuple[Any, ...]) -> Pairs | Any:
    kind = m[0]
    if kind == "replace":
        return m[1]
    if kind == "top":
        return [*pairs, (m[1], m[2])]
    if kind == "meta":
        return [p for p in pairs if p[0] != "__metadata__"] + [("__metadata__", m[1])]
    slots = [j for j, (k, v) in enumerate(pairs) if k != "__metadata__"]
    if not slots:
        return pairs
    j = slots[m[1] % len(slots)]
    name, entry = pairs[j]
    if kind == "entry":
        entry = m[2]
    elif isinstance(entry, dict):
        entry = dict(entry)
        if kind == "set":
            entry[m[2]] = m[3]
        elif kind == "del":
            entry.pop(m[2], None)
        elif kind == "extra":
            entry[m[2]] = m[3]
        elif kind == "empty":
            offsets = entry.get("data_offsets")
            begin = offsets[0] if isinstance(offsets, list) and offsets else 0
            own = entry.get("shape") if isinstance(entry.get("shape"), list) else []
            entry["shape"] = [0, *own] if m[2] is None else m[2]
            entry["data_offsets"] = [begin, begin]
        elif kind == "alias":
            other = pairs[slots[m[2] % len(slots)]][1]
            if isinstance(other, dict) and "data_offsets" in other:
                entry["data_offsets"] = other["data_offsets"]
    return [*pairs[:j], (name, entry), *pairs[j + 1 :]]


def apply_text(pairs: Pairs | Any, m: tuple[Any, ...]) -> Pairs | Any:
    """Text-level damage is expressed on the pairs (repeated keys, `Raw` splices)."""
    kind = m[0]
    if kind == "nest_all":
        _, _, depth, bracket, closed = m
        return Raw(_nested(depth, bracket, closed))
    if not is_pairs(pairs) or not pairs:
        return pairs
    j = m[1] % len(pairs)
    name, entry = pairs[j]
    if kind == "dup":
        return [*pairs, (name, entry)]
    if kind == "nest":
        _, _, depth, bracket, closed = m
        return [*pairs[:j], (name, Raw(_nested(depth, bracket, closed))), *pairs[j + 1 :]]
    if kind == "huge":
        _, _, where, length, char = m
        big = char * min(length, HUGE_BYTES // len(_dumps(char).encode()))
        if where == "name":
            return [*pairs[:j], (big, entry), *pairs[j + 1 :]]
        if where == "meta":
            return [*pairs, ("__metadata__", {"k": big})]
        if isinstance(entry, dict):
            return [*pairs[:j], (name, {**entry, "dtype": big}), *pairs[j + 1 :]]
        return pairs
    if kind == "bigint" and isinstance(entry, dict):
        _, _, key, digits = m
        # Spelled out as text: Python itself refuses to turn a > 4300-digit string into an int.
        big = Raw(f"[{'9' * digits}]" if key == "shape" else f"[0, {'9' * digits}]")
        return [*pairs[:j], (name, Raw(to_text(list({**entry, key: big}.items())))), *pairs[j + 1 :]]
    return pairs


def _nested(depth: int, bracket: str, closed: bool) -> str:
    if bracket == "[":
        return "[" * depth + ("]" * depth if closed else "")
    depth = min(depth, HUGE_BYTES // 7)
    return '{"a": ' * depth + ("0" + "}" * depth if closed else "")


def render(pairs: Pairs | Any) -> bytes:
    text = pairs.text if isinstance(pairs, Raw) else to_text(pairs)
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes invalid UTF-8


def apply_bytes(content: bytes, header_len: int, m: tuple[Any, ...]) -> bytes:
    kind = m[0]
    size = len(content)
    if kind == "flip":
        _, region, pos, xor = m
        lo, hi = {"prefix": (0, 8), "header": (8, 8 + header_len), "data": (8 + header_len, size), "any": (0, size)}[
            region
        ]
        hi = min(hi, size)
        if hi <= lo:
            return content
        i = lo + pos % (hi - lo)
        return content[:i] + bytes([content[i] ^ xor]) + content[i + 1 :]
    if kind == "len":
        return struct.pack("<Q", m[1]) + content[8:]
    if kind == "len_delta":
        return struct.pack("<Q", max(0, header_len + m[1])) + content[8:]
    if kind == "truncate":
        return content[: m[1] % (size + 1)]
    if kind == "extend":
        return content + m[1]
    i = m[1] % (size + 1)
    return content[:i] + m[2] + content[i:]


def build(case: tuple[Any, ...]) -> bytes:
    tensors, metadata, objs, texts, raws = case
    pairs, data_len = valid_pairs(tensors, metadata)
    header: Pairs | Any = pairs
    for m in objs:
        header = apply_obj(header, m) if is_pairs(header) else header
    for m in texts:
        header = apply_text(header, m)
    text = render(header)
    for m in texts:
        if m[0] == "insert":  # raw bytes anywhere in the header: bad UTF-8, stray quotes
            i = m[1] % (len(text) + 1)
            text = text[:i] + m[2] + text[i:]
    content = st_file(text, pattern(data_len))
    for m in raws:
        content = apply_bytes(content, len(text), m)
    assert len(content) < MAX_FILE, len(content)
    return content


# --- the check every file must pass ---------------------------------------------------------


def check_file(path: Path, content: bytes) -> Header | None:
    """Write `content` to `path`; it must parse into readable tensors or raise HeaderError."""
    path.write_bytes(content)
    with time_limit(EXAMPLE_SECONDS):
        try:
            header = read_header(path)
        except HeaderError as e:
            assert str(path) in str(e), str(e)[:300]
            return None
        check_parsed(path, header, content)
    return header


def check_parsed(path: Path, header: Header, content: bytes) -> None:
    assert header.file == path
    assert 8 <= header.data_start <= len(content)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in header.metadata.items())
    end = header.data_start
    for t in header.tensors:  # in data order, inside the file, never overlapping
        assert t.dtype in DTYPES
        assert all(isinstance(d, int) and d >= 0 for d in t.shape)
        assert t.nbytes == math.prod(t.shape) * itemsize(t.dtype)
        assert end <= t.offset and t.offset + t.nbytes <= len(content)
        end = max(end, t.offset + t.nbytes)
    ckpt = Checkpoint(path.parent, {t.name: t for t in header.tensors}, (path,))
    with Reader(ckpt) as reader:
        for t in header.tensors:
            expected = content[t.offset : t.offset + t.nbytes]
            ranges = [(0, t.rows)] + ([(t.rows - 1, t.rows)] if t.rows > 1 else [])
            for r0, r1 in ranges:
                try:
                    out = torch.empty(len(expected), dtype=torch.uint8)
                    rows = reader.read_rows(t.name, r0, r1, out=out)
                except CheckpointError as e:
                    assert str(path) in str(e)
                    continue
                assert rows.dtype == DTYPES[t.dtype]
                assert tuple(rows.shape) == (r1 - r0, t.row_numel)
                row_bytes = t.nbytes // t.rows if t.rows else 0
                assert out.numpy().tobytes()[: (r1 - r0) * row_bytes] == expected[r0 * row_bytes : r1 * row_bytes]


# --- the fuzz test --------------------------------------------------------------------------


def test_fuzz_header_and_reader() -> None:
    """At least 2000 mutated files (LEANMERGE_FUZZ_EXAMPLES): each parses and reads, or is a HeaderError."""
    seen = {"parsed": 0, "refused": 0}
    peak0 = peak_rss()
    with tempfile.TemporaryDirectory(prefix="leanmerge-fuzz-") as d:
        path = Path(d) / "model.safetensors"

        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
        )
        @given(case=fuzz_cases())
        def run(case: tuple[Any, ...]) -> None:
            header = check_file(path, build(case))
            seen["parsed" if header is not None else "refused"] += 1

        run()
    assert peak_rss() - peak0 < RSS_GROWTH_LIMIT, f"peak RSS grew by {(peak_rss() - peak0) >> 20} MiB"
    # Both outcomes must be exercised, or the mutations are too weak (or too strong) to mean much.
    assert seen["parsed"] > 0 and seen["refused"] > 0, seen


# --- named hostile cases, one by one ---------------------------------------------------------

F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _entry(**changes: Any) -> bytes:
    return json.dumps({"w": {**F32_2, **changes}}).encode()


HOSTILE: dict[str, tuple[bytes, str]] = {
    # name: (whole file, a fragment the message must contain)
    "empty_file": (b"", "0 bytes"),
    "seven_bytes": (b"\x02\x00\x00\x00\x00\x00\x00", "7 bytes"),
    "length_2**64-1": (struct.pack("<Q", 2**64 - 1) + b"{}", f"header length {2**64 - 1}"),
    "length_2**64-8": (struct.pack("<Q", 2**64 - 8) + b"{}", f"header length {2**64 - 8}"),
    "length_2**63": (struct.pack("<Q", 2**63) + b"{}", f"header length {2**63}"),
    "length_over_limit": (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "limit"),
    "length_past_end": (struct.pack("<Q", 100) + b"{}", "past the end"),
    "length_zero": (st_file(b"", b""), "not valid JSON"),
    "nested_lists_100000": (st_file(b"[" * 100_000, b""), "header"),
    "nested_lists_closed": (st_file(b"[" * 100_000 + b"]" * 100_000, b""), "header"),
    "nested_objects_100000": (st_file(b'{"a": ' * 100_000 + b"0" + b"}" * 100_000, b""), "header"),
    "nested_in_value": (st_file(b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b""), "header"),
    "huge_string_name": (st_file(json.dumps({"x" * 500_000: 1}).encode(), b""), "entry must be an object"),
    "huge_string_dtype": (st_file(_entry(dtype="F" * 500_000), bytes(8)), "unknown dtype"),
    "huge_string_unterminated": (st_file(b'{"w": "' + b"a" * 500_000, b""), "not valid JSON"),
    "non_utf8_ff": (st_file(b'{"w\xff": 1}', b""), "not UTF-8"),
    "non_utf8_overlong": (st_file(b'{"w\xc0\xaf": 1}', b""), "not UTF-8"),
    "non_utf8_surrogate": (st_file(b'{"w\xed\xa0\x80": 1}', b""), "not UTF-8"),
    "non_utf8_truncated_sequence": (st_file(b'{"w": 1}\xe2\x82', b""), "not UTF-8"),
    "header_list": (st_file(b"[1, 2]", b""), "got list"),
    "header_string": (st_file(b'"model"', b""), "got str"),
    "header_null": (st_file(b"null", b""), "got NoneType"),
    "header_number": (st_file(b"8", b""), "got int"),
    "duplicate_tensor": (st_file(b'{"w": 1, "w": 2}', b""), "'w' twice"),
    "duplicate_metadata": (st_file(b'{"__metadata__": {}, "__metadata__": {}}', b""), "'__metadata__' twice"),
    "duplicate_field": (
        st_file(b'{"w": {"dtype": "F32", "dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}', bytes(8)),
        "'dtype' twice",
    ),
    "metadata_int_value": (st_file(json.dumps({"__metadata__": {"format": 1}}).encode(), b""), "__metadata__"),
    "metadata_null_value": (st_file(json.dumps({"__metadata__": {"format": None}}).encode(), b""), "__metadata__"),
    "metadata_list_value": (st_file(json.dumps({"__metadata__": {"format": ["pt"]}}).encode(), b""), "__metadata__"),
    "metadata_nested": (st_file(json.dumps({"__metadata__": {"a": {"b": "c"}}}).encode(), b""), "__metadata__"),
    "metadata_list": (st_file(json.dumps({"__metadata__": ["pt"]}).encode(), b""), "__metadata__"),
    "metadata_string": (st_file(json.dumps({"__metadata__": "pt"}).encode(), b""), "__metadata__"),
    "entry_not_object": (st_file(json.dumps({"w": [0, 8]}).encode(), bytes(8)), "tensor 'w'"),
    "missing_dtype": (
        st_file(json.dumps({"w": {"shape": [2], "data_offsets": [0, 8]}}).encode(), bytes(8)),
        "dtype None",
    ),
    "missing_shape": (
        st_file(json.dumps({"w": {"dtype": "F32", "data_offsets": [0, 8]}}).encode(), bytes(8)),
        "shape None",
    ),
    "missing_offsets": (
        st_file(json.dumps({"w": {"dtype": "F32", "shape": [2]}}).encode(), bytes(8)),
        "data_offsets None",
    ),
    "dtype_not_string": (st_file(_entry(dtype=4), bytes(8)), "dtype 4"),
    "dtype_lowercase": (st_file(_entry(dtype="f32"), bytes(8)), "dtype 'f32'"),
    "offsets_negative": (st_file(_entry(data_offsets=[-8, 0]), bytes(8)), "[-8, 0]"),
    "offsets_reversed": (st_file(_entry(data_offsets=[8, 0]), bytes(8)), "[8, 0]"),
    "offsets_overflow_u64": (st_file(_entry(data_offsets=[2**64, 2**64 + 8]), bytes(8)), str(2**64)),
    "offsets_overflow_i64": (st_file(_entry(data_offsets=[2**63 - 4, 2**63 + 4]), bytes(8)), "exceed the 8 data bytes"),
    "offsets_float": (st_file(_entry(data_offsets=[0.0, 8.0]), bytes(8)), "data_offsets [0.0, 8.0]"),
    "offsets_bool": (st_file(_entry(data_offsets=[False, True]), bytes(8)), "data_offsets [False, True]"),
    "offsets_string": (st_file(_entry(data_offsets=["0", "8"]), bytes(8)), "data_offsets ['0', '8']"),
    "offsets_three": (st_file(_entry(data_offsets=[0, 4, 8]), bytes(8)), "data_offsets [0, 4, 8]"),
    "offsets_nan": (st_file(b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, NaN]}}', bytes(8)), "nan"),
    "offsets_infinity": (
        st_file(b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, Infinity]}}', bytes(8)),
        "inf",
    ),
    "offsets_past_file": (st_file(_entry(data_offsets=[0, 8]), bytes(4)), "exceed the 4 data bytes"),
    "offsets_overlap": (
        st_file(json.dumps({"a": F32_2, "b": {**F32_2, "data_offsets": [4, 12]}}).encode(), bytes(12)),
        "overlap",
    ),
    "offsets_same_range": (st_file(json.dumps({"a": F32_2, "b": F32_2}).encode(), bytes(8)), "overlap"),
    "shape_negative": (st_file(_entry(shape=[-2]), bytes(8)), "shape [-2]"),
    "shape_float": (st_file(_entry(shape=[2.0]), bytes(8)), "shape [2.0]"),
    "shape_bool": (st_file(_entry(shape=[True, 2]), bytes(8)), "shape [True, 2]"),
    "shape_string": (st_file(_entry(shape=["2"]), bytes(8)), "shape ['2']"),
    "shape_not_list": (st_file(_entry(shape=2), bytes(8)), "shape 2"),
    "shape_nested": (st_file(_entry(shape=[[2]]), bytes(8)), "shape [[2]]"),
    "shape_65_dims": (st_file(_entry(shape=[1] * 65), bytes(8)), "shape [1, 1"),
    "shape_product_overflows_int64": (
        st_file(_entry(shape=[2**32, 2**32, 2**32], data_offsets=[0, 8]), bytes(8)),
        "tensor 'w'",
    ),
    "shape_product_overflows_span": (
        st_file(_entry(shape=[2**62, 4], data_offsets=[0, 2**66]), bytes(8)),
        "tensor 'w'",
    ),
    "shape_offsets_mismatch": (st_file(_entry(shape=[3]), bytes(12)), "span 8 bytes but shape [3] x F32 needs 12"),
    "top_level_extra_scalar": (st_file(json.dumps({"w": F32_2, "extra": 1}).encode(), bytes(8)), "tensor 'extra'"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_header_is_a_header_error(tmp_path: Path, name: str) -> None:
    content, fragment = HOSTILE[name]
    assert len(content) < MAX_FILE
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with time_limit(EXAMPLE_SECONDS), pytest.raises(HeaderError) as err:
        read_header(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: "), msg[:300]
    assert msg.count(str(path)) == 1, f"the file is named more than once (an error wrapped in another?): {msg[:300]}"
    assert fragment in msg, msg[:300]


LONG_NAME = "k" * 500_000
LONG_MESSAGES: dict[str, bytes] = {
    "huge_dtype": HOSTILE["huge_string_dtype"][0],
    "huge_shape": st_file(_entry(shape=[7] * 64), bytes(8)),
    "huge_name_bad_entry": HOSTILE["huge_string_name"][0],
    "huge_name_duplicate": st_file(f'{{"{LONG_NAME}": 1, "{LONG_NAME}": 2}}'.encode(), b""),
    "huge_names_overlap": st_file(json.dumps({LONG_NAME: F32_2, LONG_NAME + "2": F32_2}).encode(), bytes(8)),
}


@pytest.mark.parametrize("name", sorted(LONG_MESSAGES))
def test_error_line_stays_short_whatever_the_header_holds(tmp_path: Path, name: str) -> None:
    """A 500 kB name or value is cut short in the message: the CLI prints it as one terminal line."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(LONG_MESSAGES[name])
    with pytest.raises(HeaderError) as err:
        read_header(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ")
    assert len(msg) < len(str(path)) + 1000, f"{len(msg)}-character message: {msg[:200]}..."


@pytest.mark.parametrize("field", ["shape", "data_offsets"])
def test_integer_beyond_python_digit_limit_is_a_header_error(tmp_path: Path, field: str) -> None:
    """Python refuses to parse integers over 4300 digits with a plain ValueError: still a HeaderError."""
    big = "9" * 5000
    value = f"[{big}]" if field == "shape" else f"[0, {big}]"
    entry = {"dtype": '"F32"', "shape": "[2]", "data_offsets": "[0, 8]", field: value}
    text = "{" + '"w": {' + ", ".join(f'"{k}": {v}' for k, v in entry.items()) + "}}"
    path = tmp_path / "model.safetensors"
    path.write_bytes(st_file(text.encode(), bytes(8)))
    with pytest.raises(HeaderError) as err:
        read_header(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("digits", [4300, 1000])
def test_huge_shape_integer_is_a_header_error(tmp_path: Path, digits: int) -> None:
    """Dimensions Python can parse but whose byte count it cannot print in the error message."""
    dims = ", ".join(["9" * digits] * 2)
    path = tmp_path / "model.safetensors"
    text = f'{{"w": {{"dtype": "F64", "shape": [{dims}], "data_offsets": [0, 8]}}}}'
    path.write_bytes(st_file(text.encode(), bytes(8)))
    with pytest.raises(HeaderError) as err:
        read_header(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("shape", [[0, 2**64], [2**64, 0], [0, 2**63], [0, 2**40, 2**40], [0, 2**63 - 1]])
def test_zero_element_shape_with_giant_dims_is_refused_or_readable(tmp_path: Path, shape: list[int]) -> None:
    """Zero elements pass the size check whatever the other dimensions; reading must not crash."""
    path = tmp_path / "model.safetensors"
    content = st_file(_entry(shape=shape, data_offsets=[0, 0]), b"")
    check_file(path, content)


ACCEPTED: dict[str, bytes] = {
    "no_tensors": st_file(b"{}", b""),
    "metadata_only": st_file(json.dumps({"__metadata__": {"format": "pt"}}).encode(), b""),
    "padded_header": st_file(_entry() + b" " * 13, bytes(8)),
    "zero_dim_tensor": st_file(_entry(shape=[0, 4], data_offsets=[0, 0]), b""),
    "scalar": st_file(_entry(shape=[], data_offsets=[0, 4]), bytes(4)),
    "every_dtype": st_file(
        *(lambda p: (to_text(p[0]).encode(), pattern(p[1])))(valid_pairs([(d, [3, 2]) for d in DTYPE_NAMES], None))
    ),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_odd_but_valid_headers_parse_and_read_back(tmp_path: Path, name: str) -> None:
    header = check_file(tmp_path / "model.safetensors", ACCEPTED[name])
    assert header is not None


LENIENT: dict[str, bytes] = {
    "extra_key_in_entry": st_file(_entry(extra="ignored"), bytes(8)),
    "gap_between_tensors": st_file(
        json.dumps({"a": F32_2, "b": {**F32_2, "data_offsets": [12, 20]}}).encode(), bytes(20)
    ),
    "trailing_bytes": st_file(_entry(), bytes(20)),
    "tensors_out_of_order": st_file(
        json.dumps({"b": {**F32_2, "data_offsets": [8, 16]}, "a": F32_2}).encode(), bytes(16)
    ),
}


@pytest.mark.parametrize("name", sorted(LENIENT))
def test_lenient_headers_parse_or_are_header_errors(tmp_path: Path, name: str) -> None:
    """Not what safetensors writes, but harmless: either answer is fine, as long as it is one of the two."""
    check_file(tmp_path / "model.safetensors", LENIENT[name])


def test_fuzz_builder_makes_valid_files_when_unmutated(tmp_path: Path) -> None:
    """The fuzz starts from files safetensors itself accepts: guard the builder."""
    from safetensors import safe_open

    tensors = [("BF16", [3, 2]), ("F32", []), ("I64", [0, 5]), ("U8", [4]), ("F8_E4M3", [2, 2, 2])]
    path = tmp_path / "model.safetensors"
    header = check_file(path, build((tensors, {"format": "pt"}, [], [], [])))
    assert header is not None and [t.name for t in header.tensors] == ["t0", "t1", "t2", "t3", "t4"]
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["t0", "t1", "t2", "t3", "t4"]
        assert list(f.get_slice("t0").get_shape()) == [3, 2]
