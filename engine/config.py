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
tokenizer_source: base             # or a model folder to copy tokenizer files from
vocab: base                        # or union: rows of embedding-like tensors (engine.vocab)
random_seed: 42
```

Relative paths are relative to the config file. Parameters known to mergekit but not used by
the chosen method (e.g. `density` for `linear`) and `int8_mask` are ignored with a logged note,
as mergekit does; anything else unknown is an error. `slices`, `modules`, `tokenizer` and
`chat_template` are refused as not supported yet.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from engine.dtypes import parse_out_dtype
from engine.errors import SpecError
from engine.gradient import Filtered, Gradient, Rule, Setting
from engine.methods.base import Method
from engine.methods.registry import METHODS
from engine.spec import DEFAULT_SEED, IGNORED_PARAMS, VOCAB_POLICIES, MergeSpec, ModelRef, check_params

log = logging.getLogger(__name__)

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
)
MODEL_KEYS = ("model", "parameters")
# mergekit keys that leanmerge knows and refuses, with why.
UNSUPPORTED_KEYS = {
    "slices": "slices (frankenmerges, layer stacking) are not supported yet; list whole models under 'models'",
    "modules": "per-module configs are not supported yet; list whole models under 'models'",
    "tokenizer": "the 'tokenizer' block (built vocabularies, embedding sources) is not supported yet; "
    "use 'tokenizer_source: base' or a model folder, and 'vocab: base' or 'vocab: union'",
    "chat_template": "'chat_template' is not supported yet; copy chat_template.jinja into the output folder",
}
# mergekit methods without an implementation here yet.
MERGEKIT_ONLY_METHODS = ("passthrough", "nuslerp", "multislerp", "karcher", "sce", "nearswap", "arcee_fusion")
# Parameters mergekit's methods take: accepted for any method, ignored (with a note) when unused.
MERGEKIT_PARAMS = frozenset({"weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "t"})
# Methods for which the base is only a template (names, shapes): it is averaged in only if
# listed among the models, and without a base_model the first model serves as the template.
TEMPLATE_BASE_METHODS = frozenset({"linear"})


class _Map(dict[str, Any]):
    """A YAML mapping that remembers the line of each key (1-based)."""

    line: int
    lines: dict[str, int]


class _Seq(list[Any]):
    """A YAML sequence that remembers the line of each item (1-based)."""

    line: int
    lines: list[int]


class _LineError(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings and sequences carry line numbers; duplicate keys are errors."""


def _construct_map(loader: yaml.SafeLoader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    out = _Map()
    out.line, out.lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            raise _LineError(line, f"key {key!r} must be a string")
        if key in out:
            raise _LineError(line, f"duplicate key {key!r} (first on line {out.lines[key]})")
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = line
    return out


def _construct_seq(loader: yaml.SafeLoader, node: yaml.SequenceNode) -> _Seq:
    out = _Seq(loader.construct_object(child, deep=True) for child in node.value)
    out.line, out.lines = node.start_mark.line + 1, [child.start_mark.line + 1 for child in node.value]
    return out


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def load_config(path: Path | str, overrides: Mapping[str, Any] | None = None, *, check_paths: bool = True) -> MergeSpec:
    """Read the mergekit-style YAML file `path` into a `MergeSpec`.

    Args:
        path: the config file; relative model paths are relative to its folder.
        overrides: `MergeSpec` fields from the command line (None values are ignored); they
            win over the file (`method`, `out_dtype`, `seed`, `vocab`).
        check_paths: check that every model folder exists (errors then name the line).
    Returns:
        The validated spec.
    Raises:
        SpecError: one line, `FILE:LINE: what is wrong`, naming the key.
    Example:
        >>> spec = load_config("merge.yaml")  # doctest: +SKIP
    """
    path = Path(path)
    try:
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_LineLoader)  # a SafeLoader subclass
    except OSError as e:
        raise SpecError(f"{path}: cannot read config: {e.strerror}") from None
    except _LineError as e:
        raise SpecError(f"{path}:{e.line}: {e}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(doc, _Map):
        raise SpecError(f"{path}: a config must be a mapping with merge_method, base_model and models")
    return _Config(path, doc, check_paths).spec({k: v for k, v in (overrides or {}).items() if v is not None})


class _Config:
    """One parse of one file: knows the file name for error messages."""

    def __init__(self, path: Path, doc: _Map, check_paths: bool) -> None:
        self.path, self.doc, self.check_paths = path, doc, check_paths
        self.root = path.parent

    def error(self, line: int, message: str) -> SpecError:
        return SpecError(f"{self.path}:{line}: {message}")

    def spec(self, overrides: dict[str, Any]) -> MergeSpec:
        doc = self.doc
        for key in doc:
            if key in UNSUPPORTED_KEYS:
                raise self.error(doc.lines[key], f"{key!r}: {UNSUPPORTED_KEYS[key]}")
            if key not in TOP_KEYS:
                raise self.error(doc.lines[key], f"unsupported key {key!r} (supported: {', '.join(TOP_KEYS)})")
        for key in ("merge_method", "models"):
            if key not in doc:
                raise SpecError(f"{self.path}: missing required key {key!r}")
        method = self.method(overrides.pop("method", None))
        models = self.models(method)
        if "base_model" in doc:
            base = self.folder(doc["base_model"], doc.lines["base_model"], "base_model")
        elif method.name in TEMPLATE_BASE_METHODS and models:
            base = models[0].path
        else:
            raise SpecError(f"{self.path}: missing required key 'base_model' (merge_method {method.name} needs a base)")
        if method.name not in TEMPLATE_BASE_METHODS:
            # mergekit lists the base among the models too; it is the base here, not a fine-tune.
            models = [m for m in models if m.path.resolve() != base.resolve()]
        fields: dict[str, Any] = {
            "method": method.name,
            "base": base,
            "models": tuple(models),
            "params": self.params(doc.get("parameters"), doc.lines.get("parameters", doc.line), "parameters", method),
            "out_dtype": self.out_dtype(),
            "seed": self.seed(),
            "vocab": self.choice("vocab", VOCAB_POLICIES, "base"),
            "tokenizer_source": self.tokenizer_source(),
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
        if value in MERGEKIT_ONLY_METHODS:
            raise self.error(
                line, f"merge_method {value!r} is not supported yet (supported: {', '.join(sorted(METHODS))})"
            )
        raise self.error(line, f"unknown merge_method {value!r}; choose one of {', '.join(sorted(METHODS))}")

    def models(self, method: Method) -> list[ModelRef]:
        entries, line = self.doc["models"], self.doc.lines["models"]
        if not isinstance(entries, _Seq) or not entries:
            raise self.error(line, "'models' must be a non-empty list of {model: PATH, parameters: {...}}")
        refs = []
        for i, (entry, item_line) in enumerate(zip(entries, entries.lines)):
            where = f"models[{i}]"
            if not isinstance(entry, _Map) or "model" not in entry:
                raise self.error(item_line, f"{where} must be a mapping with a 'model' key")
            for key in entry:
                if key not in MODEL_KEYS:
                    raise self.error(
                        entry.lines[key], f"{where}: unsupported key {key!r} (supported: {', '.join(MODEL_KEYS)})"
                    )
            folder = self.folder(entry["model"], entry.lines["model"], f"{where}.model")
            params_line = entry.lines.get("parameters", item_line)
            params = self.params(entry.get("parameters"), params_line, f"{where}.parameters", method, per_model=True)
            refs.append(ModelRef(folder, params))
        return refs

    def folder(self, value: Any, line: int, key: str) -> Path:
        """A model folder named by `key`, relative to the config file."""
        if not isinstance(value, str) or not value.strip():
            raise self.error(line, f"{key!r} must be a folder path, got {value!r}")
        p = Path(value).expanduser()
        p = p if p.is_absolute() else self.root / p
        if self.check_paths and not p.is_dir():
            if "+" in value and not p.exists():
                raise self.error(
                    line, f"{key}: {value!r}: mergekit's MODEL+LORA form is not supported; give the adapter folder"
                )
            what = "is a file, not a model folder" if p.exists() else "does not exist"
            hub = "" if p.exists() else " (leanmerge reads local folders: download Hub models first)"
            raise self.error(line, f"{key}: {p} {what}{hub}")
        return p

    def params(
        self, value: Any, line: int, where: str, method: Method, *, per_model: bool = False
    ) -> dict[str, Setting]:
        """A `parameters` mapping: each value a number, bool, string, gradient or filter rules."""
        if value is None:
            return {}
        if not isinstance(value, _Map):
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
            setting = self.setting(raw, at, f"{where}.{name}")
            check_params(method, {name: setting}, f"{self.path}:{at}: {where}", per_model=per_model)
            out[name] = setting
        return out

    def setting(self, raw: Any, line: int, where: str) -> Setting:
        """A plain value, a gradient (list of numbers) or filter rules (list of {filter, value})."""
        if isinstance(raw, (bool, int, float, str)):
            return raw
        if isinstance(raw, _Map):
            return Filtered((self.rule(raw, line, where),))
        if isinstance(raw, _Seq) and raw:
            if all(_is_number(v) for v in raw):
                return Gradient(tuple(float(v) for v in raw))
            if all(isinstance(v, _Map) for v in raw):
                return Filtered(
                    tuple(self.rule(v, at, f"{where}[{i}]") for i, (v, at) in enumerate(zip(raw, raw.lines)))
                )
            raise self.error(line, f"{where}: a list must be all numbers (a gradient) or all {{filter, value}} rules")
        raise self.error(line, f"{where}: expected a number, true/false, a string or a gradient list, got {raw!r}")

    def rule(self, raw: _Map, line: int, where: str) -> Rule:
        for key in raw:
            if key not in ("filter", "value"):
                raise self.error(
                    raw.lines[key], f"{where}: unsupported key {key!r} in a rule (supported: filter, value)"
                )
        if "value" not in raw:
            raise self.error(line, f"{where}: a rule needs a 'value'")
        filt, value, at = raw.get("filter"), raw["value"], raw.lines["value"]
        if filt is not None and not isinstance(filt, str):
            raise self.error(raw.lines["filter"], f"{where}.filter must be a string, got {filt!r}")
        if isinstance(value, _Seq) and value and all(_is_number(v) for v in value):
            return Rule(filt, Gradient(tuple(float(v) for v in value)))
        if isinstance(value, (bool, int, float, str)):
            return Rule(filt, value)
        raise self.error(
            at, f"{where}.value: expected a number, true/false, a string or a gradient list, got {value!r}"
        )

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
            raise self.error(
                line, "tokenizer_source 'union' (a merged vocabulary) is not supported yet; use 'vocab: union' and "
                "name the model whose tokenizer to copy"
            )  # fmt: skip
        return self.folder(value, line, "tokenizer_source")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
