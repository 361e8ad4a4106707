"""Bad inputs end in one clear error line, exit code 1, no traceback and no output left behind.

Every case runs through the real CLI (`leanmerge merge ... -o OUT`); a few also run in a real
subprocess to prove that nothing is printed but the one `Error:` line. Damaged files are
written byte by byte (`u64 N`, N bytes of JSON, data) so each damage is exactly the one named.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from engine.cli import main
from engine.errors import CheckpointError
from engine.io.checkpoint import INDEX_NAME, SINGLE_NAME
from engine.merge import merge
from engine.spec import MergeSpec, ModelRef
from tests.conftest import MakeFamily

REPO = Path(__file__).resolve().parents[1]


def st_bytes(header: dict[str, Any] | bytes, data: bytes = b"") -> bytes:
    """A safetensors file: `u64 little-endian N`, N header bytes, then `data`."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def f32_entry(shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


@dataclass
class Case:
    """What a bad-input case did to the inputs and what its error line must contain."""

    expect: list[str]
    args: list[str] = field(default_factory=list)  # extra CLI flags
    base: Path | None = None  # replaces --base
    model: Path | None = None  # replaces --model


Damage = Callable[[Path, Path, Path], Case]  # (base, model, tmp_path) -> Case


def _replace_weights(model: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(model / SINGLE_NAME), metadata={"format": "pt"})


def _write_model_file(model: Path, content: bytes) -> Path:
    path = model / SINGLE_NAME
    path.write_bytes(content)
    return path


# --- the cases: each damages one input and says what the error line must name ---------------


def missing_base(base: Path, model: Path, tmp: Path) -> Case:
    nowhere = tmp / "no-such-base"
    return Case([str(nowhere), "does not exist"], base=nowhere)


def missing_model(base: Path, model: Path, tmp: Path) -> Case:
    nowhere = tmp / "no-such-model"
    return Case([str(nowhere), "does not exist"], model=nowhere)


def model_is_a_file(base: Path, model: Path, tmp: Path) -> Case:
    return Case([str(model / "config.json"), "is a file"], model=model / "config.json")


def missing_shard(base: Path, model: Path, tmp: Path) -> Case:
    (model / SINGLE_NAME).unlink()
    shards = {"a": torch.zeros(2, 2), "b": torch.ones(3)}
    save_file({"a": shards["a"]}, str(model / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (model / INDEX_NAME).write_text(json.dumps(index))
    return Case([str(model / INDEX_NAME), "'model-00002-of-00002.safetensors'", "missing"])


def truncated_shard(base: Path, model: Path, tmp: Path) -> Case:
    path = model / SINGLE_NAME
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    data_len = len(raw) - 8 - n
    path.write_bytes(raw[: 8 + n + data_len // 2])  # cut in the data section
    return Case([str(path), "tensor '", "data_offsets", f"exceed the {data_len // 2} data bytes", "truncated"])


def header_too_short(base: Path, model: Path, tmp: Path) -> Case:
    path = _write_model_file(model, b"\x01\x02\x03")
    return Case([str(path), "3 bytes", "too short"])


def header_length_beyond_file(base: Path, model: Path, tmp: Path) -> Case:
    body = json.dumps({"w": f32_entry([2], 0, 8)}).encode()
    path = _write_model_file(model, struct.pack("<Q", len(body) + 100) + body + bytes(8))
    return Case([str(path), f"header length {len(body) + 100}", "past the end"])


def header_length_huge(base: Path, model: Path, tmp: Path) -> Case:
    path = _write_model_file(model, struct.pack("<Q", 2**64 - 1) + b"{}")
    return Case([str(path), f"header length {2**64 - 1}", "limit"])


def non_json_header(base: Path, model: Path, tmp: Path) -> Case:
    path = _write_model_file(model, st_bytes(b'{"w": {"dtype": "F32",, nope'))
    return Case([str(path), "not valid JSON"])


def non_utf8_header(base: Path, model: Path, tmp: Path) -> Case:
    path = _write_model_file(model, st_bytes(b'{"w\xff": {}}'))
    return Case([str(path), "not UTF-8"])


def header_integer_too_long(base: Path, model: Path, tmp: Path) -> Case:
    # Python's json refuses integers over 4300 digits with a plain ValueError.
    text = b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 8]}}'
    path = _write_model_file(model, st_bytes(text, bytes(8)))
    return Case([str(path)])


def header_is_a_list(base: Path, model: Path, tmp: Path) -> Case:
    path = _write_model_file(model, st_bytes(b'[{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}]', bytes(8)))
    return Case([str(path), "JSON object", "list"])


def unknown_dtype(base: Path, model: Path, tmp: Path) -> Case:
    path = _write_model_file(model, st_bytes({"w": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)))
    return Case([str(path), "tensor 'w'", "dtype", "'F7'"])


def offsets_outside_file(base: Path, model: Path, tmp: Path) -> Case:
    path = _write_model_file(model, st_bytes({"w": f32_entry([4], 0, 16)}, bytes(8)))
    return Case([str(path), "tensor 'w'", "data_offsets [0, 16]", "exceed the 8 data bytes"])


def negative_offsets(base: Path, model: Path, tmp: Path) -> Case:
    path = _write_model_file(model, st_bytes({"w": f32_entry([2], -8, 0)}, bytes(8)))
    return Case([str(path), "tensor 'w'", "data_offsets [-8, 0]"])


def overlapping_offsets(base: Path, model: Path, tmp: Path) -> Case:
    header = {"a": f32_entry([4], 0, 16), "b": f32_entry([4], 8, 24)}
    path = _write_model_file(model, st_bytes(header, bytes(24)))
    return Case([str(path), "'a'", "'b'", "overlap"])


def shape_offsets_mismatch(base: Path, model: Path, tmp: Path) -> Case:
    path = _write_model_file(model, st_bytes({"w": f32_entry([3, 2], 0, 16)}, bytes(24)))
    return Case([str(path), "tensor 'w'", "data_offsets [0, 16]", "span 16 bytes", "[3, 2]", "needs 24"])


def bad_shape(base: Path, model: Path, tmp: Path) -> Case:
    path = _write_model_file(model, st_bytes({"w": f32_entry([2, -1], 0, 8)}, bytes(8)))
    return Case([str(path), "tensor 'w'", "shape [2, -1]"])


def metadata_not_strings(base: Path, model: Path, tmp: Path) -> Case:
    path = _write_model_file(model, st_bytes({"__metadata__": {"format": 1}, "w": f32_entry([2], 0, 8)}, bytes(8)))
    return Case([str(path), "__metadata__"])


def duplicate_tensor_name(base: Path, model: Path, tmp: Path) -> Case:
    entry = json.dumps(f32_entry([2], 0, 8))
    path = _write_model_file(model, st_bytes(f'{{"w": {entry}, "w": {entry}}}'.encode(), bytes(8)))
    return Case([str(path), "'w' twice"])


def model_missing_tensor(base: Path, model: Path, tmp: Path) -> Case:
    tensors = load_file(str(model / SINGLE_NAME))
    del tensors["scale"]
    _replace_weights(model, tensors)
    return Case([str(model), str(base), "1 tensor(s) differ", "'scale' missing"])


def shape_mismatch(base: Path, model: Path, tmp: Path) -> Case:
    tensors = load_file(str(model / SINGLE_NAME))
    tensors["embed.weight"] = tensors["embed.weight"][:36].clone()
    _replace_weights(model, tensors)
    return Case([str(model), "'embed.weight'", "[36, 24]", "[37, 24]"])


def extra_tensor(base: Path, model: Path, tmp: Path) -> Case:
    tensors = load_file(str(model / SINGLE_NAME))
    tensors["extra.bias"] = torch.zeros(3, dtype=torch.bfloat16)
    _replace_weights(model, tensors)
    return Case([str(model), "'extra.bias' not in base"])


def many_mismatches(base: Path, model: Path, tmp: Path) -> Case:
    base_tensors = {f"layer.{i:02d}.weight": torch.zeros(4, 2) for i in range(12)}
    _replace_weights(base, base_tensors)
    _replace_weights(model, {n: torch.zeros(3, 2) for n in base_tensors})
    # The first five are named, the other seven counted.
    shown = [f"'layer.{i:02d}.weight' shape [3, 2] vs base [4, 2]" for i in range(5)]
    return Case([str(model), "12 tensor(s) differ", *shown, "and 7 more"])


def pickle_only(base: Path, model: Path, tmp: Path) -> Case:
    (model / SINGLE_NAME).unlink()
    # Unpickling this would create `marker`: the test checks that it never exists.
    marker = tmp / "unpickled-marker"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Opener(str(marker))))
    return Case([str(model), "pytorch_model.bin", "never unpickles", "model.safetensors", "Convert"])


class _Opener:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def index_escapes_folder(base: Path, model: Path, tmp: Path) -> Case:
    outside = model.parent / "x.safetensors"
    (model / SINGLE_NAME).rename(outside)  # it exists, and is still refused
    (model / INDEX_NAME).write_text(json.dumps({"weight_map": {"scale": "../x.safetensors"}}))
    return Case([str(model / INDEX_NAME), "'../x.safetensors'", "outside the model folder"])


def index_absolute_shard(base: Path, model: Path, tmp: Path) -> Case:
    absolute = str(model / SINGLE_NAME)
    (model / INDEX_NAME).write_text(json.dumps({"weight_map": {"scale": absolute}}))
    return Case([str(model / INDEX_NAME), repr(absolute), "outside the model folder"])


def index_weight_map_not_object(base: Path, model: Path, tmp: Path) -> Case:
    (model / INDEX_NAME).write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    return Case([str(model / INDEX_NAME), "'weight_map'", "object"])


def index_not_json(base: Path, model: Path, tmp: Path) -> Case:
    (model / INDEX_NAME).write_text('{"weight_map": ')
    return Case([str(model / INDEX_NAME), "cannot read the index"])


def index_integer_too_long(base: Path, model: Path, tmp: Path) -> Case:
    (model / INDEX_NAME).write_text('{"metadata": {"total_size": ' + "9" * 5000 + '}, "weight_map": {}}')
    return Case([str(model / INDEX_NAME)])


def index_shard_not_a_string(base: Path, model: Path, tmp: Path) -> Case:
    (model / INDEX_NAME).write_text(json.dumps({"weight_map": {"scale": 7}}))
    return Case([str(model / INDEX_NAME), "weight_map['scale']", "7"])


def budget_too_small(base: Path, model: Path, tmp: Path) -> Case:
    return Case(["--max-memory 1 MiB", "minimum for this merge is"], args=["--max-memory", "1MiB"])


def non_finite_param(base: Path, model: Path, tmp: Path) -> Case:
    """NaN would poison every tensor (a flag for a parameter the method does not use is only a
    warning, as in YAML: tests/test_cli_user.py)."""
    return Case(["--lambda: 'lambda' must be a finite number, got nan"], args=["--lambda", "nan"])


CASES: list[Damage] = [
    missing_base,
    missing_model,
    model_is_a_file,
    missing_shard,
    truncated_shard,
    header_too_short,
    header_length_beyond_file,
    header_length_huge,
    non_json_header,
    non_utf8_header,
    header_integer_too_long,
    header_is_a_list,
    unknown_dtype,
    offsets_outside_file,
    negative_offsets,
    overlapping_offsets,
    shape_offsets_mismatch,
    bad_shape,
    metadata_not_strings,
    duplicate_tensor_name,
    model_missing_tensor,
    shape_mismatch,
    extra_tensor,
    many_mismatches,
    pickle_only,
    index_escapes_folder,
    index_absolute_shard,
    index_weight_map_not_object,
    index_not_json,
    index_integer_too_long,
    index_shard_not_a_string,
    budget_too_small,
    non_finite_param,
]


# --- running them ---------------------------------------------------------------------------


def _argv(base: Path, model: Path, out: Path, extra: list[str]) -> list[str]:
    return ["merge", "--base", str(base), "--model", str(model), "--method", "task_arithmetic", "-o", str(out), *extra]


def _assert_one_error_line(stdout: str, stderr: str, expect: list[str]) -> None:
    assert "Traceback" not in stdout + stderr, stderr
    assert stdout == "", stdout
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got:\n{stderr}"
    line = lines[0]
    assert line.startswith("Error: "), line
    for part in expect:
        assert part in line, f"{part!r} not in {line!r}"


def _assert_no_output(out: Path) -> None:
    """Neither the target nor any temporary folder beside it exists (the parent is ours alone).

    The advisory lock file `.NAME.leanmerge-lock` (engine/io/lock.py) may stay behind: it holds no
    data and the next run takes it over.
    """
    assert not out.exists()
    left = {p.name: p for p in out.parent.iterdir()}
    lock = left.pop(f".{out.name}.leanmerge-lock", None)
    assert lock is None or lock.is_file()
    assert left == {}, sorted(left)


def _setup(tiny_family: MakeFamily, tmp_path: Path, damage: Damage) -> tuple[list[str], Case, Path]:
    base, (model,) = tiny_family(1)
    case = damage(base, model, tmp_path)
    out_root = tmp_path / "out-root"
    out_root.mkdir()
    out = out_root / "merged"
    argv = _argv(case.base or base, case.model or model, out, case.args)
    return argv, case, out


@pytest.mark.parametrize("damage", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_is_one_error_line(tiny_family: MakeFamily, tmp_path: Path, damage: Damage) -> None:
    argv, case, out = _setup(tiny_family, tmp_path, damage)
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # a ClickException, not a crash
    _assert_one_error_line(result.stdout, result.stderr, case.expect)
    _assert_no_output(out)
    assert not (tmp_path / "unpickled-marker").exists()


SUBPROCESS_CASES = [non_json_header, header_integer_too_long, shape_mismatch, pickle_only, budget_too_small]


@pytest.mark.slow
@pytest.mark.parametrize("damage", SUBPROCESS_CASES, ids=[c.__name__ for c in SUBPROCESS_CASES])
def test_bad_input_in_a_real_process(tiny_family: MakeFamily, tmp_path: Path, damage: Damage) -> None:
    argv, case, out = _setup(tiny_family, tmp_path, damage)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", *argv], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    _assert_one_error_line(proc.stdout, proc.stderr, case.expect)
    _assert_no_output(out)
    assert not (tmp_path / "unpickled-marker").exists()


# --- an existing output -----------------------------------------------------------------------


def test_existing_output_is_refused_and_left_untouched(tiny_family: MakeFamily, tmp_path: Path) -> None:
    base, (model,) = tiny_family(1)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = CliRunner().invoke(main, _argv(base, model, out, []))
    assert result.exit_code == 1
    _assert_one_error_line(result.stdout, result.stderr, [str(out), "already exists", "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert not any("leanmerge" in p.name for p in tmp_path.iterdir())


def test_existing_output_is_replaced_with_overwrite(tiny_family: MakeFamily, tmp_path: Path) -> None:
    """An old model folder (weights, config, a stale shard name) is replaced as a whole."""
    base, (model,) = tiny_family(1)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old")
    (out / "config.json").write_text("{}")
    result = CliRunner().invoke(main, [*_argv(base, model, out, []), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert not (out / "model-00001-of-00002.safetensors").exists()
    merged = load_file(str(out / SINGLE_NAME))
    assert set(merged) == set(load_file(str(base / SINGLE_NAME)))
    assert not any("leanmerge" in p.name for p in tmp_path.iterdir())


# --- damage that appears after the inventory --------------------------------------------------


def test_shard_truncated_mid_merge_leaves_nothing(tiny_family: MakeFamily, tmp_path: Path) -> None:
    base, (model,) = tiny_family(1)
    shard = model / SINGLE_NAME
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    events: list[str] = []

    def truncate_on_plan(e: dict[str, Any]) -> None:
        events.append(e["event"])
        if e["event"] == "plan":
            os.truncate(shard, 8 + n + 4)  # headers were read; the data is now gone

    out_root = tmp_path / "out-root"
    out_root.mkdir()
    out = out_root / "merged"
    spec = MergeSpec("task_arithmetic", base, (ModelRef(model, {}),), {})
    with pytest.raises(CheckpointError) as err:
        merge(spec, out, max_memory=8 << 30, block_bytes=64, on_event=truncate_on_plan)
    assert events[0] == "plan"
    msg = str(err.value)
    assert str(shard) in msg and "tensor '" in msg and "truncated" in msg
    _assert_no_output(out)


def test_symlinked_shard_escaping_the_folder_is_refused(tiny_family: Any, tmp_path: Path) -> None:
    """A shard may be a symlink inside the folder; one that leads outside it is refused."""
    base, (ft,) = tiny_family(1)
    outside = tmp_path / "elsewhere.safetensors"
    (ft / "model.safetensors").rename(outside)
    (ft / "model.safetensors").symlink_to(outside)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["merge", "--method", "task_arithmetic", "--base", str(base), "--model", str(ft), "-o", str(out)]
    )
    assert result.exit_code == 1 and "outside the model folder" in result.output and not out.exists()
    inside = ft / "blobs" / "weights.safetensors"
    inside.parent.mkdir()
    outside.rename(inside)
    (ft / "model.safetensors").unlink()
    (ft / "model.safetensors").symlink_to(inside)
    result = CliRunner().invoke(
        main, ["merge", "--method", "task_arithmetic", "--base", str(base), "--model", str(ft), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
