"""safetensors dtype names, their torch dtypes and byte sizes.

One table so that the header parser, the reader, the writer and the CLI agree on spelling.
"""

from __future__ import annotations

import torch

from engine.errors import SpecError

# safetensors name -> torch dtype. Unsigned types beyond U8 and the fp8 types are read and
# copied through (never merged); torch has storage types for them.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# Float types we merge (compute in float32, cast once on write). fp8 is copied, not merged:
# arithmetic on it would need scales that plain safetensors files do not carry.
MERGEABLE = frozenset({"F64", "F32", "F16", "BF16"})

# User spellings for --out-dtype / YAML `dtype`.
ALIASES: dict[str, str] = {
    "bf16": "BF16",
    "bfloat16": "BF16",
    "fp16": "F16",
    "f16": "F16",
    "float16": "F16",
    "half": "F16",
    "fp32": "F32",
    "f32": "F32",
    "float32": "F32",
    "float": "F32",
    "fp64": "F64",
    "float64": "F64",
}


def itemsize(name: str) -> int:
    """Bytes per element of a safetensors dtype name."""
    return torch.empty((), dtype=DTYPES[name]).element_size()


def parse_out_dtype(value: str) -> str:
    """Normalise a user's dtype spelling (`bf16`, `float16`, `F32`, ...) to a safetensors name."""
    key = value.strip()
    if key.upper() in MERGEABLE:
        return key.upper()
    if key.lower() in ALIASES:
        return ALIASES[key.lower()]
    allowed = ", ".join(sorted(set(ALIASES)))
    raise SpecError(f"dtype {value!r} is not a float type leanmerge writes; use one of {allowed}")


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (for os.pwrite, zlib, preadv)."""
    return memoryview(t.numpy()).cast("B")  # type: ignore[arg-type]  # ndarray has the buffer protocol
