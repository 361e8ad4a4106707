"""The merge description: CLI flags or a YAML file -> one frozen, validated `MergeSpec`.

Parameter precedence follows mergekit: a model's own `parameters` > the global `parameters` >
the method's default. Unknown keys are errors, never silently ignored.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.defaults import VOCAB_POLICIES
from engine.dtypes import parse_out_dtype
from engine.errors import SpecError
from engine.gradient import Setting, knots, position, resolve, varies
from engine.gradient import to_json as setting_json
from engine.gradient import values as setting_values
from engine.methods.base import Method, ParamValue, TensorParams
from engine.methods.mergekit_rounding import rounded
from engine.methods.registry import get_method
from engine.paths import real_path, split_model_arg
from engine.slices import Slice, check_slices, locate, slices_json
from engine.tokens import TokenizerSpec

DEFAULT_SEED = 0
# Accepted in YAML for mergekit compatibility and ignored: they do not change our results.
IGNORED_PARAMS = frozenset({"int8_mask"})


@dataclass(frozen=True)
class ModelRef:
    """One fine-tuned model and the parameters it sets for itself (`path` may be a `str`)."""

    path: Path
    params: Mapping[str, Setting]

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", real_path(self.path))


@dataclass(frozen=True)
class MergeSpec:
    """Everything that decides the output bytes (and nothing that does not, like the budget)."""

    method: str
    base: Path
    models: tuple[ModelRef, ...]
    params: Mapping[str, Setting]  # a value, a gradient over layers or filter rules (engine.gradient)
    out_dtype: str | None = None
    seed: int = DEFAULT_SEED
    vocab: str = "base"  # rows of embedding-like tensors: the base's, or the union of all models'
    tokenizer_source: Path | None = None  # copy tokenizer files from here instead of the base
    # Layer slices (engine.slices): the inputs are then views of these layer ranges, and `base`
    # and each model's `path` only name the folders that config and tokenizer files come from.
    slices: tuple[Slice, ...] = ()
    # Per-model parameters set on the base's own entry: passthrough's one model (its `scale`).
    base_params: Mapping[str, Setting] = field(default_factory=dict)
    # Per slice, each role's own parameters (base first) where some slice's sources set other
    # parameters than slices[0]'s; () when `base_params` and each model's `params` hold throughout.
    slice_params: tuple[tuple[Mapping[str, Setting], ...], ...] = ()
    # A vocabulary built from the inputs' tokenizers (`tokenizer_source: union`, the `tokenizer:`
    # block) and the chat template to set (engine.tokens).
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None
    # Compute as mergekit does, rounding inputs and intermediates to the dtype
    # (engine.methods.mergekit_rounding), instead of rounding once on write.
    mergekit_rounding: bool = False
    # A `base_optional` method given no base_model: `base` is the first listed model (its own
    # parameters in `base_params`) and takes part as one, not as an origin of deltas.
    base_is_model: bool = False

    def __post_init__(self) -> None:
        self._normalize()
        method = get_method(self.method)
        if self.slices:
            check_slices(self.slices, len(self.models))
        if len(self.models) < method.min_models:
            raise SpecError(
                f"method {self.method!r} needs at least {method.min_models} model(s), got {len(self.models)}"
            )
        if method.max_models is not None and len(self.models) > method.max_models:
            raise SpecError(
                f"method {self.method!r} takes at most {method.max_models} model(s) besides the base, got {len(self.models)}"
            )
        if self.base_is_model and not method.base_optional:
            raise SpecError(f"method {self.method!r} needs a base model (base_is_model is for nuslerp, multislerp)")
        check_params(method, self.params, "parameters", per_model=False)
        check_params(method, self.base_params, f"parameters of model {str(self.base)!r}", per_model=True)
        for m in self.models:
            check_params(method, m.params, f"parameters of model {str(m.path)!r}", per_model=True)
        if self.slice_params and [len(p) for p in self.slice_params] != [1 + len(self.models)] * len(self.slices):
            raise SpecError("slice_params must give the base's and each model's parameters for every slice")
        for i, roles in enumerate(self.slice_params):
            for r, p in enumerate(roles):
                check_params(
                    method, p, f"parameters of slices[{i}] source {self.slices[i].role(r).path}", per_model=True
                )
        for own in self.slice_params or (None,):
            for t in sorted(set().union(*(knots(s) for s in self._settings()))) or [0.0]:
                method.validate(self._resolve(None, t, roles=own))
        if self.vocab not in VOCAB_POLICIES:
            raise SpecError(f"vocab must be one of {', '.join(VOCAB_POLICIES)}, got {self.vocab!r}")
        if self.out_dtype is not None:
            object.__setattr__(self, "out_dtype", parse_out_dtype(self.out_dtype))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise SpecError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.mergekit_rounding:
            rounded(method, self.out_dtype)  # a method and dtype it covers

    def _normalize(self) -> None:
        """Accept `str` paths and lists, as a Python caller writes them; every folder becomes its
        real path (`real_path`), so the digest does not depend on how it was typed."""
        models = tuple(m if isinstance(m, ModelRef) else ModelRef(m, {}) for m in self.models)
        object.__setattr__(self, "models", models)
        object.__setattr__(self, "base", real_path(self.base))
        object.__setattr__(self, "slices", tuple(self.slices))
        object.__setattr__(self, "params", dict(self.params))
        if self.tokenizer_source is not None:
            object.__setattr__(self, "tokenizer_source", real_path(self.tokenizer_source))

    @property
    def method_impl(self) -> Method:
        method = get_method(self.method)
        return rounded(method, self.out_dtype) if self.mergekit_rounding else method

    def tensor_params(self, name: str | None = None, n_layers: int = 0, sources: Sequence[str] = ()) -> TensorParams:
        """Parameters for tensor `name` of a model with `n_layers` numbered layers, resolved
        with model > global > default precedence; gradients and filter rules are evaluated for
        that tensor (`engine.gradient`). Without a name: the values at layer position 0.

        `sources` names the tensor each input reads for `name` (base first), where slices move
        layers: as in mergekit, per-model parameters (and their global fallbacks) match filters
        against the input's own tensor name, the method's global parameters against `name`.
        """
        if not self.slices:
            return self._resolve(name, position(name, n_layers), tuple(sources))
        k, t = locate(name, self.slices)
        return self._resolve(name, t, tuple(sources), self.slice_params[k] if self.slice_params else None)

    @property
    def varies_by_tensor(self) -> bool:
        """True when some parameter is a gradient or has filter rules, or slices set their own."""
        return bool(self.slice_params) or any(varies(s) for s in self._settings())

    def _settings(self) -> list[Setting]:
        roles = [self.base_params, *(m.params for m in self.models), *(p for ps in self.slice_params for p in ps)]
        return [*self.params.values(), *(s for p in roles for s in p.values())]

    def _resolve(
        self,
        name: str | None,
        t: float,
        sources: tuple[str, ...] = (),
        roles: Sequence[Mapping[str, Setting]] | None = None,
    ) -> TensorParams:
        """The parameters at position `t`; `roles`: each input's own settings (base first),
        by default `base_params` and each model's `params`."""

        def pick(at: str | None, *settings: Setting | None, default: ParamValue) -> ParamValue:
            for s in settings:
                v = None if s is None else resolve(s, at, t)
                if v is not None:
                    return v
            return default

        def own(role: int, params: Mapping[str, Setting]) -> dict[str, ParamValue]:
            """Role `role`'s per-model parameters, its filters matched against its input's tensor."""
            at = sources[role] if sources else name
            return {d.name: pick(at, params.get(d.name), self.params.get(d.name), default=d.default) for d in per_model}

        method = self.method_impl
        per_model = [d for d in method.params if d.per_model]
        globals_ = {
            d.name: pick(name, self.params.get(d.name), default=d.default) for d in method.params if not d.per_model
        }
        roles = roles if roles is not None else (self.base_params, *(m.params for m in self.models))
        models = tuple(own(r, roles[r]) for r in range(1, len(roles)))
        return TensorParams(globals_, models, own(0, roles[0]), self.base_is_model)

    def to_json(self) -> dict[str, Any]:
        """A canonical, JSON-ready form: recorded in the output and hashed for resume."""
        return {
            "method": self.method,
            "base": str(self.base),
            "models": [
                {"path": str(m.path), "params": {k: setting_json(v) for k, v in sorted(m.params.items())}}
                for m in self.models
            ],
            "params": {k: setting_json(v) for k, v in sorted(self.params.items())},
            "out_dtype": self.out_dtype,
            "seed": self.seed,
            # Only when set, so that digests of specs without them stay what they were.
            **({"vocab": self.vocab} if self.vocab != "base" else {}),
            **({"tokenizer_source": str(self.tokenizer_source)} if self.tokenizer_source is not None else {}),
            **({"slices": slices_json(self.slices)} if self.slices else {}),
            **({"tokenizer": self.tokenizer.to_json()} if self.tokenizer is not None else {}),
            **({"chat_template": self.chat_template} if self.chat_template is not None else {}),
            **({"mergekit_rounding": True} if self.mergekit_rounding else {}),
            **({"base_params": _params_json(self.base_params)} if self.base_params else {}),
            **({"base_is_model": True} if self.base_is_model else {}),
            **(
                {"slice_params": [[_params_json(p) for p in ps] for ps in self.slice_params]}
                if self.slice_params
                else {}
            ),
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()


def _params_json(params: Mapping[str, Setting]) -> dict[str, object]:
    return {k: setting_json(v) for k, v in sorted(params.items())}


def check_params(method: Method, params: Mapping[str, Setting], where: str, *, per_model: bool) -> None:
    for name, setting in params.items():
        for value in setting_values(setting):
            _check_param(method, name, value, where, per_model=per_model)


def _check_param(method: Method, name: str, value: ParamValue, where: str, *, per_model: bool) -> None:
    """Check one value of a setting (a plain value, a gradient knot, a filter rule's value)."""
    d = method.param(name)
    if d is None:
        known = ", ".join(p.name for p in method.params)
        raise SpecError(f"{where}: {name!r} is not a parameter of {method.name} (known: {known})")
    if per_model and not d.per_model:
        raise SpecError(f"{where}: {name!r} is a global parameter of {method.name}; set it under top-level parameters")
    if isinstance(d.default, bool) and not isinstance(value, bool):
        raise SpecError(f"{where}: {name!r} must be true or false, got {value!r}")
    if isinstance(d.default, str) and not isinstance(value, str):
        raise SpecError(f"{where}: {name!r} must be a string, got {value!r}")
    if not isinstance(d.default, (bool, str)) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise SpecError(f"{where}: {name!r} must be a number, got {value!r}")
    problem = d.check(value)
    if problem is None and isinstance(value, float) and not math.isfinite(value):
        problem = f"must be a finite number, got {value}"  # NaN or inf would poison every output tensor
    if problem:
        raise SpecError(f"{where}: {name!r} {problem}")


def parse_model_arg(arg: str) -> ModelRef:
    """`DIR` or `DIR:WEIGHT` from the command line."""
    path, weight = split_model_arg(arg)
    return ModelRef(Path(path), {} if weight is None else {"weight": weight})


def load_yaml_spec(path: Path, overrides: Mapping[str, Any] | None = None) -> MergeSpec:
    """Read a mergekit-style YAML file into a `MergeSpec` (schema and errors: `engine.config`).

    Model folders are not checked here (opening them is); `engine.config.load_config` checks
    them too, so that a bad path is reported with its line.
    """
    from engine.config import load_config  # engine.config builds on this module

    return load_config(path, overrides, check_paths=False)


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
