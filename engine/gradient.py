"""Parameters that vary by tensor: mergekit's gradients and filters, resolved per tensor name.

A parameter setting is a plain value, a **gradient** (a list of numbers interpolated over the
layer index) or a list of **filter rules** (`[{filter: self_attn, value: ...}, {value: ...}]`:
the first rule whose filter occurs in the tensor name wins; a rule without a filter matches
every tensor). These are mergekit's semantics:

- layer i of n numbered layers sits at position t = i / (n − 1) (t = 1 when n == 1);
- a gradient [v₀, …, v_{k−1}] at t is linear between v_⌊s⌋ and v_⌈s⌉ with s = t · (k − 1);
- tensors outside the numbered layers (embeddings, final norm, `lm_head`, ...) take t = 0, the
  gradient's first value, as mergekit does since 0.1 (its March 2025 change, arcee-ai/mergekit#534;
  before it the tensors after the layers took t = 1, the last value);
- a filter matches when it occurs in the name as plain text (mergekit's `filter in name`: no
  wildcards, so `self_attn.*_proj` matches only a name containing those characters; `*` alone
  matches everything); when no rule matches, the next level of precedence decides (model >
  global > method default).

The layer index comes from the name: `…layers.{i}.…`, `…h.{i}.…`, `…blocks.{i}.…` (also
`layer.{i}` and `block.{i}`); the layer count is one more than the largest index in the base.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from engine.methods.base import ParamValue

LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
PRE_WEIGHT_RE = re.compile(r"embed|(?:^|\.)wte\.|(?:^|\.)wpe\.|word_embeddings|tok_embeddings")


@dataclass(frozen=True)
class Gradient:
    """A number per position along the layers, linearly interpolated (mergekit's gradient)."""

    values: tuple[float, ...]

    def at(self, t: float) -> float:
        """The value at position t in [0, 1], as mergekit computes it."""
        if len(self.values) == 1:
            return self.values[0]
        scaled = t * (len(self.values) - 1)
        i0, i1 = math.floor(scaled), math.ceil(scaled)
        frac = scaled - i0
        return (1 - frac) * self.values[i0] + frac * self.values[i1]


@dataclass(frozen=True)
class Rule:
    """One filter rule: `value` applies to tensors whose name contains `filter` (None: all)."""

    filter: str | None
    value: ParamValue | Gradient

    def matches(self, name: str | None) -> bool:
        if self.filter is None or self.filter == "*":
            return True
        return name is not None and name != "" and self.filter in name


@dataclass(frozen=True)
class Filtered:
    """Filter rules in order; the first that matches the tensor name gives the value."""

    rules: tuple[Rule, ...]


Setting = ParamValue | Gradient | Filtered


def varies(setting: Setting) -> bool:
    """True when the setting can give different values for different tensors."""
    return isinstance(setting, (Gradient, Filtered))


def resolve(setting: Setting, name: str | None, t: float) -> ParamValue | None:
    """The value of `setting` for tensor `name` at layer position `t`; None if no rule matches."""
    if isinstance(setting, Gradient):
        return setting.at(t)
    if isinstance(setting, Filtered):
        for rule in setting.rules:
            if rule.matches(name):
                return rule.value.at(t) if isinstance(rule.value, Gradient) else rule.value
        return None
    return setting


def values(setting: Setting) -> Iterator[ParamValue]:
    """Every value the setting spells out (gradient knots, rule values), for checking."""
    if isinstance(setting, Gradient):
        yield from setting.values
    elif isinstance(setting, Filtered):
        for rule in setting.rules:
            yield from values(rule.value)
    else:
        yield setting


def knots(setting: Setting) -> set[float]:
    """Positions where the setting's value bends: every linear constraint on interpolated
    values holds everywhere if it holds at the union of these."""
    if isinstance(setting, Gradient):
        k = len(setting.values)
        return {i / (k - 1) for i in range(k)} if k > 1 else {0.0}
    if isinstance(setting, Filtered):
        return set().union(*(knots(r.value) for r in setting.rules))
    return set()


def to_json(setting: Setting) -> object:
    """JSON form, as the YAML spells it: a number, a list, or a list of {filter, value}."""
    if isinstance(setting, Gradient):
        return list(setting.values)
    if isinstance(setting, Filtered):
        return [
            {"filter": r.filter, "value": to_json(r.value)} if r.filter is not None else {"value": to_json(r.value)}
            for r in setting.rules
        ]
    return setting


def layer_index(name: str) -> int | None:
    """The numbered layer a tensor belongs to, from its name; None outside the layers."""
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def count_layers(names: Iterable[str]) -> int:
    """One more than the largest layer index among `names` (0 when none is in a layer)."""
    return 1 + max((i for i in map(layer_index, names) if i is not None), default=-1)


def position(name: str | None, n_layers: int) -> float:
    """Position t in [0, 1] of a tensor along the layers (see the module docstring)."""
    i = None if name is None else layer_index(name)
    if i is None:
        return 0.0  # outside the layers: mergekit plans pre and post weights at t = 0
    return i / (n_layers - 1) if n_layers > 1 else 1.0
