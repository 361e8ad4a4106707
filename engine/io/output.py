"""The output folder's life: a hidden temporary folder beside the target, renamed when complete.

Nothing under the target name ever looks complete unless it is: the merge writes into
`.NAME.leanmerge-tmp` on the same filesystem and only a finished, synced folder is renamed
into place. A run stopped by a signal or an I/O error keeps its temporary folder (with its journal) so that
`--resume` can continue it; a run stopped by a bad input removes it.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from engine import __version__
from engine.embed_rows import built_files
from engine.io.checkpoint import INDEX_NAME
from engine.io.journal import JOURNAL_NAME
from engine.io.model_card import write_model_card
from engine.io.record import FILES_KEY, folder_record, fsync_files
from engine.io.url import copy_file
from engine.plan import Plan
from engine.slices import output_layers
from engine.tokens import set_chat_template

# Files a model folder needs besides weights; copied from the base when present.
SIDE_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",  # a multimodal processor's (LLaVA-style)
    "preprocessor_config.json",  # a multimodal model's image (and video) processing, as mergekit copies them
    "processor_config.json",
    "video_preprocessor_config.json",
)
# The model's own files, from the base; the rest are the tokenizer's, copied from the spec's
# `tokenizer_source` when it names a model.
MODEL_SIDE_FILES = frozenset(
    {"config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
     "video_preprocessor_config.json"}
)  # fmt: skip
TOKENIZER_FILES = frozenset(SIDE_FILES) - MODEL_SIDE_FILES
# config.json keys that hold the layer count, by architecture family (Llama/Mistral/Qwen, GPT-2, T5-like).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
TORCH_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
# config.json keys that give the weights' dtype: transformers 5 reads `dtype`, 4.x `torch_dtype`.
DTYPE_KEYS = ("dtype", "torch_dtype")


def temp_dir_for(target: Path) -> Path:
    return target.parent / f".{target.name}.leanmerge-tmp"


def write_side_files(
    tmp: Path, plan: Plan, checksums: dict[str, str], *, card: str | None = None, tokenizer: bool = True
) -> None:
    """The base's config and (with `tokenizer`) tokenizer files, with a `card` title the model
    card (engine.io.model_card), then the index json with every tensor's crc32 and the sha256 of
    each shard header and other file (for `leanmerge verify`); all fsync'd, as the folder is
    renamed into place next."""
    copy_side_files(tmp, plan, card=card, tokenizer=tokenizer)
    leanmerge = {"version": __version__, "spec_sha256": plan.spec.digest(), "tensor_crc32": checksums}
    leanmerge |= folder_record(tmp, [s.file for s in plan.shards], {INDEX_NAME, JOURNAL_NAME})
    index = {
        "metadata": {"total_size": plan.bytes_written, "leanmerge": leanmerge},
        "weight_map": {t.name: plan.shards[t.shard].file for t in plan.tensors},
    }
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    fsync_files(tmp, [INDEX_NAME, *leanmerge[FILES_KEY]])


def copy_side_files(tmp: Path, plan: Plan, *, card: str | None, tokenizer: bool) -> None:
    tokenizer_dir = plan.spec.tokenizer_source or plan.spec.base
    built = built_files(plan.resized)  # a vocabulary built from the inputs' (engine.embed_rows)
    for name in SIDE_FILES:
        src = (tokenizer_dir if name in TOKENIZER_FILES else plan.spec.base) / name
        if tokenizer and built is None or name not in TOKENIZER_FILES:
            copy_file(src, tmp / name)  # where there is one (a base at a store URL too)
    if tokenizer:
        for name, data in built or ():
            (tmp / name).write_bytes(data)
        if plan.spec.chat_template is not None:
            set_chat_template(tmp, plan.spec)
    if card is not None:
        write_model_card(tmp, plan.spec, card)
    changes: dict[str, Any] = {}
    written = written_dtype(plan)
    if written is not None:
        changes["dtype"] = written
    grown = [r.out_rows for r in plan.resized if r.out_rows != r.rows[0]]
    if grown:  # --vocab union added rows: the model must know its new vocabulary size
        changes["vocab_size"] = max(grown)
    if plan.spec.slices:  # stacked or cut layers: the model must know its new depth
        changes.update(dict.fromkeys(LAYER_COUNT_KEYS, output_layers(plan.spec.slices)))
    if changes and (tmp / "config.json").is_file():
        _update_config(tmp / "config.json", changes)


def written_dtype(plan: Plan) -> str | None:
    """The torch name of the float dtype most of the output's elements are written in (None
    without float tensors): what config.json must state for transformers to load the merge
    in the dtype it was written in."""
    elements: Counter[str] = Counter()
    for t in plan.tensors:
        if t.out_dtype in TORCH_DTYPE_NAMES:
            elements[t.out_dtype] += t.numel
    return TORCH_DTYPE_NAMES[elements.most_common(1)[0][0]] if elements else None


def _update_config(path: Path, changes: dict[str, Any]) -> None:
    """Set `changes` in a copied config.json; sizes only where the config has that key.

    The dtype goes under every key transformers reads (`dtype` in transformers 5, `torch_dtype`
    in earlier versions), where the config does not already state it under both: a config that says `float32` above
    bfloat16 weights loads them as float32 in transformers 5, twice the memory, without a word.
    """
    try:
        config: Any = json.loads(path.read_text())
    except (ValueError, OSError):
        return  # not ours to repair; copied as is
    if not isinstance(config, dict):
        return
    changes = dict(changes)
    dtype = changes.pop("dtype", None)
    new = {k: v for k, v in changes.items() if k in config and config[k] != v}
    text = config.get("text_config")  # multimodal (LLaVA-style): the language model's own sizes
    if isinstance(text, dict) and any(k in text and text[k] != v for k, v in changes.items()):
        new["text_config"] = text | {k: v for k, v in changes.items() if k in text}
    if dtype is not None and any(config.get(k) != dtype for k in DTYPE_KEYS):
        new.update(dict.fromkeys(DTYPE_KEYS, dtype))
    if new:
        config.update(new)
        path.write_text(json.dumps(config, indent=2) + "\n")


def abort_output(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
