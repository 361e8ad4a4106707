"""Tiny PEFT LoRA adapter folders for tests, written with safetensors' own `save_file`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_adapter(
    folder: Path,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    r: int,
    alpha: float,
    rslora: bool = False,
    extra: dict[str, torch.Tensor] | None = None,
    config: dict[str, object] | None = None,
) -> Path:
    """An adapter folder: module name -> (A (r × in), B (out × r)), plus raw `extra` tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    tensors.update(extra or {})
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in factors}),
        "base_model_name_or_path": "tiny",
        **(config or {}),
    }
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """s · B @ A in float32 as the ordered sum of r outer products, the engine's documented order."""
    a, b = a.float(), b.float()
    acc = b[:, 0:1] * a[0]
    for k in range(1, a.shape[0]):
        acc += b[:, k : k + 1] * a[k]
    return acc if scaling == 1.0 else acc * scaling
