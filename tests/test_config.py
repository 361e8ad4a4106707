"""mergekit-style YAML configs: every example in tests/configs merges to its whole-tensor
reference; gradients and filters resolve per tensor as mergekit does; every bad key, type and
path is one error line naming the file, the line and the key."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from engine import merge
from engine.cli import main
from engine.config import load_config
from engine.errors import SpecError
from engine.methods.registry import METHODS
from engine.plan import make_plan

from conftest import MakeFamily, llama_shapes
from reference import dare_merge, load_model, merge_folders, merge_folders_stats, stack_layers, stats_merge
from reference_select import merge_folders_select

CONFIGS = Path(__file__).parent / "configs"
N_LAYERS = 5
LLAMA = llama_shapes(N_LAYERS)  # embeddings (pre), 5 numbered layers, final norm and lm_head (post)

# What each example config means, spelled out for the references (not parsed from the YAML).
EXPECTED: dict[str, tuple[str, dict[str, object]]] = {
    "linear": ("linear", {"weights": [0.2, 0.5, 0.3], "normalize": True}),
    "task_arithmetic": ("task_arithmetic", {"weights": [0.7, 0.3], "lam": 0.8}),
    "dare_linear": ("dare_linear", {"weights": [0.6, 0.4], "densities": [0.3, 0.5], "seed": 11}),
    "dare_ties": ("dare_ties", {"weights": [0.6, 0.4], "densities": [0.2, 0.1], "seed": 42, "normalize": True}),
    "ties": ("stats", {"weights": [1.0, 0.5], "densities": [0.5, 0.7], "normalize": True}),
    "breadcrumbs": ("stats", {"weights": [0.5, 0.5], "densities": [0.8, 0.8], "gammas": [0.05, 0.02]}),
    "breadcrumbs_ties": ("stats", {"weights": [0.5, 0.5], "densities": [0.8, 0.8], "gammas": [0.05, 0.05]}),
    "della": ("stats", {"weights": [0.6, 0.4], "densities": [0.5, 0.7], "epsilons": [0.1, 0.2], "seed": 3}),
    "della_linear": ("stats", {"weights": [0.6, 0.4], "densities": [0.5, 0.5], "epsilons": [0.1, 0.1], "seed": 3}),
    "slerp": ("stats", {"t": 0.3}),
    "model_stock": ("stats", {}),
    "passthrough": ("passthrough", {}),
    "sce": ("select", {"select_topk": 0.5}),
    "ram": ("select", {"epsilon": 0.01}),
    "ramplus_tl": ("select", {"epsilon": 0.01, "r": 0.2, "alpha": 0.5}),
}


def place(name: str, root: Path) -> Path:
    """Copy tests/configs/NAME.yaml next to the family's base/ft1/ft2 folders."""
    return Path(shutil.copy(CONFIGS / f"{name}.yaml", root / f"{name}.yaml"))


def test_every_registered_method_has_an_example_config() -> None:
    methods = {load_config(p, check_paths=False).method for p in CONFIGS.glob("*.yaml")}
    assert methods >= set(METHODS), f"no example config for {sorted(set(METHODS) - methods)}"
    assert set(EXPECTED) >= set(METHODS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_config_merges_to_its_reference(name: str, tiny_family: MakeFamily) -> None:
    base, models = tiny_family(2, shapes=LLAMA)
    root = base.parent
    spec = load_config(place(name, root))
    merge(spec, root / "out", block_bytes=40)
    method, ref = EXPECTED[name]
    out_dtype = torch.float32 if spec.out_dtype == "F32" else None
    if method == "linear":
        want = merge_folders("linear", base, [base, *models], out_dtype, **ref)
    elif method == "passthrough":
        ft1, ft2 = (load_model(m) for m in models)
        want = stack_layers([(ft1, 0, 3), (ft2, 2, 5)])
    elif method == "select":
        want = merge_folders_select(name, base, models, out_dtype, **ref)
    elif method == "stats":
        ms = models[:1] if name == "slerp" else models
        want = merge_folders_stats(name, base, ms, out_dtype, **ref)
    else:
        want = merge_folders(method, base, models, out_dtype, **ref)
    got = load_model(root / "out")
    assert got.keys() == want.keys()
    for n, w in want.items():
        assert torch.equal(got[n], w), n


def mergekit_position(name: str) -> float:
    """mergekit: layer i of n at i / (n - 1); everything outside the layers at 0 (since 0.1)."""
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) / (N_LAYERS - 1) if m else 0.0


def interpolate(values: list[float], t: float) -> float:
    s = t * (len(values) - 1)
    lo, hi = math.floor(s), math.ceil(s)
    return (1 - (s - lo)) * values[lo] + (s - lo) * values[hi]


def test_gradient_values_per_tensor(tmp_path: Path) -> None:
    spec = load_config(place("gradient_dare_ties", tmp_path), check_paths=False)
    assert spec.varies_by_tensor
    got = {n: spec.tensor_params(n, N_LAYERS) for n in LLAMA}
    # weight [0.2, 1.0, 0.6] over 5 layers: t = 0, .25, .5, .75, 1 -> 0.2, 0.6, 1.0, 0.8, 0.6
    for i, w in enumerate([0.2, 0.6, 1.0, 0.8, 0.6]):
        assert got[f"model.layers.{i}.mlp.up_proj.weight"].per_model("weight") == pytest.approx([w, 0.5])
    assert got["model.embed_tokens.weight"].per_model("weight") == pytest.approx([0.2, 0.5])
    # lm_head and the final norm take the first value too (mergekit since its March 2025 change)
    assert got["lm_head.weight"].per_model("weight") == pytest.approx([0.2, 0.5])
    assert got["model.norm.weight"].per_model("density") == pytest.approx([0.3, 0.5])
    assert got["model.layers.2.input_layernorm.weight"].per_model("density") == pytest.approx([0.6, 0.5])


def test_gradient_config_merges_per_tensor(tiny_family: MakeFamily) -> None:
    base, models = tiny_family(2, shapes=LLAMA)
    root = base.parent
    spec = load_config(place("gradient_dare_ties", root))
    merge(spec, root / "out", block_bytes=40)
    b, ms, got = load_model(base), [load_model(m) for m in models], load_model(root / "out")
    for name in LLAMA:
        t = mergekit_position(name)
        weights = [interpolate([0.2, 1.0, 0.6], t), 0.5]
        densities = [interpolate([0.3, 0.9], t), 0.5]
        want = dare_merge(
            "dare_ties",
            name,
            b[name].float(),
            [m[name].float() for m in ms],
            weights=weights,
            densities=densities,
            seed=5,
        )
        assert torch.equal(got[name], want), name


def test_filtered_gradient_slerp(tiny_family: MakeFamily) -> None:
    base, (ft1, _) = tiny_family(2, shapes=LLAMA)
    root = base.parent
    spec = load_config(place("gradient_slerp", root))
    merge(spec, root / "out", block_bytes=24)
    b, m, got = load_model(base), load_model(ft1), load_model(root / "out")
    for name in LLAMA:
        pos = mergekit_position(name)
        if "self_attn" in name:
            t = interpolate([0, 0.5, 0.3, 0.7, 1], pos)
        elif "mlp" in name:
            t = interpolate([1, 0.5, 0.7, 0.3, 0], pos)
        else:
            t = 0.5
        want = stats_merge("slerp", name, b[name].float(), [m[name].float()], t=t).to(torch.bfloat16)
        assert torch.equal(got[name], want), name


def test_passes_follow_per_tensor_parameters(tiny_family: MakeFamily, tmp_path: Path) -> None:
    """A density gradient that reaches 1 needs no norm-rescale pass there."""
    from engine.io.inventory import take_inventory

    base, (a,) = tiny_family(1, shapes=LLAMA)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"merge_method: dare_linear\nbase_model: {base}\nmodels: [{{model: {a}, parameters: {{density: [0.5, 1, 1, 1, 1]}}}}]\n"
        "parameters: {rescale_norm: l2}\n"
    )
    spec = load_config(cfg)
    plan = make_plan(spec, take_inventory(spec.base, [a]), budget=1 << 32, baseline=0)
    passes = {t.name: t.passes for t in plan.tensors}
    assert passes["model.layers.0.self_attn.q_proj.weight"] == 2
    assert passes["model.layers.1.self_attn.q_proj.weight"] == 1
    assert passes["model.layers.4.self_attn.q_proj.weight"] == 1
    assert passes["model.embed_tokens.weight"] == 2 and passes["lm_head.weight"] == 2  # outside the layers: t = 0


def test_ignored_parameters_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for d in ("b", "a"):
        (tmp_path / d).mkdir()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "merge_method: linear\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: 1, density: 0.5}\n"
        "parameters: {int8_mask: true}\n"
    )
    with caplog.at_level(logging.INFO, logger="engine.config"):
        spec = load_config(cfg)
    assert spec.models[0].params == {"weight": 1}
    assert "c.yaml:5: models[0].parameters.density is not used by linear; ignored" in caplog.text
    assert "c.yaml:6: parameters.int8_mask" in caplog.text


def test_linear_without_base_model_uses_the_first_model_as_template(tmp_path: Path) -> None:
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("merge_method: linear\nmodels: [{model: a}, {model: b}]\n")
    spec = load_config(cfg)
    assert spec.base == tmp_path / "a" and [m.path for m in spec.models] == [tmp_path / "a", tmp_path / "b"]


def test_tokenizer_source_copies_that_models_tokenizer(tiny_family: MakeFamily) -> None:
    base, (a,) = tiny_family(1)
    (a / "tokenizer.json").write_text('{"added": true}')
    root = base.parent
    cfg = root / "c.yaml"
    cfg.write_text(
        f"merge_method: task_arithmetic\nbase_model: ./base\nmodels: [{{model: ./{a.name}}}]\ntokenizer_source: ./{a.name}\n"
    )
    spec = load_config(cfg)
    assert spec.tokenizer_source == a
    merge(spec, root / "out")
    assert (root / "out" / "tokenizer.json").read_text() == '{"added": true}'
    config = json.loads((base / "config.json").read_text())  # stating its dtype under both keys
    assert json.loads((root / "out" / "config.json").read_text()) == config | {"dtype": "bfloat16"}


GOOD = "merge_method: dare_ties\nbase_model: ./b\nmodels:\n  - model: ./a\n    parameters: {weight: 0.5}\n"
# A passthrough slice of ./a (lines 1-5), and sources and slices to add to it.
SL = "merge_method: passthrough\nslices:\n  - sources:\n      - model: ./a\n        layer_range: [0, 2]\n"
SRC_A = "      - model: ./a\n        layer_range: [0, 2]\n"
SRC_B = SRC_A.replace("./a", "./b")
SLICE2 = "  - sources:\n" + SRC_B
TIES_SL = "merge_method: ties\nbase_model: ./b\nslices:\n  - sources:\n" + SRC_A
# (text appended to or replacing GOOD, the line the error names, substrings of the message)
BAD: list[tuple[str, int, list[str]]] = [
    (GOOD + "foo: 1\n", 6, ["unsupported key 'foo'", "supported: merge_method"]),
    (GOOD + "slices: []\n", 3, ["give either 'models' or 'slices', not both"]),
    (GOOD + "tokenizer: {source: union}\n", 6, ["'tokenizer'", "not supported yet"]),
    (GOOD + "tokenizer_source: union\n", 6, ["tokenizer_source 'union'", "not supported yet"]),
    (GOOD + "tokenizer_source: ./nowhere\n", 6, ["tokenizer_source", "nowhere does not exist"]),
    (GOOD.replace("dare_ties", "nuslerp"), 1, ["merge_method 'nuslerp' is not supported yet"]),
    (GOOD.replace("dare_ties", "passthrough") + "  - model: ./c\n", 3, ["passthrough copies one model"]),
    ("merge_method: passthrough\nslices: []\n", 2, ["'slices' must be a non-empty list"]),
    (SL.replace("[0, 2]", "[2, 2]"), 5, ["sources[0].layer_range must be [start, end]", "[2, 2]"]),
    (SL.replace("[0, 2]", "[0, x]"), 5, ["layer_range must be [start, end]"]),
    (SL.replace("[0, 2]", "[0, 1, 2]"), 5, ["layer_range must be [start, end]"]),
    (SL.replace("[0, 2]", "[true, 2]"), 5, ["layer_range must be [start, end]"]),
    (
        SL.replace("model: ./a", "modl: ./a"),
        4,
        ["slices[0].sources[0] must be a mapping with 'model' and 'layer_range'"],
    ),
    (SL.replace("./a", "./gone"), 4, ["slices[0].sources[0].model", "gone does not exist"]),
    (SL + SRC_B, 3, ["passthrough takes one source per slice, got 2"]),
    (SL + "    parameters: {t: 1}\n", 6, ["slices[0]: unsupported key 'parameters' (supported: sources)"]),
    (SL + "        weight: 1\n", 6, ["slices[0].sources[0]: unsupported key 'weight'"]),
    (SL + "models: [{model: ./a}]\n", 6, ["give either 'models' or 'slices', not both"]),
    (SL.replace("passthrough", "ties"), 0, ["missing required key 'base_model'", "needs a base"]),
    (TIES_SL, 4, ["slices[0]: no source is base_model", "b;"]),
    (
        TIES_SL + SRC_B.replace("[0, 2]", "[0, 3]"),
        4,
        ["slices[0]: every source of a slice must span the same number of layers", "b [0, 3], a [0, 2]"],
    ),
    (TIES_SL + SRC_B + SLICE2, 9, ["slices[1] has 0 model source(s) besides the base, slices[0] has 1"]),
    (GOOD.replace("dare_ties", "dare_tie"), 1, ["unknown merge_method 'dare_tie'", "dare_ties"]),
    (GOOD.replace("./b", "./missing"), 2, ["base_model", "missing does not exist", "download"]),
    (GOOD.replace("./a", "./gone"), 4, ["models[0].model", "gone does not exist"]),
    (GOOD.replace("./a", "./b+./lora"), 4, ["MODEL+LORA", "not supported"]),
    (GOOD.replace("./a", "[x]"), 4, ["'models[0].model' must be a folder path"]),
    (GOOD + "  - modle: ./a\n", 6, ["models[1] must be a mapping with a 'model' key"]),
    (GOOD + "    weight: 1\n", 6, ["models[0]: unsupported key 'weight'", "supported: model, parameters"]),
    (GOOD + "parameters: {densty: 0.5}\n", 6, ["unknown parameter 'densty'", "parameters of dare_ties"]),
    (GOOD + "parameters: {density: high}\n", 6, ["'density' must be a number", "'high'"]),
    (GOOD + "parameters:\n  lambda: 1\n  density: 1.5\n", 8, ["'density' must lie in (0, 1]", "1.5"]),
    (GOOD + "parameters: {density: [0.5, 2.0]}\n", 6, ["'density' must lie in (0, 1]", "2.0"]),
    (GOOD + "parameters: {density: [0.5, {value: 1}]}\n", 6, ["parameters.density", "all numbers"]),
    (GOOD + "parameters: {density: [{filter: mlp, vale: 0.5}]}\n", 6, ["unsupported key 'vale' in a rule"]),
    (GOOD + "parameters: {density: [{filter: mlp}]}\n", 6, ["a rule needs a 'value'"]),
    (GOOD + "parameters: {normalize: 1}\n", 6, ["'normalize' must be true or false"]),
    (GOOD + "parameters: {density: null}\n", 6, ["parameters.density: expected a number"]),
    (GOOD + "parameters: [density]\n", 6, ["parameters must be a mapping"]),
    (GOOD.replace("{weight: 0.5}", "{lambda: 0.5}"), 5, ["'lambda' is a global parameter"]),
    (GOOD + "random_seed: abc\n", 6, ["random_seed must be an integer", "'abc'"]),
    (GOOD + "random_seed: -1\n", 6, ["random_seed must be an integer"]),
    (GOOD + "dtype: int8\n", 6, ["dtype", "'int8' is not a float type"]),
    (GOOD + "out_dtype: 16\n", 6, ["out_dtype", "not a float type"]),
    (GOOD + "vocab: all\n", 6, ["vocab must be one of base, union", "'all'"]),
    (GOOD + "merge_method: ties\n", 6, ["duplicate key 'merge_method' (first on line 1)"]),
    ("base_model: ./b\nmodels: [{model: ./a}]\n", 0, ["missing required key 'merge_method'"]),
    ("merge_method: ties\nmodels: [{model: ./a}]\n", 0, ["missing required key 'base_model'", "needs a base"]),
    ("merge_method: ties\nbase_model: ./b\nmodels: ./a\n", 3, ["'models' must be a non-empty list"]),
    ("merge_method: ties\nbase_model: ./b\nmodels: []\n", 3, ["'models' must be a non-empty list"]),
    ("merge_method: [ties\n", 0, ["not valid YAML"]),
    ("- just\n- a list\n", 0, ["a config must be a mapping"]),
    (GOOD.replace("dare_ties", "slerp") + "  - model: ./c\n", 0, ["slerp", "at most 1 model"]),
]


@pytest.mark.parametrize(("text", "line", "parts"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_config_is_one_error_line(tmp_path: Path, text: str, line: int, parts: list[str]) -> None:
    for d in ("a", "b", "c"):
        (tmp_path / d).mkdir()
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(text)
    with pytest.raises(SpecError) as e:
        load_config(cfg)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{cfg}:{line}: " if line else f"{cfg}: "), message
    for part in parts:
        assert part in message, message


def test_cli_reports_the_config_line(tmp_path: Path) -> None:
    cfg = tmp_path / "merge.yaml"
    cfg.write_text("merge_method: ties\nbase_model: ./b\nmodels: [{model: ./a}]\nmodules: []\n")
    result = CliRunner().invoke(main, ["plan", str(cfg)])
    assert result.exit_code == 1
    assert f"{cfg}:4: 'modules'" in result.output and result.output.count("\n") == 1


def test_combined_constraints_are_checked_for_every_tensor(tiny_family: MakeFamily) -> None:
    from engine import prepare

    base, (a,) = tiny_family(1, shapes=LLAMA)
    cfg = base.parent / "c.yaml"
    head = f"merge_method: breadcrumbs\nbase_model: {base}\nmodels: [{{model: {a}}}]\n"
    cfg.write_text(head + "parameters: {gamma: 0.05, density: [0.5, 0.97]}\n")
    with pytest.raises(SpecError, match=r"'gamma' 0.05 \+ 'density' 0.97 exceeds 1"):
        load_config(cfg)  # a gradient's knots are checked with the spec
    cfg.write_text(head + "parameters:\n  gamma: 0.05\n  density: [{filter: mlp, value: 0.97}, {value: 0.5}]\n")
    spec = load_config(cfg)  # no tensor name: the catch-all rule
    with pytest.raises(SpecError, match=r"tensor 'model.layers.0.mlp.up_proj.weight': breadcrumbs: .* exceeds 1"):
        prepare(spec, max_memory=1 << 32)  # a filter's values are checked per tensor by the plan
