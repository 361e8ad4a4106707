"""mergekit-style YAML configs -> one validated `MergeSpec`; every error names the key and line.

The schema (mergekit's, minus what leanmerge cannot do yet):

```yaml
merge_method: dare_ties            # a method in engine.methods.registry
base_model: ./base                 # optional for linear (the first model is then the template)
models:
  - model: ./math-ft               # a model folder or a PEFT LoRA adapter folder
    parameters: {weight: 0.6, density: [0.2, 0.5, 0.2]}   # a list = gradient over layers
parameters:                        # global: every model's default
  density: 0.3
  t: [{filter: self_attn, value: [0, 1]}, {value: 0.5}]   # filter rules, first match wins
dtype: bfloat16                    # output dtype (out_dtype wins when both are set)
out_dtype: bfloat16
tokenizer_source: base             # or a model folder to copy tokenizer files from, or union (engine.tokens)
vocab: base                        # or union: rows of embedding-like tensors (engine.vocab)
random_seed: 42
mergekit_rounding: false           # true: round as mergekit does (engine.methods.mergekit_rounding)
```

Relative paths are relative to the config file. Parameters known to mergekit but not used by
the chosen method (e.g. `density` for `linear`) and `int8_mask` are ignored with a logged note,
as mergekit does; anything else unknown is an error. `modules` is refused as not supported yet.
`tokenizer_source: union`, the `tokenizer:` block and `chat_template`: engine.tokens.

Instead of `models`, `slices` lists layer ranges (engine.slices):

```yaml
merge_method: passthrough
slices:
  - sources: [{model: ./a, layer_range: [0, 24]}]   # end excluded, as in mergekit
  - sources: [{model: ./b, layer_range: [8, 32]}]
```
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine import config_yaml
from engine.config_yaml import MAX_CONFIG_BYTES, MAX_LIST_ITEMS, MAX_NODES, Map, Seq, load_yaml, only_keys
from engine.defaults import VOCAB_POLICIES
from engine.dtypes import parse_out_dtype
from engine.errors import SpecError
from engine.gradient import Setting
from engine.hub import HubCache, resolve_model
from engine.methods.base import Method
from engine.methods.registry import METHODS
from engine.paths import folder_problem
from engine.slices import Slice, SliceSource
from engine.spec import DEFAULT_SEED, IGNORED_PARAMS, MergeSpec, ModelRef, check_params
from engine.tokens import TokenizerSpec, check_chat_template, parse_tokenizer

log = logging.getLogger(__name__)

__all__ = ["MAX_CONFIG_BYTES", "MAX_LIST_ITEMS", "MAX_NODES", "load_config"]

TOP_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "random_seed",
    "vocab",
    "slices",
    "tokenizer",
    "chat_template",
    "mergekit_rounding",
)
MODEL_KEYS = ("model", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")
# mergekit keys that leanmerge knows and refuses, with why.
UNSUPPORTED_KEYS = {
    "modules": "per-module configs are not supported yet; list whole models under 'models'",
}
# Parameters mergekit's methods take: accepted for any method, ignored (with a note) when unused.
MERGEKIT_PARAMS = frozenset({"weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "t"})


SliceParams = tuple[tuple[dict[str, Setting], ...], ...]  # per slice, each role's own parameters


def load_config(
    path: Path | str,
    overrides: Mapping[str, Any] | None = None,
    *,
    check_paths: bool = True,
    hub: HubCache | None = None,
) -> MergeSpec:
    """Read the mergekit-style YAML file `path` into a `MergeSpec`.

    Args:
        path: the config file; relative model paths are relative to its folder.
        overrides: `MergeSpec` fields from the command line (None values are ignored); they
            win over the file (`method`, `out_dtype`, `seed`, `vocab`).
        check_paths: check that every model folder exists (errors then name the line).
        hub: where a model named by a Hub id (`OWNER/NAME[@REV]`, no such local path) is looked
            up or downloaded to (engine.hub); None: local paths only.
    Returns:
        The validated spec.
    Raises:
        SpecError: one line, `FILE:LINE: what is wrong`, naming the key.
    Example:
        >>> spec = load_config("merge.yaml")  # doctest: +SKIP
    """
    path = Path(path)
    doc = load_yaml(path)
    if not isinstance(doc, Map):
        raise SpecError(f"{path}: a config must be a mapping with merge_method, base_model and models")
    return _Config(path, doc, check_paths, hub).spec({k: v for k, v in (overrides or {}).items() if v is not None})


class _Config:
    """One parse of one file: knows the file name for error messages."""

    def __init__(self, path: Path, doc: Map, check_paths: bool, hub: HubCache | None = None) -> None:
        self.path, self.doc, self.check_paths, self.hub = path, doc, check_paths, hub
        self.root = path.parent

    def error(self, line: int, message: str) -> SpecError:
        return SpecError(f"{self.path}:{line}: {message}")

    def only_keys(self, m: Map, allowed: tuple[str, ...], where: str, context: str = "") -> None:
        """Refuse any key of `m` not in `allowed`, naming its line."""
        only_keys(m, allowed, where, self.error, context)

    def spec(self, overrides: dict[str, Any]) -> MergeSpec:
        doc = self.doc
        for key in doc:
            if key in UNSUPPORTED_KEYS:
                raise self.error(doc.lines[key], f"{key!r}: {UNSUPPORTED_KEYS[key]}")
            if key not in TOP_KEYS:
                raise self.error(doc.lines[key], f"unsupported key {key!r} (supported: {', '.join(TOP_KEYS)})")
        if "merge_method" not in doc:
            raise SpecError(f"{self.path}: missing required key 'merge_method'")
        method = self.method(overrides.pop("method", None))
        slices: tuple[Slice, ...] = ()
        slice_params: SliceParams = ()
        if "slices" in doc:
            if "models" in doc:
                raise self.error(doc.lines["models"], "give either 'models' or 'slices', not both")
            base, models, slices, slice_params = self.sliced(method)
        elif "models" not in doc:
            raise SpecError(f"{self.path}: missing required key 'models' (or 'slices')")
        else:
            base, models = self.listed(method)
        fields: dict[str, Any] = {
            "method": method.name,
            "base": base.path,
            "base_params": base.params,
            "models": tuple(models),
            "params": self.params(doc.get("parameters"), doc.lines.get("parameters", doc.line), "parameters", method),
            "out_dtype": self.out_dtype(),
            "seed": self.seed(),
            "vocab": self.choice("vocab", VOCAB_POLICIES, "base"),
            "tokenizer_source": self.tokenizer_source(),
            "tokenizer": self.tokenizer(),
            "chat_template": self.chat_template(),
            "mergekit_rounding": self.flag("mergekit_rounding"),
            "slices": slices,
            "slice_params": slice_params,
            "base_is_model": method.base_optional and "base_model" not in doc and "slices" not in doc,
        }
        fields.update(overrides)
        try:
            return MergeSpec(**fields)
        except SpecError as e:
            raise SpecError(f"{self.path}: {e}") from None

    def method(self, override: str | None) -> Method:
        value = override if override is not None else self.doc["merge_method"]
        line = self.doc.lines["merge_method"]
        if not isinstance(value, str):
            raise self.error(line, f"'merge_method' must be a method name, got {value!r}")
        if value in METHODS:
            return METHODS[value]
        raise self.error(line, f"unknown merge_method {value!r}; choose one of {', '.join(sorted(METHODS))}")

    def missing_base(self, method: Method) -> SpecError:
        return SpecError(f"{self.path}: missing required key 'base_model' (merge_method {method.name} needs a base)")

    def listed(self, method: Method) -> tuple[ModelRef, list[ModelRef]]:
        """The base and the fine-tuned models of a config with `models`. The base carries its
        own parameters only for passthrough (its one model); other methods do not use them."""
        doc = self.doc
        models = self.models(method)
        if method.name == "passthrough":
            if len(models) != 1:
                raise self.error(doc.lines["models"], "passthrough copies one model: list exactly one under 'models' "
                                 "(or stack layers with 'slices')")  # fmt: skip
            return models[0], []
        if "base_model" in doc:
            base = self.folder(doc["base_model"], doc.lines["base_model"], "base_model")
        elif method.base_optional:  # mergekit's plain form: the first model is the base stream
            return models[0], models[1:]
        elif not method.uses_base:  # the base is only a template: any model will do
            base = models[0].path
        else:
            raise self.missing_base(method)
        if method.uses_base:
            # mergekit lists the base among the models too; it is the base here, not a fine-tune.
            models = [m for m in models if m.path.resolve() != base.resolve()]
        elif method.base_joins and all(m.path.resolve() != base.resolve() for m in models):
            models = [*models, ModelRef(base, {})]  # mergekit adds an unlisted base_model last
        return ModelRef(base, {}), models

    def sliced(self, method: Method) -> tuple[ModelRef, list[ModelRef], tuple[Slice, ...], SliceParams]:
        """The base, the models and the slices of a config with `slices` (engine.slices).

        In each slice the base is the source whose model is `base_model` (for linear: that or the
        first source, as a template; for passthrough: the one source); the models are the other
        sources in order, and the k-th of every slice is model k. A source's own `parameters`
        hold for its slice's tensors, as in mergekit (the base source's only for passthrough,
        whose one source it is): the base and models carry slices[0]'s, and the last value
        returned gives every slice's, base first, where some slice's differ from slices[0]'s.
        """
        doc = self.doc
        raw, line = doc["slices"], doc.lines["slices"]
        if not isinstance(raw, Seq) or not raw:
            raise self.error(line, "'slices' must be a non-empty list of {sources: [{model, layer_range}, ...]}")
        base = self.folder(doc["base_model"], doc.lines["base_model"], "base_model") if "base_model" in doc else None
        if base is None and method.uses_base and method.name != "passthrough":
            raise self.missing_base(method)
        slices: list[Slice] = []
        roles: list[tuple[dict[str, Setting], ...]] = []
        for i, (entry, at) in enumerate(zip(raw, raw.lines)):
            sources = self.slice_sources(entry, at, f"slices[{i}]", method)
            b = self.slice_base(sources, base, method, at, f"slices[{i}]")
            models = [s for j, s in enumerate(sources) if j != b or not method.uses_base]
            if slices and len(models) != len(slices[0].models):
                raise self.error(at, f"slices[{i}] has {len(models)} model source(s) besides the base, slices[0] has "
                                 f"{len(slices[0].models)}: every slice needs a source for each model")  # fmt: skip
            base_own = sources[b][1] if method.name == "passthrough" else {}
            roles.append((base_own, *(params for _, params, _ in models)))
            try:
                slices.append(Slice(sources[b][0], tuple(src for src, _, _ in models)))
            except SpecError as e:
                raise self.error(at, f"slices[{i}]: {e}") from None
        first = roles[0]
        refs = [ModelRef(src.path, params) for src, params in zip(slices[0].models, first[1:])]
        per_slice = tuple(roles) if any(r != first for r in roles) else ()
        return ModelRef(base or slices[0].base.path, first[0]), refs, tuple(slices), per_slice

    def slice_sources(
        self, entry: Any, line: int, where: str, method: Method
    ) -> list[tuple[SliceSource, dict[str, Setting], int]]:
        if not isinstance(entry, Map) or "sources" not in entry:
            raise self.error(line, f"{where} must be a mapping with 'sources'")
        self.only_keys(entry, ("sources",), where)
        raw, at = entry["sources"], entry.lines["sources"]
        if not isinstance(raw, Seq) or not raw:
            raise self.error(at, f"{where}.sources must be a non-empty list of {{model, layer_range}}")
        out = []
        for j, (src, src_line) in enumerate(zip(raw, raw.lines)):
            here = f"{where}.sources[{j}]"
            if not isinstance(src, Map) or "model" not in src or "layer_range" not in src:
                raise self.error(src_line, f"{here} must be a mapping with 'model' and 'layer_range'")
            self.only_keys(src, SOURCE_KEYS, here)
            folder = self.folder(src["model"], src.lines["model"], f"{here}.model")
            start, end = self.layer_range(src["layer_range"], src.lines["layer_range"], f"{here}.layer_range")
            params_line = src.lines.get("parameters", src_line)
            params = self.params(src.get("parameters"), params_line, f"{here}.parameters", method, per_model=True)
            out.append((SliceSource(folder, start, end), params, params_line))
        return out

    def slice_base(
        self, sources: list[tuple[SliceSource, dict[str, Setting], int]], base: Path | None, method: Method,
        line: int, where: str,
    ) -> int:  # fmt: skip
        """Which source of a slice plays the base."""
        if method.name == "passthrough":
            if len(sources) != 1:
                raise self.error(line, f"{where}: passthrough takes one source per slice, got {len(sources)}")
            return 0
        matches = [j for j, (s, _, _) in enumerate(sources) if base is not None and s.path.resolve() == base.resolve()]
        if len(matches) > 1:
            raise self.error(line, f"{where}: base_model is listed {len(matches)} times; list it once per slice")
        if matches:
            return matches[0]
        if not method.uses_base:
            return 0
        raise self.error(line, f"{where}: no source is base_model {base}; every slice needs the base's layer_range")

    def layer_range(self, value: Any, line: int, where: str) -> tuple[int, int]:
        ok = (
            isinstance(value, Seq)
            and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        )
        if not ok or not 0 <= value[0] < value[1]:
            raise self.error(line, f"{where} must be [start, end] with 0 <= start < end (end excluded), got {value!r}")
        return value[0], value[1]

    def models(self, method: Method) -> list[ModelRef]:
        entries, line = self.doc["models"], self.doc.lines["models"]
        if not isinstance(entries, Seq) or not entries:
            raise self.error(line, "'models' must be a non-empty list of {model: PATH, parameters: {...}}")
        refs = []
        for i, (entry, item_line) in enumerate(zip(entries, entries.lines)):
            where = f"models[{i}]"
            if not isinstance(entry, Map) or "model" not in entry:
                raise self.error(item_line, f"{where} must be a mapping with a 'model' key")
            self.only_keys(entry, MODEL_KEYS, where)
            folder = self.folder(entry["model"], entry.lines["model"], f"{where}.model")
            params_line = entry.lines.get("parameters", item_line)
            params = self.params(entry.get("parameters"), params_line, f"{where}.parameters", method, per_model=True)
            refs.append(ModelRef(folder, params))
        return refs

    def folder(self, value: Any, line: int, key: str) -> Path:
        """A model folder named by `key`, relative to the config file, or a Hub id (engine.hub)."""
        if not isinstance(value, str) or not value.strip():
            raise self.error(line, f"{key!r} must be a folder path, got {value!r}")
        try:
            p = resolve_model(value, self.root, self.hub)
        except SpecError as e:
            raise self.error(line, f"{key}: {e}") from None
        if self.check_paths and folder_problem(p, value) is not None:  # None: a folder or a store URL
            if "+" in value and not p.exists():
                raise self.error(
                    line, f"{key}: {value!r}: mergekit's MODEL+LORA form is not supported; give the adapter folder"
                )
            raise self.error(line, f"{key}: {folder_problem(p, value)}")
        return p

    def params(
        self, value: Any, line: int, where: str, method: Method, *, per_model: bool = False
    ) -> dict[str, Setting]:
        """A `parameters` mapping: each value a number, bool, string, gradient or filter rules."""
        if value is None:
            return {}
        if not isinstance(value, Map):
            raise self.error(line, f"{where} must be a mapping of name: value")
        known = MERGEKIT_PARAMS | {d.name for m in METHODS.values() for d in m.params}
        out: dict[str, Setting] = {}
        for name, raw in value.items():
            at = value.lines[name]
            if name in IGNORED_PARAMS:
                log.info("%s:%d: %s.%s is accepted for mergekit compatibility and ignored", self.path, at, where, name)
                continue
            if method.param(name) is None:
                if name not in known:
                    raise self.error(
                        at, f"{where}: unknown parameter {name!r} (parameters of {method.name}: "
                        f"{', '.join(d.name for d in method.params) or 'none'})"
                    )  # fmt: skip
                log.warning("%s:%d: %s.%s is not used by %s; ignored", self.path, at, where, name, method.name)
                continue
            setting = config_yaml.setting(raw, at, f"{where}.{name}", self.error)
            check_params(method, {name: setting}, f"{self.path}:{at}: {where}", per_model=per_model)
            out[name] = setting
        return out

    def out_dtype(self) -> str | None:
        for key in ("out_dtype", "dtype"):
            if key in self.doc:
                value = self.doc[key]
                try:
                    return parse_out_dtype(value) if isinstance(value, str) else parse_out_dtype(repr(value))
                except SpecError as e:
                    raise self.error(self.doc.lines[key], f"{key}: {e}") from None
        return None

    def seed(self) -> int:
        if "random_seed" not in self.doc:
            return DEFAULT_SEED
        value = self.doc["random_seed"]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
            raise self.error(
                self.doc.lines["random_seed"], f"random_seed must be an integer in [0, 2**63), got {value!r}"
            )
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.doc.get(key, default)
        if value not in choices:
            raise self.error(self.doc.lines[key], f"{key} must be one of {', '.join(choices)}, got {value!r}")
        return str(value)

    def tokenizer_source(self) -> Path | None:
        if "tokenizer_source" not in self.doc:
            return None
        value, line = self.doc["tokenizer_source"], self.doc.lines["tokenizer_source"]
        if value == "base":
            return None
        if value == "union":
            return None  # a built vocabulary: self.tokenizer()
        return self.folder(value, line, "tokenizer_source")

    def tokenizer(self) -> TokenizerSpec | None:
        """`tokenizer_source: union` or the `tokenizer:` block (engine.tokens); not both, as in mergekit."""
        doc = self.doc
        if "tokenizer" in doc and "tokenizer_source" in doc:
            raise self.error(doc.lines["tokenizer"], "give either 'tokenizer_source' or 'tokenizer', not both")
        if doc.get("tokenizer_source") == "union":
            return TokenizerSpec("union")
        if "tokenizer" not in doc:
            return None
        return parse_tokenizer(doc["tokenizer"], doc.lines["tokenizer"], self.folder, self.error)

    def flag(self, key: str) -> bool:
        value = self.doc.get(key, False)
        if not isinstance(value, bool):
            raise self.error(self.doc.lines[key], f"{key} must be true or false, got {value!r}")
        if value and key == "mergekit_rounding" and "dtype" in self.doc and "out_dtype" in self.doc:
            # mergekit computes in `dtype` and writes `out_dtype`; this rounds to the one dtype written.
            raise self.error(
                self.doc.lines[key], "mergekit_rounding rounds to one dtype: give 'dtype' or 'out_dtype', not both"
            )
        return value

    def chat_template(self) -> str | None:
        if "chat_template" not in self.doc:
            return None
        value = self.doc["chat_template"]
        problem = check_chat_template(value)
        if problem:
            raise self.error(self.doc.lines["chat_template"], f"chat_template {problem}")
        return str(value)
