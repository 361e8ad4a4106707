"""`make demo`: build three small synthetic Llama-shaped models, merge them with task arithmetic
under a 400 MiB budget through the real CLI, and check the result loads with safetensors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.make_synthetic import PRESETS, make_family  # noqa: E402


def main() -> None:
    work = ROOT / ".demo"
    shutil.rmtree(work, ignore_errors=True)
    base, models = make_family(work / "models", PRESETS["small"], n_models=3, seed=0, shards=2)
    print(f"built base {base.name} and fine-tunes {', '.join(m.name for m in models)} in {work / 'models'}")
    out = work / "merged"
    cmd = [
        sys.executable, "-m", "engine.cli", "merge",
        "--method", "task_arithmetic", "--base", str(base),
        "--model", f"{models[0]}:0.5", "--model", f"{models[1]}:0.3", "--model", f"{models[2]}:0.2",
        "--lambda", "1.0", "--max-memory", "400MiB", "--shard-size", "20MB",
        "--log-json", str(work / "events.jsonl"), "-o", str(out),
    ]  # fmt: skip
    print("$ leanmerge " + " ".join(cmd[3:]))
    subprocess.run(cmd, check=True)
    tensors: dict[str, object] = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    print(f"loaded {len(tensors)} tensors from {len(list(out.glob('*.safetensors')))} shard(s) in {out}: OK")


if __name__ == "__main__":
    main()
