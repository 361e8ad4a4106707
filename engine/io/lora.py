"""PEFT LoRA adapters as merge inputs: an adapter folder stands where a fine-tuned model does.

A folder with `adapter_config.json` and `adapter_model.safetensors` (Hu et al., 2021, "LoRA:
Low-Rank Adaptation of Large Language Models") describes the model θ = θ_base + s · B @ A for
each target weight, with A (r × in) = `base_model.model.<module>.lora_A.weight`, B (out × r) =
`...lora_B.weight` and s = lora_alpha / r (lora_alpha / √r with `use_rslora`; `alpha_pattern`
overrides alpha per module, the rank is read from the tensors). Every other weight equals the
base's (δ = 0), except full weights the adapter carries (`modules_to_save`, trained biases),
which replace the base's.

The adapter is presented as a `LoraCheckpoint` with the base's tensor names, so inventory, plan
and executor treat it as one more model. Its target tensors are materialized block by block in
float32: rows [r0, r1) of θ are θ_base[r0:r1] + s · B[r0:r1] @ A, computed in pieces of at most
`PIECE_ELEMS` elements. The product is an ordered sum of r outer products (Σₖ B[:, k] ⊗ A[k],
k = 0 … r−1, each product and sum a plain IEEE float32 op), not a BLAS call, so that every row
is bit-identical whatever the block size (BLAS may block the reduction differently for
different shapes); it costs ~r multiply-adds per element. A (r × in) is kept for the tensor
being read; B is read row by row band. Only 2-D `lora_A` / `lora_B` pairs are supported; DoRA,
embedding LoRA, conv LoRA and `fan_in_fan_out` are refused with a clear error.
"""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import torch

from engine.dtypes import MERGEABLE, itemsize
from engine.errors import CheckpointError
from engine.io.checkpoint import BUFFERED, INDEX_NAME, SINGLE_NAME, Checkpoint, Reader, ReadOptions, open_checkpoint
from engine.io.header import TensorInfo, read_header, short_repr
from engine.io.torch_bin import BIN_INDEX, BIN_SINGLE
from engine.io.zarr_format import ZARR_DIR
from engine.io.zarr_reader import ZarrCheckpoint, ZarrReader

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_WEIGHTS, "adapter_model.bin")
# The files that make a folder a whole model to `open_checkpoint` (safetensors, `.bin`, zarr).
FULL_WEIGHTS = (SINGLE_NAME, INDEX_NAME, BIN_SINGLE, BIN_INDEX, f"{ZARR_DIR}/zarr.json")
PREFIX = "base_model.model."
PIECE_ELEMS = 1 << 18  # 1 MiB of float32: the largest temporary a LoRA read allocates
_FACTOR_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_REFUSED = {
    "lora_embedding_A": "LoRA on embeddings",
    "lora_embedding_B": "LoRA on embeddings",
    "lora_magnitude_vector": "DoRA",
}


class RowReader(Protocol):
    """What the executor reads through: `Reader`, `LoraReader` and the vocabulary streams."""

    def read_rows(self, name: str, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor: ...

    def advise_rows(self, name: str, r0: int, r1: int) -> None:
        """A hint that rows [r0, r1) of `name` are read next (may do nothing)."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class LoraFactor:
    """One target weight: its adapter tensors, rank and scaling."""

    a: str  # adapter tensor names
    b: str
    rank: int
    scaling: float


@dataclass(frozen=True)
class LoraCheckpoint(Checkpoint):
    """A LoRA adapter seen as a model: the base's tensors, with targets as float32 θ_base + s·B@A."""

    adapter: Checkpoint = field(kw_only=True)  # the adapter file under its own tensor names
    base: Checkpoint | None = field(kw_only=True)
    factors: dict[str, LoraFactor] = field(kw_only=True)  # base tensor name -> factor
    replaced: dict[str, str] = field(kw_only=True)  # base tensor name -> full adapter tensor
    config: dict[str, Any] = field(kw_only=True)

    def summary(self) -> dict[str, Any]:
        """The adapter's settings, for `leanmerge inspect`."""
        r, alpha, rslora = self.config["r"], self.config["alpha"], self.config["rslora"]
        return {
            "r": r,
            "alpha": alpha,
            "rslora": rslora,
            "scaling": alpha / math.sqrt(r) if rslora else alpha / r,
            "target_modules": self.config["target_modules"],
            "target_tensors": len(self.factors),
            "replaced": sorted(self.replaced),
        }


def has_full_weights(folder: Path) -> bool:
    """Whether `folder` holds a whole model in any form `open_checkpoint` reads (safetensors,
    `.bin`, zarr): such a folder is that model, whatever adapter files sit beside it."""
    return any((folder / name).is_file() for name in FULL_WEIGHTS)


def is_adapter(folder: Path) -> bool:
    """An adapter folder: `adapter_config.json` and no full weights (those win when both exist)."""
    return (folder / ADAPTER_CONFIG).is_file() and not has_full_weights(folder)


def open_model(folder: Path | str, base: Checkpoint | None) -> Checkpoint:
    """A model folder, or a LoRA adapter folder read against `base` (None: describe only)."""
    folder = Path(folder)
    if is_adapter(folder):
        return open_adapter(folder, base)
    if folder.is_dir() and not has_full_weights(folder):
        lone = [n for n in ADAPTER_FILES if (folder / n).is_file()]
        if lone:  # adapter weights whose config is missing: not a full model with its weights missing
            raise CheckpointError(
                f"{folder}: {lone[0]} without {ADAPTER_CONFIG}; a LoRA adapter needs its config (r, lora_alpha, "
                "target_modules): copy it in from where the adapter was saved"
            )
    return open_checkpoint(folder)


def open_adapter(folder: Path, base: Checkpoint | None) -> LoraCheckpoint:
    """Index a PEFT LoRA adapter folder; with `base`, check it against the base's tensors.

    Raises:
        CheckpointError: naming the file and the field or tensor that is wrong.
    """
    config = _read_config(folder / ADAPTER_CONFIG)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = (folder / "adapter_model.bin").exists()
        raise CheckpointError(
            f"{folder}: no {ADAPTER_WEIGHTS}"
            + ("; only adapter_model.bin, and leanmerge never unpickles: re-save it as safetensors" if pickled else "")
        )
    header = read_header(weights)
    adapter = Checkpoint(folder, {t.name: t for t in header.tensors}, (weights,))
    factors, replaced = _classify(weights, adapter.tensors, config)
    tensors: dict[str, TensorInfo] = {}
    if base is not None:
        _check_against(weights, adapter, factors, replaced, base)
        for name, info in base.tensors.items():
            if name in factors:
                tensors[name] = replace(info, dtype="F32", nbytes=info.numel * 4)
            elif name in replaced:
                tensors[name] = replace(adapter.tensors[replaced[name]], name=name)
            else:
                tensors[name] = info
    return LoraCheckpoint(
        folder, tensors, (weights,), adapter=adapter, base=base, factors=factors, replaced=replaced, config=config
    )


def _read_config(path: Path) -> dict[str, Any]:
    try:
        raw: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: cannot read the adapter config: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: must be a JSON object")
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise CheckpointError(f"{path}: peft_type {short_repr(peft_type)} is not supported; only LORA adapters are")
    for key, why in (("use_dora", "DoRA adapters"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D) adapters")):
        if raw.get(key):
            raise CheckpointError(f"{path}: {key} is true: {why} are not supported yet")
    r, alpha = raw.get("r"), raw.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise CheckpointError(f"{path}: field 'r' must be a positive integer, got {short_repr(r)}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise CheckpointError(f"{path}: field 'lora_alpha' must be a number, got {short_repr(alpha)}")
    pattern = raw.get("alpha_pattern") or {}
    if not isinstance(pattern, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in pattern.values()
    ):
        raise CheckpointError(f"{path}: field 'alpha_pattern' must map module patterns to numbers")
    targets = raw.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else [str(t) for t in targets]
    return {
        "r": r,
        "alpha": float(alpha),
        "rslora": bool(raw.get("use_rslora", False)),
        "alpha_pattern": {str(k): float(v) for k, v in pattern.items()},
        "target_modules": sorted(targets),
    }


def _alpha(module: str, config: dict[str, Any]) -> float:
    """PEFT's rule: the first `alpha_pattern` key that matches the module name's end."""
    for key, value in config["alpha_pattern"].items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return float(config["alpha"])


def _classify(
    file: Path, tensors: dict[str, TensorInfo], config: dict[str, Any]
) -> tuple[dict[str, LoraFactor], dict[str, str]]:
    """Adapter tensors -> (target base name -> factor, replaced base name -> adapter name)."""
    pairs: dict[str, dict[str, str]] = {}
    replaced: dict[str, str] = {}
    for name in tensors:
        if not name.startswith(PREFIX):
            raise CheckpointError(
                f"{file}: tensor {short_repr(name)} does not start with {PREFIX!r} (not a PEFT adapter?)"
            )
        inner = name[len(PREFIX) :]
        refused = next((why for key, why in _REFUSED.items() if f".{key}" in inner), None)
        if refused:
            raise CheckpointError(f"{file}: tensor {short_repr(name)}: {refused} is not supported yet")
        m = _FACTOR_RE.match(inner)
        if m:
            pairs.setdefault(m["module"], {})[m["which"]] = name
        else:  # a full weight (modules_to_save, bias): stands for the base's tensor
            replaced[re.sub(r"\.modules_to_save\.[^.]+\.", ".", inner)] = name
    factors = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{file}: module {short_repr(module)} has lora_{''.join(ab)} but not its pair")
        a, b = tensors[ab["A"]], tensors[ab["B"]]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
            raise CheckpointError(
                f"{file}: module {short_repr(module)}: lora_A {list(a.shape)} and lora_B {list(b.shape)} are not "
                "(r × in) and (out × r) matrices (conv LoRA is not supported yet)"
            )
        if a.dtype not in MERGEABLE or b.dtype not in MERGEABLE:
            raise CheckpointError(f"{file}: module {short_repr(module)}: LoRA factors must be float, got {a.dtype}")
        rank = a.shape[0]
        alpha = _alpha(module, config)
        scaling = alpha / math.sqrt(rank) if config["rslora"] else alpha / rank
        factors[f"{module}.weight"] = LoraFactor(ab["A"], ab["B"], rank, scaling)
    return factors, replaced


def _check_against(
    file: Path, adapter: Checkpoint, factors: dict[str, LoraFactor], replaced: dict[str, str], base: Checkpoint
) -> None:
    for name, f in factors.items():
        info = base.tensors.get(name)
        if info is None:
            raise CheckpointError(
                f"{file}: adapter targets {short_repr(name)}, which is not a tensor of base {base.folder}"
            )
        a, b = adapter.tensors[f.a].shape, adapter.tensors[f.b].shape
        if len(info.shape) != 2 or (b[0], a[1]) != info.shape or info.dtype not in MERGEABLE:
            raise CheckpointError(
                f"{file}: B @ A is {[b[0], a[1]]} but base tensor {short_repr(name)} is {list(info.shape)} {info.dtype}"
            )
    for name, src in replaced.items():
        if name not in base.tensors:
            raise CheckpointError(
                f"{file}: tensor {short_repr(src)} stands for {short_repr(name)}, which is not a tensor of base {base.folder}"
            )


class LoraReader:
    """`read_rows` of a `LoraCheckpoint`: base rows plus s · B[r0:r1] @ A for target tensors."""

    def __init__(self, ckpt: LoraCheckpoint, options: ReadOptions = BUFFERED) -> None:
        if ckpt.base is None:
            raise CheckpointError(f"{ckpt.folder}: a LoRA adapter is read against a base model")
        self.ckpt = ckpt
        self._base = Reader(ckpt.base, options)
        try:
            self._adapter = Reader(ckpt.adapter, options)
        except BaseException:
            self._base.close()
            raise
        self._a: tuple[str, torch.Tensor] | None = None  # the current target's A, float32 (r, in)
        self._scratch = torch.empty(0, dtype=torch.uint8)
        # Vocabulary streams may read rows of this model from their own reader threads.
        self._lock = threading.Lock()

    def read_rows(self, name: str, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [r0, r1) of the model's tensor `name` (float32 for LoRA targets)."""
        with self._lock:
            return self._read_rows(name, r0, r1, out)

    def _read_rows(self, name: str, r0: int, r1: int, out: torch.Tensor | None) -> torch.Tensor:
        f = self.ckpt.factors.get(name)
        if f is None:
            src = self.ckpt.replaced.get(name)
            if src is not None:
                return self._adapter.read_rows(src, r0, r1, out)
            return self._base.read_rows(name, r0, r1, out)
        info = self.ckpt.tensors[name]
        if not 0 <= r0 <= r1 <= info.rows:
            raise IndexError(f"{name}: rows [{r0}, {r1}) outside [0, {info.rows})")
        cols = info.row_numel
        nbytes = (r1 - r0) * cols * 4
        buf = torch.empty(nbytes, dtype=torch.uint8) if out is None else out.view(-1)[:nbytes]
        result = buf.view(torch.float32).view(r1 - r0, cols)
        step = max(1, PIECE_ELEMS // max(cols, 1))
        for p0 in range(r0, r1, step):
            p1 = min(p0 + step, r1)
            dst = result[p0 - r0 : p1 - r0]
            dst.copy_(self._base.read_rows(name, p0, p1, out=self._scratch_for(name, p1 - p0)))
            dst.add_(self.delta_rows(name, p0, p1))
        return result

    def advise_rows(self, name: str, r0: int, r1: int) -> None:
        if name not in self.ckpt.factors:
            src = self.ckpt.replaced.get(name)
            (self._base if src is None else self._adapter).advise_rows(src or name, r0, r1)

    def delta_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """s · B[r0:r1] @ A in float32 as an ordered sum of outer products: (r1 - r0, in)."""
        f = self.ckpt.factors[name]
        a = self._factor_a(name, f)
        b = self._adapter.read_rows(f.b, r0, r1).float()  # (rows, r)
        acc = b[:, 0:1] * a[0]
        for k in range(1, f.rank):
            acc += b[:, k : k + 1] * a[k]
        return acc if f.scaling == 1.0 else acc.mul_(f.scaling)

    def _factor_a(self, name: str, f: LoraFactor) -> torch.Tensor:
        if self._a is None or self._a[0] != name:
            rank = self.ckpt.adapter.tensors[f.a].rows
            self._a = (name, self._adapter.read_rows(f.a, 0, rank).float())
        return self._a[1]

    def _scratch_for(self, name: str, rows: int) -> torch.Tensor:
        assert self.ckpt.base is not None
        info = self.ckpt.base.tensors[name]
        need = rows * info.row_numel * itemsize(info.dtype)
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need, dtype=torch.uint8)
        return self._scratch

    def close(self) -> None:
        self._base.close()
        self._adapter.close()

    def __enter__(self) -> LoraReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_reader(ckpt: Checkpoint, options: ReadOptions = BUFFERED) -> Reader | LoraReader | ZarrReader:
    """The right reader for a checkpoint or an adapter."""
    if isinstance(ckpt, LoraCheckpoint):
        return LoraReader(ckpt, options)
    if isinstance(ckpt, ZarrCheckpoint):
        return ZarrReader(ckpt)
    return Reader(ckpt, options)
