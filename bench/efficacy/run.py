"""The experiment: pretrain, fine-tune, sweep the drop rate, merge, evaluate; one JSON.

Every number comes from models written to disk and merged by the `leanmerge` command, as a user
would run it. Seeds fix everything: the model init, the batches, the masks, the evaluation sets.
"""

from __future__ import annotations

import copy
import logging
import resource
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaForCausalLM

from bench.efficacy import merges
from bench.efficacy.evaluate import accuracies, eval_sets
from bench.efficacy.model import ModelSize, build, load_weights, save
from bench.efficacy.tasks import CHANCE, FINETUNE_TASKS, PRETRAIN_TASKS
from bench.efficacy.train import Schedule, train
from engine.methods.registry import METHODS

log = logging.getLogger(__name__)
DROP_RATES = (0.0, 0.5, 0.7, 0.9, 0.95, 0.99)
MERGE_METHODS = tuple(merges.MERGES)
MARKER = ".bench-efficacy"  # in a work folder this experiment made, and may empty


@dataclass(frozen=True)
class Config:
    """Sizes, schedules and sweeps of one run; `FULL` and `QUICK` below, tests shrink further."""

    size: ModelSize = ModelSize()
    pretrain: Schedule = Schedule(steps=800, lr=3e-3, batch=63)  # 21 of each related task per batch
    # the fine-tuning tasks' share of each pretraining batch: the base solves them partway
    pretrain_shares: tuple[tuple[str, int], ...] = (("add", 2), ("mul", 1), ("rev", 3))
    finetune: Schedule = Schedule(steps=400, lr=3e-5, warmup=10)  # SFT-like: a hundredth of the pretraining lr
    cpt: Schedule = Schedule(steps=400, lr=3e-3)  # continued pre-training: the pretraining lr, half as long
    cpt_task: str = "add"
    tasks: tuple[str, ...] = FINETUNE_TASKS
    drop_rates: tuple[float, ...] = DROP_RATES
    sweep_seeds: tuple[int, ...] = (0, 1, 2)
    seeded_rates: tuple[float, ...] = (0.9,)  # drop rates run with every sweep seed (the others: the first)
    methods: tuple[str, ...] = MERGE_METHODS
    merge_seeds: tuple[int, ...] = (0, 1, 2)
    eval_n: int = 1024
    seed: int = 0
    threads: int = 2  # torch threads for training and scoring (the numbers depend on it: a run is
    # reproducible at the same count; the leanmerge calls run one thread each, `jobs` at once)
    jobs: int = 2  # leanmerge processes at once


FULL = Config()
QUICK = Config(
    pretrain=Schedule(steps=400, lr=3e-3, batch=63),
    finetune=Schedule(steps=200, lr=5e-5, warmup=10),
    cpt=Schedule(steps=200, lr=3e-3),
    drop_rates=(0.0, 0.5, 0.9, 0.99),
    sweep_seeds=(0,),
    merge_seeds=(0, 1),
    eval_n=512,
)


@dataclass
class Workspace:
    """Where models go, the evaluation sets every model is scored on, and a model to load into."""

    root: Path
    sets: dict[str, Any]
    template: LlamaForCausalLM
    jobs: int = 2

    def folder(self, name: str) -> Path:
        return self.root / name

    def score(self, folder: Path, discard: bool = False) -> dict[str, float]:
        """Accuracy of the model in `folder` on every task; `discard` deletes the folder after."""
        acc = accuracies(load_weights(self.template, folder), self.sets)
        if discard:
            shutil.rmtree(folder)
        return acc

    def merged_scores(self, calls: Sequence[Callable[[], Path]]) -> list[dict[str, float]]:
        """Run the leanmerge `calls` `jobs` at a time (each is a process of its own, mostly
        start-up), then score and delete each output, in order."""
        with ThreadPoolExecutor(self.jobs) as pool:
            folders = list(pool.map(lambda call: call(), calls))
        return [self.score(f, discard=True) for f in folders]


def fresh(workdir: Path) -> None:
    """Empty `workdir` for a new run, but only one that a run made (it holds `MARKER`) or an empty one."""
    if workdir.is_dir() and any(workdir.iterdir()) and not (workdir / MARKER).exists():
        raise RuntimeError(f"{workdir}: not empty and not made by bench.efficacy; give an empty or new --workdir")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    (workdir / MARKER).touch()


def run(cfg: Config, workdir: Path) -> dict[str, Any]:
    """The whole experiment in `workdir` (emptied first); returns the results (no machine info)."""
    torch.set_num_threads(cfg.threads)
    fresh(workdir)
    t0 = time.perf_counter()
    models, training = _train_all(cfg, workdir)
    ws = Workspace(workdir, eval_sets(PRETRAIN_TASKS + cfg.tasks, cfg.eval_n), build(cfg.size, cfg.seed), cfg.jobs)
    timings = {"train": time.perf_counter() - t0}
    scores = {name: ws.score(path) for name, path in models.items()}
    tuned = {name: path for name, path in models.items() if name != "base"}
    report = merges.inspect(models["base"], list(tuned.values()))
    t1 = time.perf_counter()
    sweep = [row for name in tuned for row in _sweep(cfg, ws, models["base"], name, tuned[name])]
    timings["sweep"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    merged = _merge_all(cfg, ws, models["base"], [models[f"ft-{t}"] for t in cfg.tasks])
    timings["merge"] = time.perf_counter() - t2
    timings["cpu"] = cpu_seconds()  # with the leanmerge processes: wall time on a shared machine misleads
    return {
        "config": asdict(cfg),
        "chance": {t: CHANCE[t] for t in cfg.tasks},
        "training": training,
        "accuracy": scores,
        "inspect": _inspect_summary(report, tuned),
        "sweep": sweep,
        "merges": merged,
        "merge_flags": merges.flags_of(cfg.methods),
        "seconds": timings,
    }


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (the leanmerge runs)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _train_all(cfg: Config, root: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """The base, one SFT-like fine-tune per task, and the continued-pre-training counter-case."""
    base = build(cfg.size, cfg.seed)
    log_ = {"base": train(base, PRETRAIN_TASKS, cfg.pretrain, cfg.seed + 1, cfg.pretrain_shares)}
    models = {"base": save(base, root / "base")}
    runs = [(f"ft-{t}", t, cfg.finetune) for t in cfg.tasks] + [(f"cpt-{cfg.cpt_task}", cfg.cpt_task, cfg.cpt)]
    for i, (name, task, schedule) in enumerate(runs):
        tuned = copy.deepcopy(base)
        log_[name] = train(tuned, (task,), schedule, cfg.seed + 100 + i)
        models[name] = save(tuned, root / name)
    return models, log_


def _sweep(cfg: Config, ws: Workspace, base: Path, name: str, model: Path) -> list[dict[str, Any]]:
    """Accuracy of `name` on every task after dropping a fraction p of its delta, with (DARE) and
    without (DropOnly) the rescale, per mask seed. p = 0 drops nothing, so one run (seed 0, with
    rescale) stands for both; `sweep_seeds` beyond the first are run at `seeded_rates` only."""
    keys = [
        (p, rescale, seed)
        for p in cfg.drop_rates
        for rescale in ((True,) if p == 0 else (True, False))
        for seed in (cfg.sweep_seeds if p in cfg.seeded_rates else cfg.sweep_seeds[:1])
    ]
    calls = [partial(merges.drop, base, model, p, r, s, ws.folder(f"drop-{name}-{p}-{r}-{s}")) for p, r, s in keys]
    accs = ws.merged_scores(calls)
    rows = [{"model": name, "p": p, "rescale": r, "seed": s, "accuracy": a} for (p, r, s), a in zip(keys, accs)]
    rows += [{**row, "rescale": False} for row in rows if row["p"] == 0]
    log.info("sweep %s done", name)
    return rows


def _merge_all(cfg: Config, ws: Workspace, base: Path, models: Sequence[Path]) -> dict[str, Any]:
    """Every merge of `cfg.methods` (labels of `merges.MERGES`) over the fine-tunes; seeded
    methods once per seed, the others once."""
    out: dict[str, Any] = {}
    for i, label in enumerate(cfg.methods):
        method, flags = merges.MERGES[label]
        seeds = cfg.merge_seeds if METHODS[method].uses_rng else cfg.merge_seeds[:1]
        runs = ws.merged_scores(
            [partial(merges.merge, base, models, method, ws.folder(f"merge-{i}-{s}"), flags, s) for s in seeds]
        )
        out[label] = {"seeds": list(seeds), "runs": runs, "summary": summarize(runs)}
        log.info("merge %s: %s", label, out[label]["summary"])
    return out


def summarize(runs: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per task: mean, min, max and (population) std over the runs."""
    tasks = runs[0].keys()
    return {
        t: {
            "mean": statistics.fmean(r[t] for r in runs),
            "min": min(r[t] for r in runs),
            "max": max(r[t] for r in runs),
            "std": statistics.pstdev([r[t] for r in runs]),
        }
        for t in tasks
    }


def _inspect_summary(report: dict[str, Any], tuned: dict[str, Path]) -> dict[str, Any]:
    """`leanmerge inspect`'s model-level delta statistics and warnings, by model name."""
    by_path = {str(p): n for n, p in tuned.items()}
    keys = ("mean_abs_delta", "mean_abs_base", "relative", "frac_changed", "warnings")
    return {by_path[c["model"]]: {k: c[k] for k in keys} for c in report["comparisons"]}
