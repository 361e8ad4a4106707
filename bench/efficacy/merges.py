"""leanmerge as a user runs it: the `leanmerge` command in a subprocess, one merge per call.

Which settings each merge uses is written here once, so the JSON can say what was run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# The merges of the fine-tunes, by label: (method, flags). Weights 1 and λ 1 sum the task vectors
# (task arithmetic); `linear` averages the models instead (λ = 1/3 of the sum for three). Densities
# follow the methods' papers' usual settings, plus sparser TIES / DARE rows; no per-task search.
MERGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "linear": ("linear", ()),
    "task_arithmetic": ("task_arithmetic", ("--lambda", "1.0")),
    "ties": ("ties", ("--density", "0.5", "--lambda", "1.0")),
    "ties d=0.2": ("ties", ("--density", "0.2", "--lambda", "1.0")),
    "dare_linear": ("dare_linear", ("--density", "0.5", "--lambda", "1.0")),
    "dare_linear d=0.1": ("dare_linear", ("--density", "0.1", "--lambda", "1.0")),
    "dare_ties": ("dare_ties", ("--density", "0.5", "--lambda", "1.0")),
    "dare_ties d=0.2": ("dare_ties", ("--density", "0.2", "--lambda", "1.0")),
    "della": ("della", ("--density", "0.5", "--epsilon", "0.15", "--lambda", "1.0")),
    "breadcrumbs": ("breadcrumbs", ("--density", "0.9", "--gamma", "0.01", "--lambda", "1.0")),
    "model_stock": ("model_stock", ()),
}


class LeanmergeFailed(RuntimeError):
    """`leanmerge` exited non-zero; the message carries its command and stderr."""


def executable() -> str:
    """The `leanmerge` installed beside this interpreter (a venv's), else the one on PATH."""
    beside = Path(sys.executable).with_name("leanmerge")
    found = str(beside) if beside.exists() else shutil.which("leanmerge")
    if not found:
        raise LeanmergeFailed("no `leanmerge` command: install the project (`make .venv/bin/leanmerge`)")
    return found


def _run(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    cmd = [executable(), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise LeanmergeFailed(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done


def merge(base: Path, models: Sequence[Path], method: str, out: Path, flags: Sequence[str] = (), seed: int = 0) -> Path:
    """`leanmerge merge --base BASE --model M.. --method METHOD FLAGS --seed SEED OUT`."""
    args = ["merge", "--base", str(base), *[a for m in models for a in ("--model", str(m))], "--method", method]
    # one compute thread: the tensors are tiny and several merges run at once
    _run([*args, *flags, "--seed", str(seed), "--out-dtype", "fp32", "--threads", "1", str(out)])
    return out


def drop(base: Path, model: Path, p: float, rescale: bool, seed: int, out: Path) -> Path:
    """One fine-tune with a fraction `p` of its delta dropped: DARE (`rescale`) or DropOnly.

    dare_linear of one model with weight 1 and λ 1 is θ_base + δ̂; p = 0 is density 1 (nothing dropped).
    """
    flags = ["--density", f"{1.0 - p:.6g}", "--lambda", "1.0", "--rescale" if rescale else "--no-rescale"]
    return merge(base, [model], "dare_linear", out, flags, seed)


def inspect(base: Path, models: Sequence[Path]) -> dict[str, Any]:
    """`leanmerge inspect --json BASE MODELS..`: per model, delta statistics and warnings."""
    report: dict[str, Any] = json.loads(_run(["inspect", "--json", str(base), *map(str, models)]).stdout)
    return report


def flags_of(labels: Sequence[str]) -> Mapping[str, tuple[str, ...]]:
    """The method and flags each merge of `labels` is run with."""
    return {label: ("--method", MERGES[label][0], *MERGES[label][1]) for label in labels}
