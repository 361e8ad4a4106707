"""The model card mergekit writes beside a merge, so that a leanmerge output looks the same on
the Hub: `README.md` (front matter, then what was merged, how, with what parameters and seed)
and `mergekit_config.yml` (the merge as a config, which `leanmerge merge` reads back to the
same spec digest).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from engine import __version__
from engine.dtypes import DTYPES
from engine.gradient import to_json as setting_json
from engine.slices import Slice
from engine.spec import MergeSpec

CARD_NAME = "README.md"
CONFIG_NAME = "mergekit_config.yml"
# A folder in the Hugging Face cache: .../models--OWNER--NAME/snapshots/COMMIT
_HF_CACHE = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/([^/]+)/?$")


def write_model_card(folder: Path, spec: MergeSpec, title: str) -> None:
    """Write README.md and mergekit_config.yml for the merge `spec` into `folder`."""
    config = yaml.safe_dump(mergekit_config(spec), sort_keys=False)
    (folder / CONFIG_NAME).write_text(config)
    (folder / CARD_NAME).write_text(model_card(spec, title, config))


def mergekit_config(spec: MergeSpec) -> dict[str, Any]:
    """`spec` as a mergekit-style config (engine.config's schema), paths absolute."""
    doc: dict[str, Any] = {"merge_method": spec.method}
    if spec.slices:
        doc["base_model"] = hub_ref(spec.base)
        doc["slices"] = [{"sources": _slice_sources(spec, s)} for s in spec.slices]
    elif spec.method == "passthrough":
        doc["models"] = [{"model": hub_ref(spec.base)}]
    else:
        doc["base_model"] = hub_ref(spec.base)
        doc["models"] = [{"model": hub_ref(m.path), **_params(m.params)} for m in spec.models]
    doc.update(_params(spec.params))
    if spec.out_dtype is not None:
        doc["dtype"] = str(DTYPES[spec.out_dtype]).removeprefix("torch.")
    if spec.tokenizer_source is not None:
        doc["tokenizer_source"] = hub_ref(spec.tokenizer_source)
    if spec.vocab != "base":
        doc["vocab"] = spec.vocab
    doc["random_seed"] = spec.seed
    return doc


def model_card(spec: MergeSpec, title: str, config: str) -> str:
    """README.md: Hub front matter (base_model, tags, library_name), then the merge's details.

    `base_model` lists the inputs that are Hub models (base first), by id, as mergekit's card
    does: the Hub takes only model ids there, so local folders are named in the text alone.
    """
    hub_ids = dict.fromkeys(r[0] for r in map(_cache_ref, _inputs(spec)) if r)
    front: dict[str, Any] = {"base_model": list(hub_ids)} if hub_ids else {}
    front |= {"library_name": "transformers", "tags": ["merge", "leanmerge"]}
    models = [f"* {hub_ref(m.path)}" for m in spec.models] or [f"* {hub_ref(spec.base)}"]
    params = [f"* {k}: {json.dumps(setting_json(v))}" for k, v in sorted(spec.params.items())]
    return "\n".join(
        [
            "---",
            yaml.safe_dump(front, sort_keys=False).rstrip(),
            "---",
            f"# {title}",
            "",
            f"This model is a merge of pre-trained language models, made with leanmerge {__version__} (a",
            "memory-lean, mergekit-compatible merger).",
            "",
            "## Merge details",
            "",
            f"Method: `{spec.method}`, onto the base model {hub_ref(spec.base)}. Random seed: {spec.seed}.",
            "",
            "### Models merged",
            "",
            *models,
            "",
            "### Parameters",
            "",
            *(params or ["* the method's defaults (per-model parameters: see the configuration)"]),
            "",
            "### Configuration",
            "",
            f"The merge as a config (`{CONFIG_NAME}`; `leanmerge merge {CONFIG_NAME} OUT` repeats it):",
            "",
            "```yaml",
            config.rstrip(),
            "```",
            "",
        ]
    )


def hub_name(path: Path) -> str:
    """`OWNER/NAME` for a folder in the Hugging Face cache, else the folder's path."""
    ref = _cache_ref(path)
    return ref[0] if ref else str(path)


def hub_ref(path: Path) -> str:
    """`OWNER/NAME@COMMIT` for a snapshot of the Hugging Face cache (engine.hub reads it back
    to that snapshot), else the folder's path."""
    ref = _cache_ref(path)
    return f"{ref[0]}@{ref[1]}" if ref else str(path)


def _cache_ref(path: Path) -> tuple[str, str] | None:
    m = _HF_CACHE.search(str(path))
    return (f"{m.group(1)}/{m.group(2)}", m.group(3)) if m else None


def _inputs(spec: MergeSpec) -> list[Path]:
    """Every folder the merge reads, base first."""
    sources = [src.path for s in spec.slices for src in (s.base, *s.models)]
    return [spec.base, *(m.path for m in spec.models), *sources]


def _slice_sources(spec: MergeSpec, s: Slice) -> list[dict[str, Any]]:
    """A slice's sources as engine.config reads them: the base's first (where the method reads
    it), then model k's with model k's parameters."""
    if spec.method == "passthrough":
        return [_source(s.base)]
    base = [_source(s.base)] if spec.method_impl.uses_base else []
    return [*base, *(_source(src, spec.models[k].params) for k, src in enumerate(s.models))]


def _source(src: Any, params: Any = None) -> dict[str, Any]:
    return {"model": hub_ref(src.path), "layer_range": [src.start, src.end], **_params(params or {})}


def _params(params: Any) -> dict[str, Any]:
    return {"parameters": {k: setting_json(v) for k, v in sorted(params.items())}} if params else {}
