"""Layer slices: frankenmerges (passthrough) and merges over layer ranges equal their whole-tensor
references, renumbered; config.json learns the new depth; bad ranges are one error line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from engine import merge
from engine.cli import main
from engine.config import load_config
from engine.errors import CheckpointError

from conftest import MakeFamily, llama_shapes
from reference import load_model, stack_layers, task_arithmetic

N_LAYERS = 4
SHAPES = llama_shapes(N_LAYERS)
LAYER = re.compile(r"\.layers\.(\d+)\.")


def write_config(root: Path, text: str) -> Path:
    cfg = root / "merge.yaml"
    cfg.write_text(text)
    return cfg


def source(model: str, a: int, b: int, extra: str = "") -> str:
    return f"      - model: ./{model}\n        layer_range: [{a}, {b}]\n{extra}"


def test_passthrough_stacks_and_repeats_layers(tiny_family: MakeFamily) -> None:
    base, (ft1, ft2) = tiny_family(2, shapes=SHAPES)
    root = base.parent
    (ft1 / "config.json").write_text(json.dumps({"num_hidden_layers": N_LAYERS, "torch_dtype": "float16"}))
    slices = [("ft1", 0, 3), ("ft2", 1, 4), ("ft1", 3, 4), ("ft1", 3, 4)]  # the last layer twice
    cfg = "merge_method: passthrough\nslices:\n" + "".join(f"  - sources:\n{source(*s)}" for s in slices)
    merge(load_config(write_config(root, cfg)), root / "out", block_bytes=40)
    got, a, b = load_model(root / "out"), load_model(ft1), load_model(ft2)
    want = stack_layers([(a, 0, 3), (b, 1, 4), (a, 3, 4), (a, 3, 4)])
    assert got.keys() == want.keys()
    assert sum(1 for n in got if n.endswith("input_layernorm.weight")) == 8
    for n, w in want.items():
        assert torch.equal(got[n], w), n
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], a["lm_head.weight"])  # the last slice is ft1's
    config = json.loads((root / "out" / "config.json").read_text())
    # from the first slice's model, stating the dtype written (its "float16" was wrong)
    assert config == {"num_hidden_layers": 8, "torch_dtype": "bfloat16", "dtype": "bfloat16"}
    assert CliRunner().invoke(main, ["verify", str(root / "out")]).exit_code == 0


def test_passthrough_scale_by_filter_and_one_model_copy(tiny_family: MakeFamily) -> None:
    """A filter matches the source tensor's name (mergekit): `layers.1.` is source layer 1, here
    output layers 1 and 2 (layer 1 twice), not output layer 1."""
    base, (ft1,) = tiny_family(1, shapes=SHAPES)
    root = base.parent
    cfg = (
        "merge_method: passthrough\nslices:\n  - sources:\n"
        + source("ft1", 0, 2)
        + "  - sources:\n"
        + source("ft1", 1, 2)
        + "parameters:\n  scale:\n    - {filter: layers.1.self_attn.q_proj, value: 0}\n    - {value: 1}\n"
    )
    merge(load_config(write_config(root, cfg)), root / "out")
    got, a = load_model(root / "out"), load_model(ft1)
    for i in (1, 2):
        assert torch.equal(got[f"model.layers.{i}.self_attn.q_proj.weight"], torch.zeros(8, 8, dtype=torch.bfloat16))
    assert torch.equal(got["model.layers.2.mlp.up_proj.weight"], a["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"], a["model.layers.0.self_attn.q_proj.weight"])
    # Without slices, passthrough copies its one model, here converting the dtype.
    copy = "merge_method: passthrough\nmodels: [{model: ./ft1}]\ndtype: float32\n"
    merge(load_config(write_config(root, copy)), root / "copy")
    got = load_model(root / "copy")
    assert all(torch.equal(got[n], t.float()) for n, t in a.items())


def test_merge_over_layer_ranges_matches_the_reference(tiny_family: MakeFamily) -> None:
    """Each output layer is task arithmetic of the layers its slice names, whatever their index."""
    base, (ft1, ft2) = tiny_family(2, shapes=SHAPES)
    root = base.parent
    w = "        parameters: {weight: %s}\n"
    cfg = (
        "merge_method: task_arithmetic\nbase_model: ./base\nparameters: {lambda: 0.9}\nslices:\n"
        + "  - sources:\n" + source("base", 0, 2) + source("ft1", 0, 2, w % 0.7) + source("ft2", 2, 4, w % 0.4)
        + "  - sources:\n" + source("ft1", 3, 4, w % 0.7) + source("base", 3, 4) + source("ft2", 0, 1, w % 0.4)
    )  # fmt: skip
    merge(load_config(write_config(root, cfg)), root / "out", block_bytes=24)
    got = load_model(root / "out")
    b, m1, m2 = load_model(base), load_model(ft1), load_model(ft2)
    layers = [(0, 0, 2), (1, 1, 3), (3, 3, 0)]  # output layer -> source layers of (base, ft1), ft2
    assert len(got) == len(SHAPES) - N_LAYERS * 3 + 3 * 3
    for name, out in got.items():
        m = LAYER.search(name)
        if m is None:
            src = (name, name, name)
        else:
            _, i, k = layers[int(m.group(1))]
            src = tuple(name[: m.start(1)] + str(x) + name[m.end(1) :] for x in (i, i, k))
        bf = b[src[0]].float()
        want = task_arithmetic(bf, [m1[src[1]].float(), m2[src[2]].float()], [0.7, 0.4], 0.9, False)
        assert torch.equal(out, want.to(torch.bfloat16)), name


def test_one_full_slice_is_the_same_merge_as_listing_the_models(tiny_family: MakeFamily) -> None:
    base, _ = tiny_family(1, shapes={k: v for k, v in SHAPES.items() if not re.search(r"layers\.[4-9]", k)})
    root = base.parent
    cfg_slerp = Path(__file__).parent / "configs"
    for name in ("slerp", "dare_ties"):
        if name == "slerp":
            listed = (cfg_slerp / "gradient_slerp.yaml").read_text()
            sliced = (cfg_slerp / "slices_slerp.yaml").read_text().replace("[0, 5]", f"[0, {N_LAYERS}]")
        else:
            listed = (
                "merge_method: dare_ties\nbase_model: ./base\nmodels: [{model: ./ft1, parameters: {density: 0.3}}]\n"
            )
            sliced = (
                "merge_method: dare_ties\nbase_model: ./base\nslices:\n  - sources:\n"
                + source("ft1", 0, N_LAYERS, "        parameters: {density: 0.3}\n")
                + source("base", 0, N_LAYERS)
            )
        merge(load_config(write_config(root, listed)), root / f"{name}-listed")
        merge(load_config(write_config(root, sliced)), root / f"{name}-sliced", block_bytes=40)
        a, b = load_model(root / f"{name}-listed"), load_model(root / f"{name}-sliced")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[n], b[n]) for n in a), name


def test_gradients_run_along_each_slice(tmp_path: Path) -> None:
    """mergekit: layer i of a slice of n layers sits at t = i / (n - 1); a one-layer slice at 1;
    the tensors outside the layers (embeddings, final norm, lm_head) at 0."""
    for d in ("base", "ft1"):
        (tmp_path / d).mkdir()
    cfg = (
        "merge_method: task_arithmetic\nbase_model: ./base\nparameters: {weight: [0, 1]}\nslices:\n"
        + "  - sources:\n" + source("base", 0, 3) + source("ft1", 0, 3)
        + "  - sources:\n" + source("base", 3, 4) + source("ft1", 3, 4)
    )  # fmt: skip
    spec = load_config(write_config(tmp_path, cfg))
    weights = [spec.tensor_params(f"model.layers.{j}.mlp.up_proj.weight", 4).per_model("weight") for j in range(4)]
    assert weights == [[0.0], [0.5], [1.0], [1.0]]
    assert spec.tensor_params("model.embed_tokens.weight", 4).per_model("weight") == [0.0]
    assert spec.tensor_params("lm_head.weight", 4).per_model("weight") == [0.0]
    assert spec.tensor_params("model.norm.weight", 4).per_model("weight") == [0.0]


def test_layer_range_past_the_model_is_one_error_line(tiny_family: MakeFamily) -> None:
    base, _ = tiny_family(1, shapes=SHAPES)
    root = base.parent
    cfg = write_config(root, "merge_method: passthrough\nslices:\n  - sources:\n" + source("ft1", 2, 6))
    with pytest.raises(CheckpointError, match=r"ft1: slices\[0\] layer_range \[2, 6\] reaches past its 4 layers"):
        merge(load_config(cfg), root / "out")
    result = CliRunner().invoke(main, ["merge", str(cfg), "-o", str(root / "out")])
    assert result.exit_code != 0 and result.output.count("\n") == 1, result.output
    assert "reaches past its 4 layers" in result.output
    assert not (root / "out").exists()


def test_adapter_cannot_be_a_slice_source(tiny_family: MakeFamily) -> None:
    base, _ = tiny_family(1, shapes=SHAPES)
    root = base.parent
    (root / "lora").mkdir()
    (root / "lora" / "adapter_config.json").write_text("{}")
    cfg = write_config(root, "merge_method: passthrough\nslices:\n  - sources:\n" + source("lora", 0, 2))
    with pytest.raises(CheckpointError, match="a LoRA adapter cannot be a slice source"):
        merge(load_config(cfg), root / "out")


def test_filters_match_each_sources_tensor_name(tiny_family: MakeFamily) -> None:
    """mergekit matches a per-model parameter's filters (its own and the global fallback) against
    the tensor that model reads, and the method's global parameters against the output tensor."""
    from engine.io.inventory import take_inventory
    from engine.plan import make_plan

    base, (ft1, ft2) = tiny_family(2, shapes=SHAPES)
    root = base.parent
    own = "        parameters: {weight: [{filter: layers.2., value: 0.25}, {value: 1}]}\n"
    cfg = (
        "merge_method: task_arithmetic\nbase_model: ./base\n"
        "parameters:\n  weight: [{filter: layers.2., value: 0.5}, {value: 1}]\n"
        "  lambda: [{filter: layers.1., value: 0.75}, {value: 1}]\nslices:\n  - sources:\n"
        + source("base", 0, 2) + source("ft1", 2, 4, own) + source("ft2", 1, 3)
    )  # fmt: skip
    spec = load_config(write_config(root, cfg))
    plan = make_plan(spec, take_inventory(spec.base, [ft1, ft2], slices=spec.slices), budget=1 << 32, baseline=0)
    # output layer i reads layer i + 2 of ft1 and i + 1 of ft2; lambda follows the output layer
    want = {0: ([0.25, 1.0], 1.0), 1: ([1.0, 0.5], 0.75)}
    for i, (weights, lam) in want.items():
        p = plan.params_for(f"model.layers.{i}.mlp.up_proj.weight")
        assert (p.per_model("weight"), p.number("lambda")) == (weights, lam), i
    assert plan.params_for("lm_head.weight").per_model("weight") == [1.0, 1.0]
    merge(spec, root / "out", block_bytes=24)
    got, b, m1, m2 = load_model(root / "out"), load_model(base), load_model(ft1), load_model(ft2)
    for name, out in got.items():
        m = LAYER.search(name)
        i = None if m is None else int(m.group(1))
        weights, lam = want[i] if i is not None else ([1.0, 1.0], 1.0)
        src = [name if i is None else name[: m.start(1)] + str(i + k) + name[m.end(1) :] for k in (0, 2, 1)]  # type: ignore[union-attr]
        want_t = task_arithmetic(b[src[0]].float(), [m1[src[1]].float(), m2[src[2]].float()], weights, lam, False)
        assert torch.equal(out, want_t.to(torch.bfloat16)), name


def test_passthrough_scale_per_model(tiny_family: MakeFamily) -> None:
    """mergekit's passthrough test writes `scale` on the model's own entry; it also goes on a
    slice source, filters matched against the source's tensor names."""
    base, (ft1,) = tiny_family(1, shapes=SHAPES)
    root = base.parent
    a = load_model(ft1)
    scale = "{scale: [{filter: q_proj, value: 0}, {filter: layers.1., value: 0.5}, {value: 1}]}"
    listed = f"merge_method: passthrough\nmodels:\n  - model: ./ft1\n    parameters: {scale}\n"
    result = CliRunner().invoke(main, ["merge", str(write_config(root, listed)), "-o", str(root / "out")])
    assert result.exit_code == 0, result.output

    def scaled(name: str, t: torch.Tensor) -> torch.Tensor:
        s = 0.0 if "q_proj" in name else 0.5 if "layers.1." in name else 1.0
        return (t.float() * s).to(t.dtype)

    got = load_model(root / "out")
    assert got.keys() == a.keys()
    assert all(torch.equal(got[n], scaled(n, t)) for n, t in a.items())
    sliced = "merge_method: passthrough\nslices:\n" + "".join(
        f"  - sources:\n{source('ft1', x, y, f'        parameters: {scale}' + chr(10))}" for x, y in ((0, 2), (1, 2))
    )
    merge(load_config(write_config(root, sliced)), root / "sliced")
    got, want = load_model(root / "sliced"), stack_layers([(a, 0, 2), (a, 1, 2)])
    assert got.keys() == want.keys()
    for n, t in want.items():
        src = LAYER.sub(".layers.1.", n) if n.startswith("model.layers.2.") else n  # output layer 2 is layer 1
        assert torch.equal(got[n], scaled(src, t)), n


def test_each_slice_sources_parameters_hold_for_its_slice(tiny_family: MakeFamily) -> None:
    """mergekit's frankenmerge idiom: scale only the repeated copy of a layer, by parameters on the
    second slice's source; lm_head and the final norm take the last slice's, embeddings the first's."""
    base, (ft1,) = tiny_family(1, shapes=SHAPES)
    root = base.parent
    own = "        parameters: {scale: [{filter: self_attn, value: 0.5}, {filter: lm_head, value: 0}, {value: 1}]}\n"
    cfg = (
        "merge_method: passthrough\nslices:\n  - sources:\n"
        + source("ft1", 0, 2)
        + "  - sources:\n"
        + source("ft1", 1, 2, own)
    )
    merge(load_config(write_config(root, cfg)), root / "out", block_bytes=40)
    got, a = load_model(root / "out"), load_model(ft1)
    want = stack_layers([(a, 0, 2), (a, 1, 2)])
    assert got.keys() == want.keys()
    for n, t in want.items():
        s = 0.5 if n.startswith("model.layers.2.self_attn") else 0.0 if n.startswith("lm_head") else 1.0
        assert torch.equal(got[n], (t.float() * s).to(t.dtype)), n
    ta = (
        "merge_method: task_arithmetic\nbase_model: ./base\nslices:\n"
        + "  - sources:\n" + source("base", 0, 3) + source("ft1", 0, 3, "        parameters: {weight: 0.25}\n")
        + "  - sources:\n" + source("base", 3, 4) + source("ft1", 3, 4, "        parameters: {weight: [0.75, 0.5]}\n")
    )  # fmt: skip
    spec = load_config(write_config(root, ta))
    weights = {n: spec.tensor_params(n, 4).per_model("weight") for n in SHAPES}
    assert weights["model.layers.2.mlp.up_proj.weight"] == [0.25] and weights["model.embed_tokens.weight"] == [0.25]
    assert weights["model.layers.3.mlp.up_proj.weight"] == [0.5]  # a one-layer slice sits at t = 1
    assert weights["lm_head.weight"] == weights["model.norm.weight"] == [0.75]  # the last slice's, at t = 0
