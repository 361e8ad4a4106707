"""Zarr output next to safetensors: peak RSS, wall time and size of one merge written three ways,
and how well zarr's chunk compression does on a DARE'd fine-tune stored as a delta.

1. `dare_ties` (density 0.5) of a base and its fine-tunes of the preset, each run in a fresh
   process (`bench.common.run_leanmerge`, caches dropped first): `--format safetensors`,
   `--format zarr --compress none`, `--format zarr --compress zstd`.
2. Compression ratio (raw tensor bytes / stored chunk bytes) of `leanmerge convert --to zarr`
   for the plain fine-tune and for its delta after DARE at density 0.1 (90% of the delta zeroed,
   survivors rescaled by 1/0.1), both bf16, under `zstd` and `blosc`. The delta is made here with
   torch, whole tensors (the preset is small): this measures storage, not the merge.

`python -m bench.bench_zarr [--preset small] [--cache DIR]` writes `bench/results/zarr-<UTC>.json`.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from bench.common import BENCH, drop_from_page_cache, machine_info, run_leanmerge, scratch_dir
from bench.families import Family, ensure_family
from bench.report import fmt_bytes

FORMATS = (
    ("safetensors", []),
    ("zarr-none", ["--format", "zarr"]),
    ("zarr-zstd", ["--format", "zarr", "--compress", "zstd"]),
)
DELTA_DENSITY = 0.1


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def merge_runs(fam: Family, work: Path) -> list[dict[str, Any]]:
    """The same merge written in each of `FORMATS`."""
    runs = []
    for name, flags in FORMATS:
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        drop_from_page_cache(fam.files)
        args = ["--method", "dare_ties", "--base", str(fam.base), *(a for m in fam.models for a in ("--model", str(m)))]
        r = run_leanmerge(
            [*args, "--density", "0.5", "--max-memory", "2GiB", "-o", str(out), *flags], work / f"{name}.jsonl"
        )
        report = r["report"] or {}
        runs.append(
            {
                "format": name,
                "wall_s": r["wall_s"],
                "peak_rss": r["peak_rss"],
                "bytes_read": report.get("bytes_read"),
                "read_gbps": (report.get("bytes_read") or 0) / r["wall_s"] / 1e9,
                "output_disk_bytes": disk_bytes(out),
            }
        )
        shutil.rmtree(out, ignore_errors=True)
    return runs


def dare_delta(base: Path, ft: Path, out: Path, density: float, seed: int = 0) -> None:
    """Write DARE(ft - base) at `density` as a bf16 model folder (whole tensors: small presets only)."""
    import torch
    from safetensors.torch import save_file

    from engine.io.checkpoint import open_checkpoint

    from reference import load_model  # tests/reference.py: whole-model loading, fine for a bench

    g = torch.Generator().manual_seed(seed)
    b, f = load_model(base), load_model(ft)
    delta = {}
    for name, t in b.items():
        d = f[name].float() - t.float()
        keep = torch.rand(d.shape, generator=g) < density
        delta[name] = torch.where(keep, d / density, torch.zeros_like(d)).to(t.dtype).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(delta, str(out / "model.safetensors"))
    open_checkpoint(out)  # a readable model folder


def ratios(fam: Family, work: Path) -> list[dict[str, Any]]:
    """Raw bytes / stored chunk bytes of the plain fine-tune and its DARE'd delta."""
    sys.path.insert(0, str(BENCH.parent / "tests"))
    delta = work / "delta"
    dare_delta(fam.base, fam.models[0], delta, DELTA_DENSITY)
    rows = []
    for what, src in (("fine-tune", fam.models[0]), (f"dare delta d={DELTA_DENSITY}", delta)):
        for comp in ("zstd", "blosc"):
            out = work / f"conv-{comp}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [
                sys.executable,
                "-m",
                "engine.cli",
                "convert",
                str(src),
                str(out),
                "--to",
                "zarr",
                "--compress",
                comp,
            ]
            subprocess.run(cmd, check=True, capture_output=True)
            raw = sum(p.stat().st_size for p in src.glob("*.safetensors"))
            stored = sum(
                p.stat().st_size for p in (out / "model.zarr").rglob("*") if p.is_file() and p.name != "zarr.json"
            )
            rows.append(
                {"model": what, "compress": comp, "raw_bytes": raw, "stored_bytes": stored, "ratio": raw / stored}
            )
            shutil.rmtree(out, ignore_errors=True)
    return rows


@click.command()
@click.option("--preset", default="small", show_default=True, help="tools/make_synthetic.py preset.")
@click.option("--models", "n_models", default=2, show_default=True, help="Fine-tunes merged.")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=BENCH / "cache")
@click.option("--results", type=click.Path(file_okay=False, path_type=Path), default=BENCH / "results")
def main(preset: str, n_models: int, cache: Path, results: Path) -> None:
    """Measure and print the merge runs and the compression ratios; write them as JSON."""
    fam = ensure_family(cache, preset, n_models=n_models)
    work = scratch_dir(cache)
    try:
        runs, comp = merge_runs(fam, work), ratios(fam, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r in runs:
        print(
            f"{r['format']:<12} wall {r['wall_s']:.2f} s  peak RSS {fmt_bytes(r['peak_rss'])}  "
            f"read {r['read_gbps']:.2f} GB/s  on disk {fmt_bytes(r['output_disk_bytes'])}"
        )
    for c in comp:
        print(
            f"{c['model']:<22} {c['compress']:<6} ratio {c['ratio']:.2f} ({fmt_bytes(c['raw_bytes'])} -> {fmt_bytes(c['stored_bytes'])})"
        )
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"zarr-{stamp}.json"
    body = {"machine": machine_info(cache), "preset": preset, "input_bytes": fam.input_bytes, "merges": runs}
    path.write_text(json.dumps(body | {"compression": comp}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
