"""The merge description: CLI flags or a YAML file -> one frozen, validated `MergeSpec`.

Parameter precedence follows mergekit: a model's own `parameters` > the global `parameters` >
the method's default. Unknown keys are errors, never silently ignored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from engine.dtypes import parse_out_dtype
from engine.errors import SpecError
from engine.methods.base import Method, ParamValue, TensorParams
from engine.methods.registry import get_method

DEFAULT_SEED = 0
# Accepted in YAML for mergekit compatibility and ignored: they do not change our results.
IGNORED_PARAMS = frozenset({"int8_mask"})


@dataclass(frozen=True)
class ModelRef:
    """One fine-tuned model and the parameters it sets for itself."""

    path: Path
    params: Mapping[str, ParamValue]


@dataclass(frozen=True)
class MergeSpec:
    """Everything that decides the output bytes (and nothing that does not, like the budget)."""

    method: str
    base: Path
    models: tuple[ModelRef, ...]
    params: Mapping[str, ParamValue]
    out_dtype: str | None = None
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        method = get_method(self.method)
        if len(self.models) < method.min_models:
            raise SpecError(
                f"method {self.method!r} needs at least {method.min_models} model(s), got {len(self.models)}"
            )
        if method.max_models is not None and len(self.models) > method.max_models:
            raise SpecError(
                f"method {self.method!r} takes at most {method.max_models} model(s) besides the base, got {len(self.models)}"
            )
        _check_params(method, self.params, "parameters", per_model=False)
        for m in self.models:
            _check_params(method, m.params, f"parameters of model {str(m.path)!r}", per_model=True)
        method.validate(self.tensor_params())
        if self.out_dtype is not None:
            object.__setattr__(self, "out_dtype", parse_out_dtype(self.out_dtype))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise SpecError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")

    @property
    def method_impl(self) -> Method:
        return get_method(self.method)

    def tensor_params(self) -> TensorParams:
        """Parameters resolved with model > global > default precedence."""
        method = self.method_impl
        globals_ = {d.name: self.params.get(d.name, d.default) for d in method.params if not d.per_model}
        models = tuple(
            {d.name: m.params.get(d.name, self.params.get(d.name, d.default)) for d in method.params if d.per_model}
            for m in self.models
        )
        return TensorParams(globals_, models)

    def to_json(self) -> dict[str, Any]:
        """A canonical, JSON-ready form: recorded in the output and hashed for resume."""
        return {
            "method": self.method,
            "base": str(self.base),
            "models": [{"path": str(m.path), "params": dict(sorted(m.params.items()))} for m in self.models],
            "params": dict(sorted(self.params.items())),
            "out_dtype": self.out_dtype,
            "seed": self.seed,
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()


def _check_params(method: Method, params: Mapping[str, ParamValue], where: str, *, per_model: bool) -> None:
    for name, value in params.items():
        d = method.param(name)
        if d is None:
            known = ", ".join(p.name for p in method.params)
            raise SpecError(f"{where}: {name!r} is not a parameter of {method.name} (known: {known})")
        if per_model and not d.per_model:
            raise SpecError(
                f"{where}: {name!r} is a global parameter of {method.name}; set it under top-level parameters"
            )
        if isinstance(d.default, bool) and not isinstance(value, bool):
            raise SpecError(f"{where}: {name!r} must be true or false, got {value!r}")
        if isinstance(d.default, str) and not isinstance(value, str):
            raise SpecError(f"{where}: {name!r} must be a string, got {value!r}")
        if not isinstance(d.default, (bool, str)) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise SpecError(f"{where}: {name!r} must be a number, got {value!r}")
        problem = d.check(value)
        if problem:
            raise SpecError(f"{where}: {name!r} {problem}")


def parse_model_arg(arg: str) -> ModelRef:
    """`DIR` or `DIR:WEIGHT` from the command line."""
    path, sep, weight = arg.rpartition(":")
    if sep and path:
        try:
            return ModelRef(Path(path), {"weight": float(weight)})
        except ValueError:
            pass  # a ':' that is part of the path
    return ModelRef(Path(arg), {})


SPEC_KEYS = frozenset({"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "random_seed"})
MODEL_KEYS = frozenset({"model", "parameters"})


def load_yaml_spec(path: Path, overrides: Mapping[str, Any] | None = None) -> MergeSpec:
    """Read a mergekit-style YAML file into a `MergeSpec`; relative model paths are relative to it.

    Raises:
        SpecError: naming the file and the offending key.
    """
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SpecError(f"{path}: cannot read config: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise SpecError(f"{path}: a config must be a mapping with merge_method, base_model, models")
    unknown = sorted(set(doc) - SPEC_KEYS)
    if unknown:
        raise SpecError(f"{path}: unsupported key {unknown[0]!r} (supported: {', '.join(sorted(SPEC_KEYS))})")
    for key in ("merge_method", "base_model", "models"):
        if key not in doc:
            raise SpecError(f"{path}: missing required key {key!r}")
    root = path.parent
    models = doc["models"]
    if not isinstance(models, list):
        raise SpecError(f"{path}: 'models' must be a list of {{model: PATH, parameters: {{...}}}}")
    refs = tuple(_yaml_model(path, root, i, m) for i, m in enumerate(models))
    params = _yaml_params(path, doc.get("parameters"), "parameters")
    base = Path(str(doc["base_model"]))
    # mergekit lists the base among the models too; it is the base here, not a fine-tune.
    base = base if base.is_absolute() else root / base
    refs = tuple(r for r in refs if r.path != base)
    fields: dict[str, Any] = {
        "method": str(doc["merge_method"]),
        "base": base,
        "models": refs,
        "params": params,
        "out_dtype": doc.get("out_dtype", doc.get("dtype")),
        "seed": doc.get("random_seed", DEFAULT_SEED),
    }
    fields.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return MergeSpec(**fields)


def _yaml_model(path: Path, root: Path, i: int, entry: Any) -> ModelRef:
    if not isinstance(entry, dict) or "model" not in entry:
        raise SpecError(f"{path}: models[{i}] must be a mapping with a 'model' key")
    unknown = sorted(set(entry) - MODEL_KEYS)
    if unknown:
        raise SpecError(f"{path}: models[{i}]: unsupported key {unknown[0]!r} (supported: model, parameters)")
    p = Path(str(entry["model"]))
    return ModelRef(
        p if p.is_absolute() else root / p, _yaml_params(path, entry.get("parameters"), f"models[{i}].parameters")
    )


def _yaml_params(path: Path, params: Any, where: str) -> dict[str, ParamValue]:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise SpecError(f"{path}: {where} must be a mapping of name: value")
    return {str(k): v for k, v in params.items() if k not in IGNORED_PARAMS}


def cli_spec(
    method: str,
    base: Path,
    models: Sequence[str],
    params: Mapping[str, ParamValue],
    out_dtype: str | None,
    seed: int | None,
) -> MergeSpec:
    """Build a spec from command-line flags; per-model `DIR:WEIGHT` sets that model's weight."""
    return MergeSpec(
        method=method,
        base=base,
        models=tuple(parse_model_arg(m) for m in models),
        params=dict(params),
        out_dtype=out_dtype,
        seed=DEFAULT_SEED if seed is None else seed,
    )
