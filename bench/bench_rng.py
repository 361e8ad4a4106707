"""Benchmark of candidate implementations of the keyed DARE keep mask (``engine/rng.py``).

Why this exists: the keep mask is computed for every element of every merged tensor, so its
cost per element bounds DARE's throughput; and the obvious implementations differ by 2-3x on
CPU because eager torch ops are bound by cache bandwidth and per-call overhead, not
arithmetic. Each candidate is timed on ``--chunk``-element chunks (default 256K, the engine's
cache-sized chunk) with a reused ``out`` buffer, at 1 and 2 threads, median of ``--repeats``
runs (candidates interleaved within each run so background load hits them alike). The fastest
candidate that passes the quality gate is the one ``engine/rng.py`` should implement.

Candidates (all but ``e``/``f`` compute the *same* 32-bit hash as ``engine.rng``, checked
bit for bit against ``KeyedRng.bits``; see that module's docstring for the definition):

* ``a-int64-mask``: int64 lanes holding u32 values, logical shifts for free, ``& 0xFFFFFFFF``
  after each multiply-add; whole chunk at once.
* ``b-int32-naive``: int32 wrapping ops, logical shift emulated as ``(x >> 16) & 0xFFFF``,
  ``arange`` + multiply, Python-int constants, compare straight to bool; whole chunk.
* ``c-int32-blocked``: as b, but in 64K sub-blocks that stay in L2, with preallocated
  scratch, 0-dim tensor constants, a broadcast-add Weyl sequence, fused multiply-add, and a
  compare into a uint8 view of the mask.
* ``c+-engine``: ``engine.rng.KeyedRng.keep`` = c plus the last xorshift folded into one xor
  with a threshold-dependent constant (exact; see ``_keep_constants``).
* ``d-int16-view``: as c, but ``x ^= x >>> 16`` as one strided int16 xor (low half ^= high
  half) with no scratch buffer.
* ``e-2round`` / ``f-addshift``: cheaper hashes (one xorshift/multiply round fewer; or
  ``x += x >> 16`` instead of the xorshift). Included to show they fail the quality gate.

Quality gate (per hash definition, fixed keys so it is deterministic): avalanche of the
32-bit hash over the low index bits (max bit bias < 0.02 at 2**16 samples, noise ~0.007);
adjacent-index correlation of each word bit (< 6 sigma); kept fraction at d=0.1 within 6
sigma; correlation of two keys' masks (< 6 sigma); chi-square of the byte histogram
(< 400 for 255 dof, p ~ 1e-8).

Run from the repository root: ``python bench/bench_rng.py`` (``--quick`` for a smoke run).
Writes ``bench/results/rng-<UTC timestamp>.json`` with the figures and machine info.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from engine.rng import KeyedRng, keep_threshold  # noqa: E402
from engine.rng_hash import block_keys as _block_keys  # noqa: E402

M32 = 0xFFFFFFFF
M1, M2, M3 = 0x9E3779B9, 0x7FEB352D, 0x846CA68B
COLS = 1024
BLOCK = 1 << 16

# keep(rng_key, start, n, density, out_int32, mask_out_bool) -> bool mask
KeepFn = Callable[[int, int, int, float, torch.Tensor, torch.Tensor], torch.Tensor]
# words(key, lo_values_int64, hi) -> u32 words as int64, for the quality gate
WordsFn = Callable[[int, torch.Tensor, int], torch.Tensor]


def s32(v: int) -> int:
    """Signed int32 with the bit pattern of ``v``: torch rejects out-of-range int scalars."""
    v &= M32
    return v - (1 << 32) if v & 0x80000000 else v


# ---------------------------------------------------------------- reference hash definitions
# Vectorised int64 versions (values kept in [0, 2**32)), used by the quality gate. Slow but
# obviously correct: logical shifts are plain shifts on non-negative int64.


def words_xor3(key: int, lo: torch.Tensor, hi: int) -> torch.Tensor:
    """engine.rng's hash (three xorshift rounds) of indices ``hi * 2**32 + lo``."""
    k0, k1, k2 = _block_keys(key, hi)
    x = ((lo + k0) * M1) & M32
    x ^= x >> 16
    x = (x * M2 + k1) & M32
    x ^= x >> 16
    x = (x * M3 + k2) & M32
    x ^= x >> 16
    return x ^ 0x80000000


def words_xor2(key: int, lo: torch.Tensor, hi: int) -> torch.Tensor:
    """Candidate e: one multiply/xorshift round fewer than engine.rng."""
    k0, k1, _ = _block_keys(key, hi)
    x = ((lo + k0) * M1) & M32
    x ^= x >> 16
    x = (x * M2 + k1) & M32
    x ^= x >> 16
    return x ^ 0x80000000


def words_addshift(key: int, lo: torch.Tensor, hi: int) -> torch.Tensor:
    """Candidate f: ``x += x >> 16`` (arithmetic shift, two ops) instead of the xorshift."""
    k0, k1, k2 = _block_keys(key, hi)

    def mix(x: torch.Tensor) -> torch.Tensor:
        sx = torch.where(x >= 0x80000000, x - (1 << 32), x)  # signed value
        return (x + (sx >> 16)) & M32

    x = mix(((lo + k0) * M1) & M32)
    x = mix((x * M2 + k1) & M32)
    x = mix((x * M3 + k2) & M32)
    return x ^ 0x80000000


# ---------------------------------------------------------------------------- candidates


def keep_a_int64(key: int, start: int, n: int, d: float, out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """a: u32 values in int64 lanes, ``& 0xFFFFFFFF`` after multiply-adds (single segment)."""
    k0, k1, k2 = _block_keys(key, start >> 32)
    lo = start & M32
    x = torch.arange(lo, lo + n, dtype=torch.int64)
    x.add_(k0).mul_(M1).bitwise_and_(M32)
    t = torch.empty_like(x)
    for mul, add in ((M2, k1), (M3, k2), (0, 0)):
        torch.bitwise_right_shift(x, 16, out=t)
        x.bitwise_xor_(t)
        if mul:
            x.mul_(mul).add_(add).bitwise_and_(M32)
    x.bitwise_xor_(0x80000000)
    return torch.lt(x, keep_threshold(d), out=mask)


def _xs3(x: torch.Tensor, t: torch.Tensor, s16: torch.Tensor | int, ff: torch.Tensor | int) -> None:
    torch.bitwise_right_shift(x, s16, out=t)
    t.bitwise_and_(ff)
    x.bitwise_xor_(t)


def keep_b_naive(key: int, start: int, n: int, d: float, out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """b: int32 wrapping ops over the whole chunk, Python-int constants, bool compare."""
    k0, k1, k2 = _block_keys(key, start >> 32)
    lo = start & M32
    x = out
    torch.arange(n, out=x)
    x.add_(s32(lo + k0)).mul_(s32(M1))
    t = torch.empty_like(x)
    _xs3(x, t, 16, 0xFFFF)
    x.mul_(s32(M2)).add_(s32(k1))
    _xs3(x, t, 16, 0xFFFF)
    x.mul_(s32(M3)).add_(s32(k2))
    _xs3(x, t, 16, 0xFFFF)
    return torch.lt(x, keep_threshold(d) - 0x80000000, out=mask)


def _make_blocked(xs: str) -> KeepFn:
    """c / d: 64K sub-blocks, 0-dim constants, broadcast Weyl, fused multiply-add, uint8 compare."""

    def keep(key: int, start: int, n: int, d: float, out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        k0, k1, k2 = _block_keys(key, start >> 32)
        lo = start & M32
        thr = keep_threshold(d)
        c = torch.tensor([16, 0xFFFF, s32(k1), s32(k2), thr - 0x80000000], dtype=torch.int32).unbind()
        s16, ff, kk1, kk2, sthr = c
        b = min(n, BLOCK)
        work, t = out[:b], out[b : 2 * b]
        cols = torch.arange(COLS, dtype=torch.int32).mul_(s32(M1))
        rows = torch.arange(-(-n // COLS), dtype=torch.int32).mul_(s32(COLS * M1)).add_(s32((lo + k0) * M1))
        rows2d, cols2d = rows.view(-1, 1), cols.view(1, COLS)
        mu = mask.view(torch.uint8)

        def mix(x: torch.Tensor, tt: torch.Tensor) -> None:
            if xs == "xor3":
                _xs3(x, tt, s16, ff)
            else:  # int16 view: little-endian, so element 2k is the low half, 2k+1 the high half
                h = x.view(torch.int16)
                h[0::2].bitwise_xor_(h[1::2])

        for p in range(0, n, b):
            m = min(b, n - p)
            x, tt = (work, t) if m == b else (work[:m], t[:m])
            torch.add(rows2d[p // COLS : (p + m) // COLS], cols2d, out=x.view(-1, COLS))
            mix(x, tt)
            torch.add(kk1, x, alpha=s32(M2), out=x)
            mix(x, tt)
            torch.add(kk2, x, alpha=s32(M3), out=x)
            mix(x, tt)
            torch.lt(x, sthr, out=mu[p : p + m])
        return mask

    return keep


def keep_e_2round(key: int, start: int, n: int, d: float, out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """e: like c with one round fewer (Weyl, xorshift, multiply-add, xorshift)."""
    k0, k1, _ = _block_keys(key, start >> 32)
    lo = start & M32
    c = torch.tensor([16, 0xFFFF, s32(k1), keep_threshold(d) - 0x80000000], dtype=torch.int32).unbind()
    s16, ff, kk1, sthr = c
    b = min(n, BLOCK)
    work, t = out[:b], out[b : 2 * b]
    cols = torch.arange(COLS, dtype=torch.int32).mul_(s32(M1)).view(1, COLS)
    rows = torch.arange(-(-n // COLS), dtype=torch.int32).mul_(s32(COLS * M1)).add_(s32((lo + k0) * M1)).view(-1, 1)
    mu = mask.view(torch.uint8)
    for p in range(0, n, b):
        m = min(b, n - p)
        x, tt = (work, t) if m == b else (work[:m], t[:m])
        torch.add(rows[p // COLS : (p + m) // COLS], cols, out=x.view(-1, COLS))
        _xs3(x, tt, s16, ff)
        torch.add(kk1, x, alpha=s32(M2), out=x)
        _xs3(x, tt, s16, ff)
        torch.lt(x, sthr, out=mu[p : p + m])
    return mask


def keep_f_addshift(key: int, start: int, n: int, d: float, out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """f: like c with ``x += x >> 16`` (two ops) in place of each xorshift (three ops)."""
    k0, k1, k2 = _block_keys(key, start >> 32)
    lo = start & M32
    c = torch.tensor([16, s32(k1), s32(k2), keep_threshold(d) - 0x80000000], dtype=torch.int32).unbind()
    s16, kk1, kk2, sthr = c
    b = min(n, BLOCK)
    work, t = out[:b], out[b : 2 * b]
    cols = torch.arange(COLS, dtype=torch.int32).mul_(s32(M1)).view(1, COLS)
    rows = torch.arange(-(-n // COLS), dtype=torch.int32).mul_(s32(COLS * M1)).add_(s32((lo + k0) * M1)).view(-1, 1)
    mu = mask.view(torch.uint8)
    for p in range(0, n, b):
        m = min(b, n - p)
        x, tt = (work, t) if m == b else (work[:m], t[:m])
        torch.add(rows[p // COLS : (p + m) // COLS], cols, out=x.view(-1, COLS))
        for mul, kk in ((M2, kk1), (M3, kk2), (0, None)):
            torch.bitwise_right_shift(x, s16, out=tt)
            x.add_(tt)
            if kk is not None:
                torch.add(kk, x, alpha=s32(mul), out=x)
        torch.lt(x, sthr, out=mu[p : p + m])
    return mask


def keep_engine(key: int, start: int, n: int, d: float, out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """c+: the shipped implementation."""
    return KeyedRng(key).keep(start, n, d, out=out, mask_out=mask)


CANDIDATES: dict[str, tuple[KeepFn, WordsFn]] = {
    "a-int64-mask": (keep_a_int64, words_xor3),
    "b-int32-naive": (keep_b_naive, words_xor3),
    "c-int32-blocked": (_make_blocked("xor3"), words_xor3),
    "c+-engine": (keep_engine, words_xor3),
    "d-int16-view": (_make_blocked("int16"), words_xor3),
    "e-2round": (keep_e_2round, words_xor2),
    "f-addshift": (keep_f_addshift, words_addshift),
}


# ---------------------------------------------------------------------------- quality gate


def quality(words: WordsFn) -> dict[str, float | bool]:
    """Statistics of one hash definition with fixed keys; ``pass`` if all are within bounds.

    Bounds are far outside sampling noise (so a good hash never fails) yet far below what a
    structured hash produces (the rejected candidates exceed them by 2-100x).
    """
    gen = torch.Generator().manual_seed(1234)  # a local generator: only picks sample inputs
    key_a, key_b = 0x0123456789ABCDEF, 0xFEDCBA9876543210
    # Avalanche: flip each low index bit, measure each output bit's flip probability.
    ns = 1 << 16
    lo = torch.randint(0, 1 << 32, (ns,), dtype=torch.int64, generator=gen)
    base = words(key_a, lo, 7)
    shifts = torch.arange(32, dtype=torch.int64)
    worst = 0.0
    for j in range(32):
        diff = base ^ words(key_a, lo ^ (1 << j), 7)
        p = ((diff[:, None] >> shifts) & 1).double().mean(0)
        worst = max(worst, float((p - 0.5).abs().max()))
    # Sequential statistics over 1M consecutive indices.
    n = 1 << 20
    idx = torch.arange(n, dtype=torch.int64) + 12345
    w = words(key_a, idx, 0)
    bits = ((w[:, None] >> shifts) & 1).double()
    b0, b1 = bits[:-1] - bits[:-1].mean(0), bits[1:] - bits[1:].mean(0)
    corr = (b0 * b1).mean(0) / (b0.std(0) * b1.std(0))
    serial_sigma = float(corr.abs().max()) * math.sqrt(n - 1)
    thr = keep_threshold(0.1)
    ka, kb = (w < thr).double(), (words(key_b, idx, 0) < thr).double()
    frac_sigma = abs(float(ka.mean()) - thr / 2**32) / math.sqrt(0.1 * 0.9 / n)
    cross_sigma = abs(float(torch.corrcoef(torch.stack([ka, kb]))[0, 1])) * math.sqrt(n)
    byts = torch.cat([(w >> s) & 0xFF for s in (0, 8, 16, 24)])
    hist = torch.bincount(byts, minlength=256).double()
    expect = byts.numel() / 256
    chi2 = float(((hist - expect) ** 2 / expect).sum())
    ok = worst < 0.02 and serial_sigma < 6 and frac_sigma < 6 and cross_sigma < 6 and chi2 < 400
    return {
        "avalanche_max_bias": worst,
        "serial_corr_sigma": serial_sigma,
        "kept_fraction_sigma": frac_sigma,
        "cross_key_corr_sigma": cross_sigma,
        "byte_chi2_255dof": chi2,
        "pass": ok,
    }


def same_bits_as_engine(fn: KeepFn, words: WordsFn, chunk: int) -> bool:
    """Whether a candidate's masks equal the mask its word definition implies (and, for the
    engine's definition, ``KeyedRng.bits`` itself): guards the timing against wrong code."""
    key, start = 0x5EED, 3 * chunk + 17
    for d in (0.1, 0.5, 0.9):
        out = torch.empty(chunk, dtype=torch.int32)
        mask = torch.empty(chunk, dtype=torch.bool)
        got = fn(key, start, chunk, d, out, mask)
        lo = torch.arange(start, start + chunk, dtype=torch.int64)
        want = words(key, lo, 0) < keep_threshold(d)
        if not torch.equal(got, want):
            return False
    if words is words_xor3:
        eng = KeyedRng(key).bits(start, chunk).to(torch.int64) & M32
        return torch.equal(eng, words(key, torch.arange(start, start + chunk, dtype=torch.int64), 0))
    return True


# ---------------------------------------------------------------------------- timing


def time_all(names: list[str], chunk: int, calls: int, repeats: int, threads: int) -> dict[str, list[float]]:
    """ns/element of each candidate: ``repeats`` runs of ``calls`` chunks, interleaved."""
    torch.set_num_threads(threads)
    out = torch.empty(chunk, dtype=torch.int32)
    mask = torch.empty(chunk, dtype=torch.bool)
    res: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up
        for k in range(3):
            CANDIDATES[name][0](0xABC, k * chunk, chunk, 0.1, out, mask)
    for _ in range(repeats):
        for name in names:
            fn = CANDIDATES[name][0]
            t0 = time.perf_counter()
            for k in range(calls):
                fn(0xABC, k * chunk, chunk, 0.1, out, mask)
            res[name].append((time.perf_counter() - t0) / (calls * chunk) * 1e9)
    return res


def machine_info() -> dict[str, object]:
    """What the figures were measured on, so results files can be compared honestly."""
    cpu = platform.processor() or "unknown"
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("unknown", "x86_64", ""):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "sse4")))
    except OSError:
        pass
    commit: str | None = None
    try:
        proc = subprocess.run(
            ["git", "-C", str(_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
        commit = (proc.stdout.strip() or None) if proc.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "cpu_model": cpu,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "loadavg_start": list(os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the gate and the timings, print a table, write the JSON results file."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--chunk", type=int, default=1 << 18, help="elements per keep() call")
    ap.add_argument("--calls", type=int, default=20, help="chunks per timed run")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per candidate (median reported)")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    ap.add_argument("--quick", action="store_true", help="smoke run: few repeats, no JSON")
    ap.add_argument("--out-dir", type=Path, default=_ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    if args.quick:
        args.calls, args.repeats = 3, 5
    info = machine_info()
    names = list(CANDIDATES)
    gate: dict[str, dict[str, float | bool]] = {}
    words_seen: dict[str, dict[str, float | bool]] = {}
    for name in names:
        fn, words = CANDIDATES[name]
        if words.__name__ not in words_seen:
            words_seen[words.__name__] = quality(words)
        g = dict(words_seen[words.__name__])
        g["bits_ok"] = same_bits_as_engine(fn, words, min(args.chunk, 1 << 16))
        gate[name] = g
    threads = [int(t) for t in args.threads.split(",")]
    timings = {th: time_all(names, args.chunk, args.calls, args.repeats, th) for th in threads}
    info["loadavg_end"] = list(os.getloadavg())

    def med(v: list[float]) -> float:
        s = sorted(v)
        return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2

    head = f"{'candidate':18s}" + "".join(f"  {th}thr med (min)" for th in threads) + "   gate  avalanche  serialσ"
    print(head)
    print("-" * len(head))
    rows = []
    for name in names:
        g = gate[name]
        cells = "".join(f"  {med(timings[th][name]):6.3f} ({min(timings[th][name]):5.3f})" for th in threads)
        ok = bool(g["pass"]) and bool(g["bits_ok"])
        print(
            f"{name:18s}{cells}   {'pass' if ok else 'FAIL':4s}  {float(g['avalanche_max_bias']):9.4f}"
            f"  {float(g['serial_corr_sigma']):7.2f}"
        )
        rows.append(
            {
                "candidate": name,
                "gate": g,
                "passes": ok,
                "ns_per_element": {
                    str(th): {
                        "median": med(timings[th][name]),
                        "min": min(timings[th][name]),
                        "runs": timings[th][name],
                    }
                    for th in threads
                },
            }
        )
    passing = [r for r in rows if r["passes"]]
    best = min(passing, key=lambda r: r["ns_per_element"][str(threads[0])]["median"])  # type: ignore[index]
    print(f"\nfastest passing at {threads[0]} thread(s): {best['candidate']}")
    print(f"loadavg start {info['loadavg_start']} end {info['loadavg_end']} (other load skews timings)")
    if not args.quick:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        args.out_dir.mkdir(parents=True, exist_ok=True)
        path = args.out_dir / f"rng-{stamp}.json"
        payload = {
            "bench": "rng.keep",
            "utc": stamp,
            "chunk": args.chunk,
            "calls": args.calls,
            "repeats": args.repeats,
            "density": 0.1,
            "machine": info,
            "results": rows,
            "fastest_passing": best["candidate"],
        }
        path.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
