"""The naive whole-tensor merge that today's tools do, as a baseline for memory and time.

For every tensor: load it whole from the base and every model (`safe_open(...).get_tensor`,
reopened per tensor so that no mapping keeps whole files resident), merge in float32, keep the
result in a dict; `safetensors.torch.save_file` the whole model at the end. Peak RSS is therefore
about the whole output model plus (models + `EXTRA_COPIES[method]`) float32 copies of the
largest tensor. The arithmetic is in place where that is natural, so the baseline is no straw
man, and just enough to cost what it costs: DARE masks come from `torch.bernoulli`, the TIES trim
from `torch.kthvalue`; only task arithmetic and linear match the engine bit for bit.

Standalone on purpose (run as a script in a fresh process by `bench.common.run_naive`):
`python bench/naive_merge.py --method task_arithmetic --base B --model M1 --model M2 --out O`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

METHODS = ("linear", "task_arithmetic", "dare_linear", "dare_ties", "ties")
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the file holding it, from the shard index or the single file's header."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def load(files: dict[str, Path], name: str) -> torch.Tensor:
    """One whole tensor; the file is opened for this tensor only, as a per-tensor loader does."""
    with safe_open(str(files[name]), framework="pt") as f:
        tensor: torch.Tensor = f.get_tensor(name)
    return tensor


def dare_(delta: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """Drop each element with probability 1 - density, rescale survivors by 1 / density (in place)."""
    keep = torch.empty_like(delta).bernoulli_(density, generator=gen)
    return delta.mul_(keep).div_(density)


def trim_(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim in place: keep the top-`density` fraction of |delta|, threshold by `torch.kthvalue`
    (which copies the tensor and allocates int64 indices: 3 more float32 copies' worth)."""
    drop = delta.numel() - int(density * delta.numel())
    if drop <= 0:
        return delta
    threshold = delta.abs().flatten().kthvalue(drop).values
    return delta.mul_(delta.abs() > threshold)


def total_(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ xs accumulated into xs[0] (no `torch.stack`, which would copy every model once more)."""
    for x in xs[1:]:
        xs[0].add_(x)
    return xs[0]


def elect_and_merge(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """TIES sign election (sign of the sum) and the mean over the models that agree with it."""
    positive = total_([deltas[0].clone(), *deltas[1:]]) >= 0  # the sum is freed at once
    mixed, count = torch.zeros_like(deltas[0]), torch.zeros_like(deltas[0])
    for d in deltas:
        agree = torch.where(positive, d > 0, d < 0)
        mixed += torch.where(agree, d, 0.0)
        count += agree
    return mixed.div_(count.clamp_(min=1.0))


# Float32 copies of the largest tensor alive at the peak, beyond one per model (for the RAM guard).
EXTRA_COPIES = {"linear": 0.5, "task_arithmetic": 1.5, "dare_linear": 2.5, "dare_ties": 4.5, "ties": 5.5}


def merge_tensor(
    method: str, base: torch.Tensor, models: Sequence[dict[str, Path]], name: str, density: float, gen: torch.Generator
) -> torch.Tensor:
    """One output tensor in float32, each model loaded whole in turn; weights 1 and lambda 1."""
    if method == "linear":
        return total_([load(f, name).float() for f in models]).div_(len(models))
    deltas = [load(f, name).float().sub_(base) for f in models]  # the file's dtype is freed at once
    if method in ("dare_linear", "dare_ties"):
        deltas = [dare_(d, density, gen) for d in deltas]
    if method == "ties":
        deltas = [trim_(d, density) for d in deltas]
    mixed = elect_and_merge(deltas) if method in ("dare_ties", "ties") else total_(deltas)
    return base.add_(mixed)


def naive_merge(
    method: str, base: Path, models: Sequence[Path], out: Path, density: float, seed: int
) -> dict[str, int]:
    """Merge whole tensors, hold the whole result, save it at the end; returns bytes read and written."""
    base_files = tensor_files(base)
    model_files = [tensor_files(m) for m in models]
    gen = torch.Generator().manual_seed(seed)
    result: dict[str, torch.Tensor] = {}
    read = 0
    for name in base_files:
        b = load(base_files, name)
        read += b.numel() * b.element_size() * (1 + len(models))
        if b.dtype not in FLOATS:
            result[name] = b
            continue
        result[name] = merge_tensor(method, b.float(), model_files, name, density, gen).to(b.dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file(result, str(out / "model.safetensors"), metadata={"format": "pt"})
    return {"bytes_read": read, "bytes_written": sum(t.numel() * t.element_size() for t in result.values())}


def main() -> None:
    """Parse flags, merge, and write a leanmerge-like `report` event (inner wall time) as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=METHODS, required=True)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--model", type=Path, action="append", required=True, dest="models")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-json", type=Path)
    a = ap.parse_args()
    t0 = time.perf_counter()
    figures = naive_merge(a.method, a.base, a.models, a.out, a.density, a.seed)
    wall = time.perf_counter() - t0
    if a.log_json:
        report = {"event": "report", "tool": "naive", "method": a.method, "wall_s": wall, **figures}
        a.log_json.write_text(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
