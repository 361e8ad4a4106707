"""The `leanmerge` command on the happy paths: flags, YAML, plan, JSON events, report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner

from engine.cli import main

from conftest import MakeFamily
from reference import load_model, merge_folders

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_merge_flags_with_weights_log_and_report(tiny_family: MakeFamily, tmp_path: Path) -> None:
    base, (a, b) = tiny_family(2, shards=2)
    out, log = tmp_path / "out", tmp_path / "events.jsonl"
    text = run(
        "merge", "--method", "task_arithmetic", "--base", str(base), "--model", f"{a}:0.7", "--model", f"{b}:0.3",
        "--lambda", "0.5", "--max-memory", "2GiB", "--block-size", "100", "--log-json", str(log), "-o", str(out),
    )  # fmt: skip
    assert "peak RSS" in text and "GB/s" in text
    want = merge_folders("task_arithmetic", base, [a, b], weights=[0.7, 0.3], lam=0.5)
    got = load_model(out)
    assert all(torch.equal(got[n], t) for n, t in want.items())
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert events[0]["event"] == "plan" and events[-1]["event"] == "report"
    assert {e["name"] for e in events if e["event"] == "tensor"} == set(want)
    report = events[-1]
    for field in ("wall_s", "bytes_read", "bytes_written", "read_gbps", "peak_rss", "budget", "seed"):
        assert field in report
    assert report["budget"] == 2 << 30


def test_passthrough_needs_no_model_flag(tiny_family: MakeFamily, tmp_path: Path) -> None:
    """passthrough takes no fine-tunes, so --model is not asked for; other methods still need it."""
    base, _ = tiny_family(1)
    run("merge", "--method", "passthrough", "--base", str(base), "-o", str(tmp_path / "out"))
    want = load_model(base)
    got = load_model(tmp_path / "out")
    assert got.keys() == want.keys() and all(torch.equal(got[n], t) for n, t in want.items())
    refused = CliRunner().invoke(main, ["merge", "--method", "ties", "--base", str(base), "-o", str(tmp_path / "o2")])
    assert refused.exit_code != 0 and "missing --model" in refused.output
    assert not (tmp_path / "o2").exists()


def test_yaml_config(tiny_family: MakeFamily, tmp_path: Path) -> None:
    base, (a, b) = tiny_family(2)
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"""
merge_method: dare_ties
base_model: {base}
models:
  - model: {base}
  - model: {a}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.4}}
parameters:
  density: 0.3
  normalize: true
  int8_mask: true
dtype: float32
random_seed: 7
"""
    )
    run("merge", str(config), "-o", str(tmp_path / "out"))
    want = merge_folders(
        "dare_ties",
        base,
        [a, b],
        out_dtype=torch.float32,
        weights=[0.6, 0.4],
        densities=[0.5, 0.3],
        seed=7,
        normalize=True,
    )
    got = load_model(tmp_path / "out")
    assert all(torch.equal(got[n], t) for n, t in want.items())


def test_plan_text_and_json(tiny_family: MakeFamily) -> None:
    base, (a,) = tiny_family(1)
    text = run("plan", "--method", "linear", "--base", str(base), "--model", str(a), "--max-memory", "1GiB")
    assert "predicted peak RSS" in text and "embed.weight" in text and "model.safetensors" in text
    assert "the base is a template, not read" in text
    plan = json.loads(
        run("plan", "--method", "linear", "--base", str(base), "--model", str(a), "--block-size", "64", "--json")
    )
    assert plan["blocks"] == sum(t["blocks"] for t in plan["tensor_plans"])
    assert plan["bytes_read"] == plan["bytes_written"]  # linear reads the model, not the base


def test_version_and_help() -> None:
    assert "leanmerge" in run("--version")
    assert "--max-memory" in run("merge", "--help")


def test_a_real_process_leaves_at_once_with_everything_written(tiny_family: MakeFamily, tmp_path: Path) -> None:
    """`python -m engine.cli` (the `leanmerge` script's `run`) skips the interpreter's teardown
    after `main`: the output, the printed report and the log must all be complete, and the exit
    status `main`'s."""
    base, (a,) = tiny_family(1)
    out, log = tmp_path / "out", tmp_path / "events.jsonl"
    args = ["merge", "--method", "linear", "--base", str(base), "--model", str(a), "-o", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", *args, "--log-json", str(log)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "peak RSS" in done.stdout.splitlines()[-1]
    assert json.loads(log.read_text().splitlines()[-1])["event"] == "report"
    assert load_model(out).keys() == load_model(base).keys()
    again = subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, env=env)
    assert again.returncode == 1 and "already exists" in again.stderr  # an error's status and line


def test_import_leaves_the_collector_as_it_was_and_torch_frozen() -> None:
    """`import engine` imports no torch; its first public name (`engine.load`) pauses the cyclic
    collector for torch's import and freezes what it made: afterwards the collector is on again
    (or still off, if the caller had turned it off), the imported objects are out of its sight,
    garbage that was waiting is collected, not kept, and `engine.merge` is the function."""
    probe = (
        "import gc, sys, weakref\n"
        "class Cycle: pass\n"
        "c = Cycle(); c.me = c; gone = weakref.ref(c); del c\n"
        "if sys.argv[1] == 'off': gc.disable()\n"
        "import engine\n"
        "assert 'torch' not in sys.modules\n"
        "from engine import merge\n"
        "import engine.merge\n"  # importing the submodule leaves the name to the function
        "assert callable(merge) and engine.merge is merge, merge\n"
        "print(gc.isenabled(), gc.get_freeze_count() > 100_000, gone() is None)\n"
    )
    for state, enabled in (("on", "True"), ("off", "False")):
        out = subprocess.run([sys.executable, "-c", probe, state], capture_output=True, text=True, check=True)
        assert out.stdout.split() == [enabled, "True", "True"], out.stderr


def test_param_flag_gives_any_method_parameter(tiny_family: MakeFamily, tmp_path: Path) -> None:
    """`--param NAME=VALUE` sets a method's parameter as the YAML's top-level `parameters` does:
    the same bytes as the YAML merge; typed by the parameter (true/false, a number)."""
    base, (a, b) = tiny_family(2)
    models = ["--model", str(a), "--model", str(b)]
    run("merge", "--method", "sce", "--base", str(base), *models, "--param", "select_topk=0.5", str(tmp_path / "f"))
    config = tmp_path / "sce.yml"
    config.write_text(
        f"merge_method: sce\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters:\n  select_topk: 0.5\n"
    )
    run("merge", str(config), str(tmp_path / "y"))
    run("merge", str(config), "--param", "select_topk=1", str(tmp_path / "o"))  # the flag wins over the file
    run("merge", "--method", "sce", "--base", str(base), *models, str(tmp_path / "d"))  # select_topk 1 by default
    got, want = load_model(tmp_path / "f"), load_model(tmp_path / "y")
    assert all(torch.equal(got[n], w) for n, w in want.items())
    other, default = load_model(tmp_path / "o"), load_model(tmp_path / "d")
    assert all(torch.equal(other[n], w) for n, w in default.items())
    assert not all(torch.equal(got[n], w) for n, w in default.items())


def test_param_flag_errors_are_one_line(tiny_family: MakeFamily) -> None:
    """A name the method does not declare, a bad or repeated value: one line naming the method,
    the parameter and the allowed ones, exit 1."""
    base, (a,) = tiny_family(1)
    flags = ["plan", "--base", str(base), "--model", str(a), "--method"]
    for args, message in [
        ("sce --param density=0.5", "--param density=0.5: sce has no parameter 'density' (parameters of sce: select_topk)"),
        ("sce --param select_topk=2", "--param select_topk=2: 'select_topk' must lie in [0, 1], got 2"),
        ("sce --param select_topk=lots", "--param select_topk=lots: must be a number, got 'lots'"),
        ("sce --param select_topk", "--param select_topk: expected NAME=VALUE (parameters of sce: select_topk)"),
        ("sce --param select_topk=0.5 --param select_topk=0.6", "--param select_topk=0.6: 'select_topk' is given twice; give it once"),
        ("ties --param density=0.5 --density 0.4", "--param density=0.5: 'density' is given twice; give it once"),
        ("nuslerp --param nuslerp_flatten=no", "--param nuslerp_flatten=no: must be true or false, got 'no'"),
        ("linear --param t=0.5", "--param t=0.5: linear has no parameter 't' (parameters of linear: weight, normalize)"),
    ]:  # fmt: skip
        result = CliRunner().invoke(main, [*flags, *args.split()])
        assert result.exit_code == 1 and result.stderr.strip().splitlines() == [f"Error: {message}"], result.output
