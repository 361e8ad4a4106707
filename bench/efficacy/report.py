"""The results as text (a Markdown table for the README) and as a PNG.

Accuracy at drop rate p is the mean over mask seeds; "retained" is that divided by the model's
accuracy at p = 0 (nothing dropped), as the DARE paper's figures show it.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def sweep_points(res: dict[str, Any], model: str, rescale: bool) -> list[tuple[float, float, float, float]]:
    """(p, mean, min, max) of `model`'s accuracy on its own task, by drop rate."""
    task = model.split("-", 1)[1]
    out = []
    for p in res["config"]["drop_rates"]:
        accs = [r["accuracy"][task] for r in res["sweep"] if (r["model"], r["p"], r["rescale"]) == (model, p, rescale)]
        out.append((p, statistics.fmean(accs), min(accs), max(accs)))
    return out


def ratio(a: float, b: float) -> float | None:
    """a / b, or None (JSON null, "-" in the tables) when b is 0: an untrained tiny model can score 0."""
    return a / b if b else None


def retained(res: dict[str, Any], model: str, p: float, rescale: bool) -> float | None:
    """Accuracy at drop rate `p` over accuracy at p = 0."""
    pts = {q: m for q, m, _, _ in sweep_points(res, model, rescale)}
    return ratio(pts[p], pts[0.0])


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def sweep_table(res: dict[str, Any], p: float = 0.9) -> str:
    """Per model: accuracy at p = 0, and at `p` with DARE and with DropOnly (retained in brackets)."""
    lines = [
        f"| model (task) | base | p = 0 | DARE p = {p} | DropOnly p = {p} | inspect: mean abs δ, δ/θ, warning |",
        "|---|---|---|---|---|---|",
    ]
    for model in res["inspect"]:
        task = model.split("-", 1)[1]
        pts = {rescale: {q: m for q, m, _, _ in sweep_points(res, model, rescale)} for rescale in (True, False)}
        if p not in pts[True]:
            continue
        ins = res["inspect"][model]
        warn = "yes" if ins["warnings"] else "no"
        lines.append(
            f"| {model} ({task}) | {res['accuracy']['base'][task]:.3f} | {pts[True][0.0]:.3f} "
            f"| {pts[True][p]:.3f} ({_pct(retained(res, model, p, True))}) "
            f"| {pts[False][p]:.3f} ({_pct(retained(res, model, p, False))}) "
            f"| {ins['mean_abs_delta']:.4f}, {ins['relative']:.3f}, {warn} |"
        )
    return "\n".join(lines)


def gain_kept(res: dict[str, Any], task: str, acc: float) -> float | None:
    """The share of the fine-tune's gain over the base on `task` that accuracy `acc` keeps:
    (acc - base) / (fine-tune - base), the measure of a merge that holds every ability."""
    base = res["accuracy"]["base"][task]
    return ratio(acc - base, res["accuracy"][f"ft-{task}"][task] - base)


def merge_table(res: dict[str, Any]) -> str:
    """Every merge's accuracy on every fine-tuning task (the share of the fine-tune's gain over
    the base kept, in brackets), beside the base and each fine-tune; seeded merges give
    mean ± std over the seeds (min..max in the JSON)."""
    tasks = res["config"]["tasks"]
    lines = ["| model | " + " | ".join(tasks) + " | mean | seeds |", "|---" * (len(tasks) + 3) + "|"]
    for name in ["base", *(f"ft-{t}" for t in tasks)]:
        accs = [res["accuracy"][name][t] for t in tasks]
        lines.append(f"| {name} | " + " | ".join(f"{a:.3f}" for a in accs) + f" | {statistics.fmean(accs):.3f} | - |")
    for label, m in res["merges"].items():
        s = m["summary"]
        cells = [
            f"{s[t]['mean']:.3f}"
            + (f" ± {s[t]['std']:.3f}" if len(m["seeds"]) > 1 else "")
            + f" ({_pct(gain_kept(res, t, s[t]['mean']))})"
            for t in tasks
        ]
        mean = statistics.fmean(s[t]["mean"] for t in tasks)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean:.3f} | {len(m['seeds'])} |")
    return "\n".join(lines)


def text_report(res: dict[str, Any]) -> str:
    """Both tables, README-ready."""
    return sweep_table(res) + "\n\n" + merge_table(res) + "\n"


def save_plot(res: dict[str, Any], path: Path) -> Path | None:
    """Accuracy vs drop rate (DARE vs DropOnly) per model, and the merges per task; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = list(res["inspect"])
    cols = 3
    rows = -(-(len(models) + 1) // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.8 * rows), squeeze=False)
    axes = list(grid.flat)
    for ax, model in zip(axes, models):
        _sweep_panel(ax, res, model)
    _merge_panel(axes[len(models)], res)
    spare = axes[len(models) + 1 :]
    if spare:  # the merges' legend in the first empty cell, clear of the bars
        spare[0].legend(*axes[len(models)].get_legend_handles_labels(), loc="center left", fontsize=8, ncol=2)
    else:
        axes[len(models)].legend(fontsize=6, ncol=2)
    for ax in spare:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _sweep_panel(ax: Any, res: dict[str, Any], model: str) -> None:
    task = model.split("-", 1)[1]
    rates = res["config"]["drop_rates"]
    xs = list(range(len(rates)))  # evenly spaced: 0.9, 0.95 and 0.99 would overlap on a linear axis
    for rescale, label, color in ((True, "DARE", "tab:blue"), (False, "DropOnly", "tab:red")):
        pts = sweep_points(res, model, rescale)
        mean = [m for _, m, _, _ in pts]
        err = [[m - lo for _, m, lo, _ in pts], [hi - m for _, m, _, hi in pts]]
        ax.errorbar(xs, mean, yerr=err, marker="o", capsize=3, label=label, color=color)
    ax.axhline(res["accuracy"]["base"][task], color="gray", ls="--", lw=1, label="base")
    ax.axhline(res["chance"].get(task, 0.0), color="gray", ls=":", lw=1, label="chance")
    warned = " (inspect warns)" if res["inspect"][model]["warnings"] else ""
    ax.set(title=f"{model}{warned}", xlabel="drop rate p", ylabel=f"accuracy on {task}", ylim=(-0.02, 1.02))
    ax.set_xticks(xs, [f"{p:g}" for p in rates])
    ax.legend(fontsize=7)


def _merge_panel(ax: Any, res: dict[str, Any]) -> None:
    import matplotlib.pyplot as plt

    tasks: Sequence[str] = res["config"]["tasks"]
    zeros = [0.0] * len(tasks)
    rows = [("base", [res["accuracy"]["base"][t] for t in tasks], zeros)]
    rows.append(("fine-tune", [res["accuracy"][f"ft-{t}"][t] for t in tasks], zeros))
    for method, m in res["merges"].items():
        s = m["summary"]
        rows.append((method, [s[t]["mean"] for t in tasks], [s[t]["std"] for t in tasks]))
    width = 0.8 / len(rows)
    colors = plt.get_cmap("tab20")  # a colour per bar: tab10 repeats after ten
    for i, (name, means, stds) in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(tasks))]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=name, color=colors(i % colors.N))
    ax.set_xticks(range(len(tasks)), list(tasks))
    ax.set(title="merges of the fine-tunes (±std over seeds)", ylabel="accuracy", ylim=(0, 1.02))


def findings(res: dict[str, Any], p: float = 0.9) -> dict[str, Any]:
    """The claims, checked: per swept model, accuracy retained at `p` with DARE and DropOnly and
    whether `leanmerge inspect` warned; per merge and task, its accuracy over the fine-tune's and
    the share of the fine-tune's gain over the base it keeps."""
    swept = {}
    for model, ins in res["inspect"].items():
        if p in res["config"]["drop_rates"]:
            swept[model] = {
                "retained_dare": retained(res, model, p, True),
                "retained_droponly": retained(res, model, p, False),
                "inspect_warns": bool(ins["warnings"]),
            }
    tasks = res["config"]["tasks"]
    over = {
        label: {t: ratio(m["summary"][t]["mean"], res["accuracy"][f"ft-{t}"][t]) for t in tasks}
        for label, m in res["merges"].items()
    }
    kept = {label: {t: gain_kept(res, t, m["summary"][t]["mean"]) for t in tasks} for label, m in res["merges"].items()}
    return {"p": p, "sweep": swept, "merge_over_finetune": over, "merge_gain_kept": kept}
