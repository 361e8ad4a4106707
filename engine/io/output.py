"""The output folder's life: a hidden temporary folder beside the target, renamed when complete.

Nothing under the target name ever looks complete unless it is: the merge writes into
`.NAME.leanmerge-tmp` on the same filesystem and only a finished, synced folder is renamed
into place. A run stopped by a signal or an I/O error keeps its temporary folder (with its journal) so that
`--resume` can continue it; a run stopped by a bad input removes it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from engine import __version__
from engine.io.checkpoint import INDEX_NAME
from engine.io.model_card import write_model_card
from engine.plan import Plan
from engine.slices import output_layers

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
)
# Of those, the tokenizer's: copied from the spec's `tokenizer_source` when it names a model.
TOKENIZER_FILES = frozenset(SIDE_FILES) - {"config.json", "generation_config.json"}
# config.json keys that hold the layer count, by architecture family (Llama/Mistral/Qwen, GPT-2, T5-like).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
TORCH_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def temp_dir_for(target: Path) -> Path:
    return target.parent / f".{target.name}.leanmerge-tmp"


def write_side_files(
    tmp: Path, plan: Plan, checksums: dict[str, str], *, card: str | None = None, tokenizer: bool = True
) -> None:
    """The index json (with every tensor's crc32, for `leanmerge verify`), the base's config and
    (with `tokenizer`) tokenizer files, and with a `card` title the model card (engine.io.model_card)."""
    index = {
        "metadata": {
            "total_size": plan.bytes_written,
            "leanmerge": {"version": __version__, "spec_sha256": plan.spec.digest(), "tensor_crc32": checksums},
        },
        "weight_map": {t.name: plan.shards[t.shard].file for t in plan.tensors},
    }
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    tokenizer_dir = plan.spec.tokenizer_source or plan.spec.base
    for name in SIDE_FILES:
        src = (tokenizer_dir if name in TOKENIZER_FILES else plan.spec.base) / name
        if src.is_file() and (tokenizer or name not in TOKENIZER_FILES):
            shutil.copyfile(src, tmp / name)
    if card is not None:
        write_model_card(tmp, plan.spec, card)
    changes: dict[str, Any] = {}
    if plan.spec.out_dtype:
        changes["torch_dtype"] = TORCH_DTYPE_NAMES[plan.spec.out_dtype]
    grown = [r.out_rows for r in plan.resized if r.out_rows != r.rows[0]]
    if grown:  # --vocab union added rows: the model must know its new vocabulary size
        changes["vocab_size"] = max(grown)
    if plan.spec.slices:  # stacked or cut layers: the model must know its new depth
        changes.update(dict.fromkeys(LAYER_COUNT_KEYS, output_layers(plan.spec.slices)))
    if changes and (tmp / "config.json").is_file():
        _update_config(tmp / "config.json", changes)


def _update_config(path: Path, changes: dict[str, Any]) -> None:
    """Set `changes` in a copied config.json; sizes only where the config has that key."""
    try:
        config: Any = json.loads(path.read_text())
    except (ValueError, OSError):
        return  # not ours to repair; copied as is
    if isinstance(config, dict):
        config.update({k: v for k, v in changes.items() if k == "torch_dtype" or k in config})
        path.write_text(json.dumps(config, indent=2) + "\n")


def abort_output(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
