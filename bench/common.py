"""What every benchmark needs: the machine's description, page-cache control, the disk's read
limit, and merges run in fresh processes with their wall time and peak RSS.

Every merge runs in its own process, started by the lean launcher `bench.measure`, because the
figure that matters is the whole process's peak RSS (interpreter and torch included), and
`ru_maxrss` from `wait4` is only honest when the process that spawns the merge is small (see
`bench/measure.py`). Cold-cache runs drop the inputs with `posix_fadvise(DONTNEED)`, which needs
no root, instead of `/proc/sys/vm/drop_caches`.
"""

from __future__ import annotations

import datetime as dt
import json
import mmap
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
NAIVE_SCRIPT = BENCH / "naive_merge.py"
READ_BUFFER = 32 << 20  # as the engine's largest stream block: larger reads are no faster
GB = 1e9
ERROR_TAIL = 2000  # characters of a failed child's stderr quoted in the exception

Params = Mapping[str, float]


class RunFailed(RuntimeError):
    """A measured child exited non-zero; the message ends with its stderr tail."""


# ----------------------------------------------------------------------------- the machine


def machine_info(cache_dir: Path | None = None) -> dict[str, Any]:
    """Who ran the benchmark where: CPU, RAM, disk of the cache, versions, commit, device.

    Results without this are not comparable: throughput depends on the disk, RSS on torch's version.
    """
    import torch  # here, not at module level: the lean launcher imports nothing heavy

    disk_path = (cache_dir or ROOT).resolve()
    while not disk_path.exists():  # the cache may not exist yet: describe its filesystem
        disk_path = disk_path.parent
    usage = shutil.disk_usage(disk_path)
    commit, dirty = git_commit(ROOT)
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "ram_total": psutil.virtual_memory().total,
        "ram_available": psutil.virtual_memory().available,
        "disk": {"path": str(disk_path), "total": usage.total, "free": usage.free, **mount_of(disk_path)},
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": commit,
        "dirty": dirty,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "hostname": socket.gethostname(),
        "loadavg": os.getloadavg(),  # a busy shared machine skews every figure
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (absent on some ARM kernels: fall back)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mount_of(path: Path) -> dict[str, str]:
    """Device and filesystem type of the mount holding `path` (longest matching mount point)."""
    best = ("", "", "")
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        device, mount, fstype = (f.replace("\\040", " ") for f in fields[:3])
        if (path == Path(mount) or Path(mount) in path.parents) and len(mount) > len(best[1]):
            best = (device, mount, fstype)
    return {"device": best[0], "mount": best[1], "fstype": best[2]} if best[1] else {}


def git_commit(repo: Path) -> tuple[str | None, bool | None]:
    """HEAD of `repo` and whether tracked files differ from it; (None, None) outside git.

    `--no-optional-locks` keeps `git status` from rewriting the index while others work in it.
    """
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        status = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    if head.returncode != 0:
        return None, None
    return head.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None


# ------------------------------------------------------------------------- page cache, disk


def files_of(paths: Iterable[Path]) -> list[Path]:
    """Every regular file under each path (a file stands for itself), in a stable order."""
    out: list[Path] = []
    for p in paths:
        out += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return out


def drop_from_page_cache(paths: Iterable[Path]) -> None:
    """Evict every file of each model folder (or file) from the page cache, without root.

    Dirty pages cannot be dropped, so each file is flushed first: a family generated a moment
    ago would otherwise stay cached and make a "cold" run warm.
    """
    for f in files_of(paths):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_files(files: Sequence[Path], buffer: bytearray | None = None) -> int:
    """Read the files front to back, file after file, into one reused buffer; returns bytes read.

    `preadv` into a reused buffer adds nothing to RSS, unlike mmap (DESIGN.md).
    """
    view = memoryview(buffer if buffer is not None else bytearray(READ_BUFFER))
    total = 0
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            pos = 0
            while got := os.preadv(fd, [view], pos):
                pos += got
            total += pos
        finally:
            os.close(fd)
    return total


def read_limit(paths: Sequence[Path]) -> float:
    """Cold read speed of the files in GB/s: the physical limit a merge can reach.

    The fastest plain way to read them, measured both ways: one thread reading the files front
    to back through the page cache, and one thread per folder (model) reading its files front to
    back with O_DIRECT, all folders at once, as the engine reads. On this VM's disk the second
    keeps 0.9-1.3 GB/s when the first sags to 0.7 after minutes of reading, so taking only the
    first would flatter every merge.
    """
    files = files_of(paths)
    drop_from_page_cache(files)
    t0 = time.perf_counter()
    n = read_files(files)
    sequential = n / (time.perf_counter() - t0) / GB
    return max(sequential, read_parallel_direct(files))


def read_parallel_direct(files: Sequence[Path]) -> float:
    """GB/s of one thread per folder, each reading its files front to back with O_DIRECT into
    an aligned buffer (buffered where the filesystem refuses O_DIRECT), the folders at once."""
    groups: dict[Path, list[Path]] = {}
    for f in files:
        groups.setdefault(f.parent, []).append(f)
    drop_from_page_cache(files)

    def read_group(group: list[Path]) -> int:
        buffer = mmap.mmap(-1, READ_BUFFER)  # page-aligned, as O_DIRECT needs
        try:
            return sum(read_direct(f, buffer) for f in group)
        finally:
            buffer.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(groups) or 1) as pool:
        n = sum(pool.map(read_group, groups.values()))
    return n / (time.perf_counter() - t0) / GB


def read_direct(f: Path, buffer: mmap.mmap) -> int:
    """Bytes of `f` read front to back into `buffer`, with O_DIRECT where allowed."""
    try:
        fd = os.open(f, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:  # tmpfs and friends: no O_DIRECT
        fd = os.open(f, os.O_RDONLY)
    try:
        pos = 0
        while (got := os.preadv(fd, [buffer], pos)) > 0:
            pos += got
            if got < len(buffer):  # the file's end (a direct read stops short only there)
                break
        return pos
    finally:
        os.close(fd)


def read_hot(paths: Sequence[Path]) -> float:
    """Sequential read speed in GB/s with the files in the page cache (a warm merge's ceiling)."""
    files = files_of(paths)
    buffer = bytearray(READ_BUFFER)
    read_files(files, buffer)
    t0 = time.perf_counter()
    n = read_files(files, buffer)
    return n / (time.perf_counter() - t0) / GB


def warm_page_cache(paths: Sequence[Path]) -> None:
    """Read the files once so that the next run finds them in the page cache."""
    read_files(files_of(paths))


# --------------------------------------------------------------------------- measured runs


def child_env() -> dict[str, str]:
    """The environment of measured children: this one, with the repository importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def measured(cmd: list[str], logdir: Path, name: str, timeout_s: float | None = None) -> dict[str, Any]:
    """Run `cmd` under the lean launcher; wall, peak RSS and CPU time of that process alone.

    `timeout_s`: a run still going after it is killed with its launcher (their own process
    group), so a hung merge cannot spend a lent machine's whole budget.

    Raises:
        RunFailed: the command exited non-zero or timed out (the message quotes its stderr tail).
    """
    logdir.mkdir(parents=True, exist_ok=True)
    result, out, err = (logdir / f"{name}.{k}" for k in ("measure.json", "stdout", "stderr"))
    launcher = [sys.executable, "-m", "bench.measure", str(result), str(out), str(err), "--", *cmd]
    proc = subprocess.Popen(
        launcher,
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, launcher_err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher leads the group; the command is in it
        proc.communicate()
        tail = err.read_text(errors="replace")[-ERROR_TAIL:] if err.exists() else ""
        raise RunFailed(f"{name} timed out after {timeout_s:g} s and was killed: {' '.join(cmd)}\n{tail}") from None
    if proc.returncode != 0:
        raise RunFailed(f"{name}: the launcher failed ({proc.returncode}): {launcher_err[-ERROR_TAIL:]}")
    figures: dict[str, Any] = json.loads(result.read_text())
    if figures["returncode"] != 0:
        tail = err.read_text(errors="replace")[-ERROR_TAIL:]
        raise RunFailed(f"{name} exited {figures['returncode']}: {' '.join(cmd)}\n{tail}")
    return figures


def last_event(log_json: Path, event: str) -> dict[str, Any] | None:
    """The last JSON-lines event of kind `event` in a log, or None."""
    found = None
    if log_json.exists():
        for line in log_json.read_text().splitlines():
            if line.strip():
                e = json.loads(line)
                found = e if e.get("event") == event else found
    return found


def run_leanmerge(args: list[str], log_json: Path, timeout_s: float | None = None) -> dict[str, Any]:
    """`leanmerge merge ARGS` in a fresh process: wall s, peak RSS bytes and the engine's report.

    Args:
        args: everything after `merge` (inputs, method, `-o`, `--max-memory`, ...).
        log_json: where the engine writes its JSON-lines events; its folder also gets the
            child's stdout and stderr.
    """
    cmd = [sys.executable, "-m", "engine.cli", "merge", *args, "--log-json", str(log_json), "--no-progress"]
    figures = measured(cmd, log_json.parent, "leanmerge", timeout_s)
    return {"tool": "leanmerge", **figures, "report": last_event(log_json, "report")}


def run_naive(method: str, base: Path, models: Sequence[Path], out: Path, params: Params) -> dict[str, Any]:
    """The whole-tensor baseline (`bench/naive_merge.py`) in a fresh process, measured the same way."""
    log_json = out.parent / f"{out.name}.naive.jsonl"
    cmd = [sys.executable, str(NAIVE_SCRIPT), "--method", method, "--base", str(base), "--out", str(out)]
    cmd += [a for m in models for a in ("--model", str(m))]
    cmd += [a for k, v in sorted(params.items()) for a in (f"--{k}", str(v))]
    figures = measured([*cmd, "--log-json", str(log_json)], out.parent, "naive")
    return {"tool": "naive", **figures, "report": last_event(log_json, "report")}


# Methods whose result does not involve the base: mergekit 0.1.5's linear refuses a base_model
# without a weight of its own, and leanmerge's linear uses the base only as a template.
MERGEKIT_NO_BASE = frozenset({"linear"})
# Global parameters mergekit requires and has no default for: given leanmerge's defaults.
MERGEKIT_REQUIRED = {"slerp": ("t",)}


def run_mergekit(
    method: str, base: Path, models: Sequence[Path], out: Path, params: Params, dtype: str = "bfloat16"
) -> dict[str, Any] | None:
    """The same merge through mergekit when `mergekit-yaml` is installed; None (skip) otherwise.

    The config is written as JSON, which is valid YAML. mergekit computes in `dtype` (bf16 here,
    its default for bf16 inputs and its fastest setting; leanmerge always computes in float32).
    Paths are absolute and the model card is off: mergekit 0.1.5 looks relative paths up on the
    Hub for the card, and fails without network. The tokenizer is not copied (leanmerge copies
    files; mergekit would rebuild it through transformers, which the synthetic one does not
    survive).
    """
    exe = shutil.which("mergekit-yaml")
    if exe is None:
        return None
    model_params = {"weight": 1.0, **{k: v for k, v in params.items() if k == "density"}}
    config: dict[str, Any] = {"merge_method": method}
    if method not in MERGEKIT_NO_BASE:
        config["base_model"] = str(base.resolve())
    config |= {"models": [{"model": str(m.resolve()), "parameters": model_params} for m in models], "dtype": dtype}
    if method in MERGEKIT_REQUIRED:
        from engine.methods.registry import METHODS

        config["parameters"] = {
            d.name: d.default for d in METHODS[method].params if d.name in MERGEKIT_REQUIRED[method]
        }
    cfg = out.parent / f"{out.name}.mergekit.yml"
    cfg.write_text(json.dumps(config, indent=2))
    flags = ["--no-copy-tokenizer", "--no-write-model-card", "--random-seed", "0", "--quiet"]
    figures = measured([exe, str(cfg), str(out), *flags], out.parent, "mergekit")
    return {"tool": "mergekit", **figures, "report": None}


def scratch_dir(root: Path) -> Path:
    """A fresh folder for one run's output and logs under `root`/tmp: the cache (the inputs'
    disk) unless `--scratch` names another place."""
    parent = root / "tmp"
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="run-", dir=parent))


# ------------------------------------------------------------------------------- figures


def stats(values: Sequence[float]) -> dict[str, Any]:
    """min / median / max of the repeats, with their count and the raw values."""
    if not values:
        raise ValueError("stats of no values")
    vals = [float(v) for v in values]
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "runs": len(vals), "values": vals}
