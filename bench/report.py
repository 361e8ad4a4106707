"""Results for people: a one-screen text table and a PNG of the three headline plots.

Both read only the results dict (the JSON), so an old result file can be re-rendered. Cells show
the median of the repeats; the JSON keeps min / median / max and every value.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

Entry = dict[str, Any]
W = 15  # width of a value column


def fmt_bytes(n: float) -> str:
    """Binary units, three significant digits: RSS is compared against GiB budgets."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


def fmt_size(n: float) -> str:
    """Decimal units for model sizes, as disks and model cards count them."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def find(runs: Iterable[Entry], **match: Any) -> Entry | None:
    """The first entry whose labels equal `match`."""
    return next((r for r in runs if all(r.get(k) == v for k, v in match.items())), None)


def cell(e: Entry | None, figure: str, fmt: str = "bytes") -> str:
    """One table cell: the median of `figure`, '-' when not run, 'error' when the run failed."""
    if e is None:
        return "-"
    if "error" in e:
        return "error"
    v = e[figure]["median"]
    return fmt_bytes(v) if fmt == "bytes" else f"{v:.3g}"


def header(results: dict[str, Any]) -> list[str]:
    m = results["machine"]
    disk = m.get("disk", {})
    commit = (m.get("commit") or "?")[:10] + (" (dirty)" if m.get("dirty") else "")
    lines = [
        f"leanmerge bench, {results['mode']} mode, {m['timestamp']}, {results.get('elapsed_s', 0):.0f} s",
        f"{m['cpu']} | {m['cores']} cores | RAM {fmt_bytes(m['ram_total'])} | disk {disk.get('device', '?')} "
        f"{disk.get('free', 0) / 1e9:.0f} GB free | {m['device']} | torch {m['torch']} | {commit}",
    ]
    if results.get("unfinished"):  # written after each section: the run is still going, or was stopped
        lines.append(f"PARTIAL: not yet run when this was written: {', '.join(results['unfinished'])}")
    return lines


def budget_table(sec: dict[str, Any]) -> list[str]:
    runs = sec["runs"]
    budgets = sorted({r["budget"] for r in runs if r["budget"] is not None})
    methods = list(dict.fromkeys(r["method"] for r in runs))
    lines = [
        f"peak RSS vs --max-memory ({sec['preset']}, {fmt_size(sec['input_bytes'])} of inputs)",
        f"{'method':<17}" + "".join(f"{fmt_bytes(b):>{W}}" for b in budgets) + f"{'naive':>{W}}{'mergekit':>{W}}",
    ]
    for method in methods:
        compiled = any(r.get("compiled") for r in runs if r["method"] == method)
        row = f"{method + (' *' if compiled else ''):<17}"
        for b in budgets:
            e = find(runs, tool="leanmerge", method=method, budget=b)
            mark = "" if e is None or "error" in e else (" ok" if e["within_budget"] else " OVER")
            row += f"{cell(e, 'peak_rss') + mark:>{W}}"
        row += "".join(f"{cell(find(runs, tool=t, method=method), 'peak_rss'):>{W}}" for t in ("naive", "mergekit"))
        lines.append(row)
    return lines + compiled_note(runs)


def size_table(sec: dict[str, Any]) -> list[str]:
    runs = sec["runs"]
    presets = list(dict.fromkeys(r["preset"] for r in runs))
    lines = [
        f"peak RSS vs model size (leanmerge at --max-memory {fmt_bytes(sec['budget'])})",
        f"{'preset':<17}{'method':<17}{'inputs':>10}{'leanmerge':>{W}}{'naive':>{W}}{'mergekit':>{W}}",
    ]
    for p in presets:
        for method in dict.fromkeys(r["method"] for r in runs if r["preset"] == p):
            lean = find(runs, tool="leanmerge", preset=p, method=method)
            size = next(r["input_bytes"] for r in runs if r["preset"] == p)
            cells = [cell(find(runs, tool=t, preset=p, method=method), "peak_rss") for t in ("naive", "mergekit")]
            method = method + (" *" if lean and lean.get("compiled") else "")
            lines.append(
                f"{p:<17}{method:<17}{fmt_size(size):>10}{cell(lean, 'peak_rss'):>{W}}"
                + "".join(f"{c:>{W}}" for c in cells)
            )
    lean = [r for r in runs if r["tool"] == "leanmerge" and "error" not in r]
    out_of_core = [r for r in lean if r["input_bytes"] > sec["budget"]]
    if len(out_of_core) > 1:  # the claim: bounded whatever the size, once the models outgrow the budget
        peaks, sizes = [r["peak_rss"]["median"] for r in out_of_core], [r["input_bytes"] for r in out_of_core]
        lines.append(
            f"leanmerge peak RSS over the models larger than the budget ({fmt_size(min(sizes))} to "
            f"{fmt_size(max(sizes))}): largest / smallest {max(peaks) / min(peaks):.2f}x"
        )
    if len(lean) > len(out_of_core):
        lines.append("(smaller models never fill the block buffers: blocks are no larger than the largest tensor)")
    lines += compiled_note(runs)
    return lines


def lean_label(e: Entry | None, modes: int) -> str:
    """A leanmerge row's name: the method, its --compile mode when several ran, * when compiled."""
    if e is None:
        return "?"
    return str(e["method"]) + (f" --compile {e['compile']}" if modes > 1 else "") + (" *" if e.get("compiled") else "")


def compiled_note(runs: Iterable[Entry]) -> list[str]:
    """The footnote for rows marked *, when any leanmerge run was compiled."""
    if any(r.get("compiled") for r in runs):
        return [
            "* fused kernel (leanmerge --compile), loaded from the kernel cache: the bench builds it before measuring"
        ]
    return []


def read_limit_text(sec: dict[str, Any]) -> str:
    """The limit `cold/limit` divides by: the fastest plain read of the inputs in the run."""
    reads = sec.get("read_limit_all_gbps", sec["read_limit_gbps"])
    return f"{reads['max']:.2f} GB/s (fastest of {reads['runs']} reads in this run, median {reads['median']:.2f})"


def fewer_inputs(runs: list[dict[str, Any]], family_bytes: int) -> str:
    """Which methods read less than the whole family (linear skips the base, slerp takes one model)."""
    less = dict.fromkeys(f"{r['method']} {fmt_size(r['input_bytes'])}" for r in runs if r["input_bytes"] < family_bytes)
    return f"; {', '.join(less)}" if less else ""


def throughput_table(sec: dict[str, Any]) -> list[str]:
    runs = sec["runs"]
    hot = sec.get("read_hot_gbps")
    rows = list(dict.fromkeys((r["method"], r.get("compile")) for r in runs if r["tool"] == "leanmerge"))
    modes = len({m for _, m in rows})
    labels = [lean_label(find(runs, tool="leanmerge", method=m, compile=c), modes) for m, c in rows]
    w = max([17, *(len(x) + 2 for x in labels)])
    heads = ("lean cold", "lean warm", "naive cold", "naive warm", "mk cold", "mk warm", "cold/limit", "cold/before")
    heads += ("disk/limit",)
    lines = [
        f"throughput, GB/s of the input each merge reads ({sec['preset']}, {fmt_size(sec['input_bytes'])}"
        f"{fewer_inputs(runs, sec['input_bytes'])}): read limit cold "
        f"{read_limit_text(sec)}" + (f", page-cache read {hot['median']:.2f} GB/s" if hot else ""),
        f"{'method':<{w}}" + "".join(f"{h:>11}" for h in heads[:-2]) + "".join(f"{h:>12}" for h in heads[-2:]),
    ]
    for (method, mode), label in zip(rows, labels):
        row = f"{label:<{w}}"
        for tool in ("leanmerge", "naive", "mergekit"):
            for state in ("cold", "warm"):
                match = {"compile": mode} if tool == "leanmerge" else {}
                row += f"{cell(find(runs, tool=tool, method=method, cache=state, **match), 'gbps', 'num'):>11}"
        lean_cold = find(runs, tool="leanmerge", method=method, cache="cold", compile=mode)
        before = cell(lean_cold, "ratio_before", "num") if lean_cold and "ratio_before" in lean_cold else "-"
        disk = cell(lean_cold, "disk_ratio", "num") if lean_cold and "disk_ratio" in lean_cold else "-"
        lines.append(row + f"{cell(lean_cold, 'ratio', 'num'):>11}{before:>12}{disk:>12}")
    where = f"outputs went to {sec['scratch']}" if sec.get("scratch") else "the output shares the disk"
    note = (
        "cold/limit: over the fastest read; cold/before: each run over the read just before it; disk/limit:"
        f" bytes read + written per second over the fastest read ({where}) (medians)"
    )
    return lines + [note] + compiled_note(runs)


TABLES = {"rss_vs_budget": budget_table, "rss_vs_size": size_table, "throughput": throughput_table}


def skipped_lines(sec: dict[str, Any], most: int = 4) -> list[str]:
    """Why cells are '-': sizes or baselines this machine could not run (not the uninstalled)."""
    seen = dict.fromkeys(
        f"skipped {s.get('tool', 'all')} {s.get('method', '')} on {s.get('preset', sec.get('preset', '?'))}"
        f"{' ' + s['cache'] if s.get('cache') else ''}: {s['reason']}".replace("  ", " ")
        for s in sec.get("skipped", [])
        if s["reason"] != "not available"
    )
    lines = list(seen)
    return lines[:most] + ([f"... and {len(lines) - most} more skipped (see the JSON)"] if len(lines) > most else [])


def text_table(results: dict[str, Any]) -> str:
    """Everything on one screen: header, then one block per section that ran."""
    lines = header(results)
    for name, sec in results["sections"].items():
        lines += ["", *TABLES[name](sec), *skipped_lines(sec)]
    errors = [r for sec in results["sections"].values() for r in sec["runs"] if "error" in r]
    lines += [f"error: {r['tool']} {r['method']} {r['preset']}: {r['error'].splitlines()[-1][:120]}" for r in errors]
    return "\n".join(lines)
