"""What the resume and verify safety checks cost: a merge, and a resume of a merge stopped at its
last tensor, by two source trees (e.g. main before the checks and this one), alternating.

    python -m bench.fingerprint_cost --before /tmp/main-tree [--runs 5] [--tensors 128]

The inputs are a base and two bf16 fine-tunes of `--tensors` 1 MiB tensors each. A merge pays the
input fingerprints (three 4 KiB reads per tensor, at start and again at finalize), the header and
file sha256 record and the fsyncs; a resume also re-reads every finished tensor to check its
crc32. Prints medians of the wall times of whole `leanmerge merge` processes, and of
`fingerprint()` alone (warm, and cold: inputs dropped from the page cache).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS, COLS = 512, 1024  # one bf16 tensor: 1 MiB

RESUME = """
import sys, time
from pathlib import Path
from engine import MergeSpec, ModelRef, merge
base, out, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
spec = MergeSpec("task_arithmetic", base / "base", tuple(ModelRef(base / f, {}) for f in ("ft1", "ft2")), {})
seen = [0]
def stop(e):
    if e["event"] == "tensor":
        seen[0] += 1
        if seen[0] == n - 1:
            raise KeyboardInterrupt
try:
    merge(spec, out, on_event=stop, sync_every=1 << 20)
except KeyboardInterrupt:
    pass
t0 = time.perf_counter()
merge(spec, out, resume=True)
print(time.perf_counter() - t0)
"""


def make_inputs(root: Path, tensors: int) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.w": torch.randn(ROWS, COLS, generator=g) for i in range(tensors)}
    for name, scale in (("base", 0.0), ("ft1", 0.05), ("ft2", 0.05)):
        (root / name).mkdir()
        tensors_ = {n: (t + scale * torch.randn(t.shape, generator=g)).bfloat16() for n, t in base.items()}
        save_file(tensors_, str(root / name / "model.safetensors"), metadata={"format": "pt"})
        (root / name / "config.json").write_text("{}")


def merge_wall(tree: Path, root: Path) -> float:
    out = root / "out"
    args = ["merge", "--method", "task_arithmetic", "--base", str(root / "base")]
    args += ["--model", str(root / "ft1"), "--model", str(root / "ft2"), "-o", str(out)]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=tree, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    shutil.rmtree(out)
    return wall


def resume_wall(tree: Path, root: Path, tensors: int) -> float:
    out = root / "out"
    done = subprocess.run(
        [sys.executable, "-c", RESUME, str(root), str(out), str(tensors)],
        cwd=tree,
        check=True,
        capture_output=True,
        text=True,
    )
    shutil.rmtree(out)
    return float(done.stdout.split()[-1])


def fingerprint_s(root: Path, cold: bool) -> float:
    sys.path.insert(0, str(ROOT))
    from engine.io.checkpoint import open_checkpoint
    from engine.io.fingerprint import fingerprint

    ckpts = [open_checkpoint(root / n) for n in ("base", "ft1", "ft2")]
    times = []
    for _ in range(5):
        if cold:  # drop the inputs from the page cache (no root needed)
            for c in ckpts:
                with open(c.shards[0], "rb") as f:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        for c in ckpts:
            fingerprint(c)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="the source tree to compare with")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tensors", type=int, default=128)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the inputs (a real disk)")
    a = ap.parse_args()
    trees = {"before": a.before.resolve(), "after": ROOT}
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        root = Path(d)
        make_inputs(root, a.tensors)
        merges: dict[str, list[float]] = {k: [] for k in trees}
        resumes: dict[str, list[float]] = {k: [] for k in trees}
        for run in range(a.runs):
            for name in sorted(trees, reverse=run % 2 == 1):  # alternate which goes first
                merges[name].append(merge_wall(trees[name], root))
                resumes[name].append(resume_wall(trees[name], root, a.tensors))
        result = {
            "input_mib": 3 * a.tensors,
            "tensors": a.tensors,
            "merge_s": {k: [round(x, 3) for x in v] for k, v in merges.items()},
            "merge_median_s": {k: round(statistics.median(v), 3) for k, v in merges.items()},
            "resume_s": {k: [round(x, 3) for x in v] for k, v in resumes.items()},
            "resume_median_s": {k: round(statistics.median(v), 3) for k, v in resumes.items()},
            "fingerprint_3_models_warm_s": round(fingerprint_s(root, cold=False), 4),
            "fingerprint_3_models_cold_s": round(fingerprint_s(root, cold=True), 4),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
