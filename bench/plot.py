"""The PNG: peak RSS vs model size, throughput vs the read limit, peak RSS vs budget.

matplotlib is an optional dependency (`.[bench]`): without it `save_plot` returns None and the
caller says so. Points are medians; error bars span min..max of the repeats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GiB = 1 << 30
COLORS = {"leanmerge": "tab:blue", "naive": "tab:red", "mergekit": "tab:green"}


def _ok(runs: Sequence[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [r for r in runs if "error" not in r and all(r.get(k) == v for k, v in match.items())]


def _legend(ax: Any, **kw: Any) -> None:
    """A legend only when something was drawn (matplotlib warns about an empty one)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def _errorbar(ax: Any, xs: Sequence[float], figs: Sequence[dict[str, float]], scale: float, **kw: Any) -> None:
    """Medians joined by a line, with min..max bars."""
    med = [f["median"] / scale for f in figs]
    lo = [m - f["min"] / scale for m, f in zip(med, figs)]
    hi = [f["max"] / scale - m for m, f in zip(med, figs)]
    ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, **kw)


def rss_vs_size(ax: Any, sec: dict[str, Any]) -> None:
    for tool, color in COLORS.items():
        runs = sorted(_ok(sec["runs"], tool=tool), key=lambda r: r["input_bytes"])
        if runs:
            xs = [r["input_bytes"] / 1e9 for r in runs]
            _errorbar(ax, xs, [r["peak_rss"] for r in runs], GiB, label=tool, color=color)
    ax.axhline(sec["budget"] / GiB, color="gray", linestyle="--", label="--max-memory")
    ax.set(
        xscale="log", xlabel="inputs, base + fine-tunes (GB)", ylabel="peak RSS (GiB)", title="Peak RSS vs model size"
    )
    _legend(ax, fontsize="small")


def _series(runs: Sequence[dict[str, Any]]) -> list[tuple[str, str, str | None]]:
    """(tool, cache state, leanmerge --compile mode) of every bar series, in a stable order."""
    keys: set[tuple[str, str, str | None]] = {
        (r["tool"], r["cache"], r.get("compile")) for r in runs if "error" not in r
    }
    return sorted(keys, key=lambda k: (list(COLORS).index(k[0]), k[1] or "", k[2] or ""))


def throughput(ax: Any, sec: dict[str, Any]) -> None:
    methods = list(dict.fromkeys(r["method"] for r in sec["runs"]))
    series = _series(sec["runs"])
    modes = len({m for t, _, m in series if t == "leanmerge"})
    width = 0.8 / max(1, len(series))
    for i, (tool, state, mode) in enumerate(series):
        label: str | None = f"{tool} {state}" + (f" --compile {mode}" if tool == "leanmerge" and modes > 1 else "")
        for j, method in enumerate(methods):
            e = _ok(sec["runs"], tool=tool, method=method, cache=state, compile=mode)
            if e:
                g = e[0]["gbps"]
                err = [[g["median"] - g["min"]], [g["max"] - g["median"]]]
                alpha = 1.0 if state == "cold" else 0.5
                ax.bar(
                    j + i * width,
                    g["median"],
                    width,
                    color=COLORS[tool],
                    alpha=alpha,
                    yerr=err,
                    capsize=2,
                    hatch="//" if mode == "on" else None,
                    label=label,
                )
                label = None  # one legend entry per series
    reads = sec.get("read_limit_all_gbps", sec["read_limit_gbps"])
    ax.axhline(reads["max"], color="black", linestyle="--", label="disk read limit (fastest plain read)")
    ticks = [j + 0.4 - width / 2 for j in range(len(methods))]
    ax.set_xticks(ticks, methods, rotation=35, ha="right", fontsize="small")
    where = f", outputs on {sec['scratch']}" if sec.get("scratch") else ""  # else beside the inputs
    ax.set(ylabel="GB/s of input", title=f"Throughput ({sec['preset']}{where})")
    _legend(ax, fontsize="x-small")


def rss_vs_budget(ax: Any, sec: dict[str, Any]) -> None:
    budgets = sorted({r["budget"] for r in sec["runs"] if r["budget"] is not None})
    for method in dict.fromkeys(r["method"] for r in sec["runs"]):
        runs = sorted(_ok(sec["runs"], tool="leanmerge", method=method), key=lambda r: r["budget"])
        if runs:
            _errorbar(ax, [r["budget"] / GiB for r in runs], [r["peak_rss"] for r in runs], GiB, label=method)
        for e in _ok(sec["runs"], tool="naive", method=method):
            ax.axhline(e["peak_rss"]["median"] / GiB, color="tab:red", linestyle=":", linewidth=1)
    if budgets:
        ax.plot([b / GiB for b in budgets], [b / GiB for b in budgets], color="gray", linestyle="--", label="ceiling")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)  # with both axes log the ceiling is the diagonal
        ax.set_xticks([b / GiB for b in budgets], [f"{b / GiB:g}" for b in budgets])
        ys = [r["peak_rss"]["min"] for r in _ok(sec["runs"])] + budgets
        powers = [2.0**k for k in range(math.floor(math.log2(min(ys) / GiB)), math.ceil(math.log2(max(ys) / GiB)) + 1)]
        ax.set_yticks(powers, [f"{y:g}" for y in powers])
    ax.set(xlabel="--max-memory (GiB)", ylabel="peak RSS (GiB)", title=f"Peak RSS vs budget ({sec['preset']})")
    _legend(ax, fontsize="small", title="dotted: naive", title_fontsize="x-small")


PANELS = {"rss_vs_size": rss_vs_size, "throughput": throughput, "rss_vs_budget": rss_vs_budget}


def save_plot(results: dict[str, Any], path: Path) -> Path | None:
    """Draw one panel per section that ran into `path`; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on benchmark machines
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [n for n in PANELS if n in results["sections"]]
    if not names:
        return None
    widths = [1.8 if n == "throughput" else 1.0 for n in names]  # one group of bars per method
    fig, axes = plt.subplots(1, len(names), figsize=(6 * sum(widths), 5), squeeze=False, width_ratios=widths)
    for ax, name in zip(axes[0], names):
        PANELS[name](ax, results["sections"][name])
    m = results["machine"]
    fig.suptitle(
        f"leanmerge {results['mode']} bench: {m['cpu']}, {m['device']}, {(m.get('commit') or '?')[:10]}",
        fontsize="small",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
