"""What a new user types (issue 27): the exact line and exit status of each mistake, mergekit's
habits, paths however they are typed, the model card, and help that answers without torch."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from engine import __version__
from engine.cli import main
from engine.config import load_config
from engine.defaults import METHOD_NAMES, NO_MODEL_METHODS
from engine.io.checkpoint import INDEX_NAME
from engine.io.model_card import hub_name
from engine.io.output import temp_dir_for
from engine.merge import _exit_at_once
from engine.methods.registry import METHODS
from engine.spec import MergeSpec, ModelRef, cli_spec

from conftest import MakeFamily, family_tensors, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
SIZES = "write bytes (1000000), decimal (5GB, 500M, mergekit's 5B = 5e9) or binary units (1GiB, 512MiB)"
HUB = (
    "mistralai/Mistral-7B-v0.1: no such local folder, nor snapshot in the Hugging Face cache {} (downloads are off: HF_HUB_OFFLINE); "
    "run `hf download mistralai/Mistral-7B-v0.1` with a network"
)


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def leanmerge(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it (`leanmerge` is `python -m engine.cli`), with `env` added."""
    argv = [sys.executable, "-m", "engine.cli", *map(str, args)]
    return subprocess.run(argv, cwd=cwd, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=300)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def test_help_and_version_answer_without_importing_torch() -> None:
    probe = (
        "import sys\n"
        "from engine.cli import main\n"
        "for args in (['--help'], ['--version'], ['merge', '--help'], ['plan', '--help'], ['inspect', '--help'],\n"
        "             ['verify', '--help'], ['convert', '--help'], ['merge', '--max-memory', 'lots', 'c.yaml', 'out']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules, 'engine.merge' in sys.modules, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], env=ENV, capture_output=True, text=True, timeout=120)
    assert last_line(done.stderr) == "False False", done.stderr


def test_help_gives_examples_whole_descriptions_and_human_sizes() -> None:
    top = invoke("--help").output
    commands = top.split("Commands:\n")[1].split("\n\n")[0].splitlines()
    assert [line.split(maxsplit=1)[0] for line in commands] == [
        "convert",
        "inspect",
        "merge",
        "plan",
        "sweep",
        "verify",
    ]
    assert not any(line.endswith("...") for line in commands), commands  # whole, not cut
    assert "Example: leanmerge merge merge.yaml ./merged" in top
    for command in ("merge", "plan", "inspect", "verify", "convert", "sweep"):
        assert "Example" in invoke(command, "--help").output, command
    merge_help, verify_help = invoke("merge", "--help").output, invoke("verify", "--help").output
    assert "[default: 5GB]" in merge_help and "5000000000" not in merge_help
    assert "--compile" not in merge_help and "AOTInductor" not in merge_help  # retired: accepted, hidden
    for flag in ("--t ", "--gamma", "--epsilon", "--cuda", "--random-seed", "--out-shard-size", "--no-model-card"):
        assert flag in merge_help, flag
    for merge_only in ("--max-memory", "--shard-size", "--device", "--hold", "--direct-io"):
        assert merge_only not in verify_help and merge_only in invoke("plan", "--help").output, merge_only


def test_cli_lists_every_method_without_importing_them() -> None:
    assert tuple(sorted(METHODS)) == METHOD_NAMES
    assert {n for n, m in METHODS.items() if m.min_models == 0} == NO_MODEL_METHODS


@pytest.mark.parametrize(
    ("method", "args", "code", "line"),
    [
        ("task_arithmetic", ["--lambda", "nan"], 1, "Error: --lambda: 'lambda' must be a finite number, got nan"),
        ("task_arithmetic", ["--weight", "-inf"], 1, "Error: --weight: 'weight' must be a finite number, got -inf"),
        ("dare_ties", ["--density", "inf"], 1, "Error: --density: 'density' must lie in (0, 1], got inf"),
        ("slerp", ["--t", "1.5"], 1, "Error: --t: 't' must lie in [0, 1], got 1.5"),
        ("breadcrumbs", ["--gamma", "nan"], 1, "Error: --gamma: 'gamma' must lie in [0, 1), got nan"),
        ("della", ["--epsilon", "inf"], 1, "Error: --epsilon: 'epsilon' must be a finite number >= 0, got inf"),
        ("linear", ["--cuda", "--device", "cpu"], 2, "Error: --cuda contradicts --device cpu"),
        ("linear", ["--max-memory", "lots"], 2, f"Error: Invalid value for '--max-memory': cannot read 'lots' as a size; {SIZES}"),
        ("linear", ["--block-size", "nan"], 2, f"Error: Invalid value for '--block-size': size 'nan' must be a positive number; {SIZES}"),
        ("linear", ["--shard-size", "5"], 2, "Error: Invalid value for '--shard-size' / '--out-shard-size': '5' is 5 bytes, below the "
         "1,000,000-byte minimum: every tensor would get a file of its own; write e.g. 5B (mergekit's 5e9) or 2GB"),
    ],
)  # fmt: skip
def test_a_bad_flag_value_is_one_line_naming_flag_value_and_range(
    tiny_family: MakeFamily, tmp_path: Path, method: str, args: list[str], code: int, line: str
) -> None:
    base, (a,) = tiny_family(1)
    result = invoke("merge", "--method", method, "--base", base, "--model", a, *args, "-o", tmp_path / "out")
    assert (result.exit_code, last_line(result.stderr)) == (code, line), result.output
    assert not (tmp_path / "out").exists()


def test_yaml_nan_and_inf_are_refused_with_their_line(tiny_family: MakeFamily, tmp_path: Path) -> None:
    base, (a,) = tiny_family(1)
    head = f"merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - model: {a}\n"
    cases = [
        (head + "parameters:\n  lambda: .nan\n", "6: parameters: 'lambda' must be a finite number, got nan"),
        (
            head + "    parameters: {weight: .inf}\n",
            "5: models[0].parameters: 'weight' must be a finite number, got inf",
        ),
        (head + "parameters:\n  density: [0.5, .nan]\n", "6: parameters: 'density' must lie in (0, 1], got nan"),
    ]
    for i, (text, where) in enumerate(cases):
        config = tmp_path / f"c{i}.yaml"
        config.write_text(text)
        result = invoke("merge", config, tmp_path / "out")
        assert (result.exit_code, last_line(result.stderr)) == (1, f"Error: {config}:{where}"), result.output
    assert not (tmp_path / "out").exists()


def test_a_mistake_in_a_real_process(tiny_family: MakeFamily, tmp_path: Path) -> None:
    """As typed in a shell: a Hub id says the same as a flag (at once: before torch is imported)
    and in YAML; NaN is refused."""
    base, (a,) = tiny_family(1)
    (tmp_path / "hub.yaml").write_text(
        f"merge_method: linear\nbase_model: mistralai/Mistral-7B-v0.1\nmodels: [{{model: {a}}}]\n"
    )
    flags = ["merge", "--method", "task_arithmetic", "--model", a, "-o", "out"]
    offline = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}  # an empty cache, no downloads
    start = time.perf_counter()
    hub_flag = leanmerge(*flags, "--base", "mistralai/Mistral-7B-v0.1", cwd=tmp_path, env=offline)
    hub_flag_s = time.perf_counter() - start
    hub_yaml = leanmerge("merge", "hub.yaml", "out", cwd=tmp_path, env=offline)
    nan = leanmerge(*flags, "--base", base, "--lambda", "nan", cwd=tmp_path)
    hub = HUB.format(tmp_path / "hub")
    assert (hub_flag.returncode, hub_flag.stderr) == (1, f"Error: --base: {hub}\n")
    assert (hub_yaml.returncode, hub_yaml.stderr) == (1, f"Error: hub.yaml:2: base_model: {hub}\n")
    assert (nan.returncode, nan.stderr) == (1, "Error: --lambda: 'lambda' must be a finite number, got nan\n")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.leanmerge-lock").exists()
    print(f"Hub id refused in {hub_flag_s:.2f} s")


def test_shard_size_5b_is_five_billion_bytes(tiny_family: MakeFamily, tmp_path: Path) -> None:
    base, (a,) = tiny_family(1)
    result = invoke("merge", "--method", "linear", "--base", base, "--model", a, "--shard-size", "5B", tmp_path / "out")
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}  # one shard: 5B is not 5 bytes


def test_a_flag_for_an_unused_parameter_warns_as_yaml_does(
    tiny_family: MakeFamily, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base, (a,) = tiny_family(1)
    config = tmp_path / "c.yaml"
    config.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels: [{{model: {a}}}]\nparameters: {{gamma: 0.1}}\n"
    )
    with caplog.at_level(logging.WARNING):
        by_flag = invoke("merge", "--method", "task_arithmetic", "--base", base, "--model", a, "--gamma", "0.1",
                         "--no-normalize", "--t", "0.3", tmp_path / "flags")  # fmt: skip
        by_yaml = invoke("merge", config, tmp_path / "yaml", "--no-normalize")
    assert by_flag.exit_code == 0 and by_yaml.exit_code == 0, by_flag.output + by_yaml.output
    assert [r.getMessage() for r in caplog.records if "not used" in r.getMessage()] == [
        "--t is not used by task_arithmetic; ignored",
        "--gamma is not used by task_arithmetic; ignored",
        f"{config}:4: parameters.gamma is not used by task_arithmetic; ignored",
    ]
    assert shards(tmp_path / "flags") == shards(tmp_path / "yaml")  # the same spec, digest included


def test_mergekit_habits_and_the_model_card(
    tiny_family: MakeFamily, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base, (a, b) = tiny_family(2)
    config = tmp_path / "merge.yml"
    config.write_text(
        f"merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.6}}\n"
        f"  - model: {b}\n    parameters: {{weight: [0.2, 0.4]}}\nparameters: {{density: 0.5}}\ndtype: float32\n"
    )
    noop = ["--lazy-unpickle", "--allow-crimes", "--low-cpu-memory", "--trust-remote-code", "--clone-tensors"]
    with caplog.at_level(logging.WARNING):
        result = invoke("merge", config, tmp_path / "out", "--no-cuda", "--copy-tokenizer", "--write-model-card",
                        "--random-seed", "7", "--out-shard-size", "500M", *noop)  # fmt: skip
    assert result.exit_code == 0, result.output
    said = [r.getMessage() for r in caplog.records]
    assert [next(m for m in said if m.startswith(flag + " ")) for flag in noop]  # one line for each
    assert "--allow-crimes changes nothing here: only homologous models" in said[1]
    out = tmp_path / "out"
    card, kit = (out / "README.md").read_text(), out / "mergekit_config.yml"
    # Local folders are named in the text only: the Hub takes model ids alone in base_model (tests/test_hub.py).
    assert card.startswith("---\nlibrary_name: transformers\ntags:\n- merge\n- leanmerge\n---\n")
    for text in (
        f"made with leanmerge {__version__} (a",
        f"onto the base model {base}.",
        "Method: `dare_ties`",
        "Random seed: 7",
        f"* {a}",
        "* density: 0.5",
        "weight:\n    - 0.2\n    - 0.4",
    ):
        assert text in card, text
    spec_sha = json.loads((out / INDEX_NAME).read_text())["metadata"]["leanmerge"]["spec_sha256"]
    assert load_config(kit).digest() == spec_sha  # the config the card shows makes the same merge
    assert (out / "tokenizer.json").exists()
    assert hub_name(Path("/c/hub/models--mistralai--Mistral-7B-v0.1/snapshots/7231864")) == "mistralai/Mistral-7B-v0.1"
    bare = invoke("merge", config, "-o", tmp_path / "bare", "--no-model-card", "--no-copy-tokenizer")
    assert bare.exit_code == 0, bare.output
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == ["config.json", "model.safetensors", INDEX_NAME]
    twice = invoke("merge", config, tmp_path / "x", "-o", tmp_path / "y")
    assert (twice.exit_code, last_line(twice.stderr)) == (
        2,
        f"Error: two output folders: {tmp_path / 'x'} and -o {tmp_path / 'y'}; give one",
    )


def test_retired_compile_flag_is_accepted_and_said_once(
    tiny_family: MakeFamily, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`--compile auto|on|off` (compiled kernels, retired) still runs, in `merge` and `plan`, and
    says once, in one line, that it is ignored; the merge is the one without it."""
    base, (a,) = tiny_family(1)
    common = ["--base", base, "--model", a, "--method", "task_arithmetic"]
    line = "--compile is ignored: compiled kernels were retired (the C extension runs every method's merge on the CPU)"
    for mode in ("auto", "on", "off"):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            result = invoke("merge", *common, "-o", tmp_path / mode, "--compile", mode)
            shown = invoke("plan", *common, "--compile", mode)
        assert result.exit_code == 0 and shown.exit_code == 0, result.output + shown.output
        assert [r.getMessage() for r in caplog.records].count(line) == 2, caplog.records  # once per command
    plain = invoke("merge", *common, "-o", tmp_path / "plain")
    assert plain.exit_code == 0, plain.output
    for mode in ("auto", "on", "off"):
        got = sorted(p.name for p in (tmp_path / mode).glob("*.safetensors"))
        assert got and all((tmp_path / mode / n).read_bytes() == (tmp_path / "plain" / n).read_bytes() for n in got)
    assert invoke("merge", *common, "-o", tmp_path / "bad", "--compile", "maybe").exit_code == 2


def test_output_folder_empty_or_with_missing_parents(tiny_family: MakeFamily, tmp_path: Path) -> None:
    base, (a,) = tiny_family(1)
    empty, deep = tmp_path / "empty", tmp_path / "new" / "dir" / "out"
    empty.mkdir()
    for out in (empty, deep):  # `merge --base B --model M OUT`: a lone positional with flags is the output
        result = invoke("merge", "--method", "linear", "--base", base, "--model", a, out)
        assert result.exit_code == 0, result.output
        assert (out / "model.safetensors").is_file()
    again = invoke("merge", "--method", "linear", "--base", base, "--model", a, empty)
    assert (again.exit_code, last_line(again.stderr)) == (
        1,
        f"Error: {empty}: output already exists; pass --overwrite to replace it",
    )


def test_inspect_of_models_that_cannot_merge_exits_1(tiny_family: MakeFamily) -> None:
    base, _ = tiny_family(1)
    other, _ = tiny_family(1, shapes={"embed.weight": (5, 4)})
    result = invoke("inspect", base, other)
    assert result.exit_code == 1
    assert last_line(result.stderr) == (
        f"Error: not homologous with the base {base}: {other} (see above); they cannot be merged with it"
    )
    assert invoke("inspect", base, base).exit_code == 0


def test_paths_are_identified_however_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An absolute start and a relative resume are one run, with the same bytes as an
    uninterrupted merge; the spec digest does not depend on the working directory; `verify`
    takes the config by either path."""
    sets = family_tensors({f"layers.{i}.w": (64, 32) for i in range(6)}, 1, 0, torch.bfloat16)
    base, ft = write_checkpoint(tmp_path / "base", sets[0]), write_checkpoint(tmp_path / "ft", sets[1])
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    here = cli_spec("dare_linear", Path("../base"), ["../ft:0.5"], {"density": 0.5}, None, 3)
    assert here == cli_spec("dare_linear", base, [f"{ft}:0.5"], {"density": 0.5}, None, 3)
    monkeypatch.chdir(tmp_path)
    assert cli_spec("dare_linear", Path("base"), ["ft:0.5"], {"density": 0.5}, None, 3).digest() == here.digest()
    from engine import merge

    def stop(e: dict[str, object]) -> None:
        if e["event"] == "tensor" and e["name"] == "layers.2.w":
            raise KeyboardInterrupt  # the absolute run dies midway

    with pytest.raises(KeyboardInterrupt):
        merge(here, tmp_path / "out", block_bytes=2048, sync_every=1, on_event=stop, model_card=False)
    args = ["merge", "--method", "dare_linear", "--model", "ft:0.5", "--density", "0.5", "--seed", "3"]
    resumed = leanmerge(
        *args, "--base", "./base/", "-o", "out", "--resume", "--no-model-card", "--progress", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr
    assert (
        "resumed: 3 of 6 tensors were done by the interrupted run (24 KiB of reads not repeated); this run:\n"
        in resumed.stdout
    )
    assert "read 24 KiB at" in resumed.stdout  # this run's reads, not the whole plan's
    assert "merge:  50%|█████     | 24.6k/49.2k" in resumed.stderr  # the bar starts where the killed run ended
    fresh = invoke(*args, "--base", base, "-o", tmp_path / "fresh", "--no-model-card")
    assert fresh.exit_code == 0, fresh.output
    assert shards(tmp_path / "out") == shards(tmp_path / "fresh")
    (tmp_path / "c.yaml").write_text("merge_method: dare_linear\nbase_model: base\nmodels: [{model: ft, parameters: "
                                     "{weight: 0.5}}]\nparameters: {density: 0.5}\nrandom_seed: 3\n")  # fmt: skip
    for config in ("c.yaml", tmp_path / "c.yaml"):
        assert invoke("verify", "out", config).exit_code == 0, config


def test_a_second_sigint_exits_at_once_and_says_how_to_resume(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The first SIGINT asks the merge to stop after its block; a second exits at once, after the
    merge's last words: the lock file goes, as at a normal end, and the line says how to resume."""
    probe = (
        "import os, signal, time\n"
        "from engine.signals import graceful_stop\n"
        "with graceful_stop(True, lambda: os.write(2, b'last words\\n')):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.2)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], env=ENV, capture_output=True, text=True, timeout=60)
    assert (done.returncode, last_line(done.stderr)) == (128 + signal.SIGINT, "last words"), done.stderr
    lock, tmp = tmp_path / ".out.leanmerge-lock", temp_dir_for(tmp_path / "out")
    lock.write_text("1\n")
    tmp.mkdir()
    _exit_at_once(tmp, lock)
    assert not lock.exists()
    assert capfd.readouterr().err == (
        f"Interrupted: exiting at once; the work so far is saved in {tmp}: run the same command with --resume\n"
    )


def test_import_leanmerge_and_str_paths(tiny_family: MakeFamily, tmp_path: Path) -> None:
    import leanmerge

    base, (a,) = tiny_family(1)
    spec = leanmerge.MergeSpec("task_arithmetic", str(base), [str(a)], {"lambda": 0.5})  # type: ignore[arg-type]
    assert spec.base == base and spec.models == (ModelRef(a, {}),)
    assert spec == MergeSpec("task_arithmetic", base, (ModelRef(str(a), {}),), {"lambda": 0.5})  # type: ignore[arg-type]
    report = leanmerge.merge(spec, str(tmp_path / "out"), max_memory=1 << 30)
    assert report.tensors == 7 and leanmerge.__version__ == "0.1.0"
    with pytest.raises(leanmerge.SpecError, match="'lambda' must be a finite number, got nan"):
        leanmerge.MergeSpec("task_arithmetic", str(base), [str(a)], {"lambda": float("nan")})  # type: ignore[arg-type]
