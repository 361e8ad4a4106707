"""The YAML edge of engine.config: a SafeLoader whose mappings and sequences remember their
lines (so every config error names one), bounded before and while it parses, and the parameter
values (numbers, gradients, filter rules) built from its nodes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from engine.errors import SpecError
from engine.gradient import Filtered, Gradient, Rule, Setting

# Bounds on what a config may ask the parser to build, checked before and while it parses: YAML
# nodes take ~150 bytes of RAM per byte of text (a 48 MB weight list took 7.4 GB), outside the
# merge's budget. A real config is a few KiB; a gradient has one entry per layer.
MAX_CONFIG_BYTES = 1 << 20
MAX_NODES = 100_000
MAX_LIST_ITEMS = 4096

LineError = Callable[[int, str], SpecError]  # (line, message) -> the error to raise, file named


class Map(dict[str, Any]):
    """A YAML mapping that remembers the line of each key (1-based)."""

    line: int
    lines: dict[str, int]


class Seq(list[Any]):
    """A YAML sequence that remembers the line of each item (1-based)."""

    line: int
    lines: list[int]


class _LineError(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings and sequences carry line numbers; duplicate keys are errors;
    at most `MAX_NODES` nodes are built."""

    nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _LineError(self.line + 1, f"more than {MAX_NODES} YAML values; a merge config is far smaller")
        return super().compose_node(parent, index)


def _construct_map(loader: yaml.SafeLoader, node: yaml.MappingNode) -> Map:
    loader.flatten_mapping(node)
    out = Map()
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


def _construct_seq(loader: yaml.SafeLoader, node: yaml.SequenceNode) -> Seq:
    if len(node.value) > MAX_LIST_ITEMS:
        raise _LineError(
            node.start_mark.line + 1, f"a list of {len(node.value)} items; at most {MAX_LIST_ITEMS} are accepted"
        )
    out = Seq(loader.construct_object(child, deep=True) for child in node.value)
    out.line, out.lines = node.start_mark.line + 1, [child.start_mark.line + 1 for child in node.value]
    return out


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def load_yaml(path: Path) -> Any:
    """The document of the config file `path`, its mappings and sequences carrying lines.

    Raises:
        SpecError: one line, `FILE[:LINE]: what is wrong`.
    """
    try:
        return yaml.load(_read_text(path), Loader=_LineLoader)  # a SafeLoader subclass
    except OSError as e:
        raise SpecError(f"{path}: cannot read config: {e.strerror}") from None
    except _LineError as e:
        raise SpecError(f"{path}:{e.line}: {e}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None


def _read_text(path: Path) -> str:
    """The config's text, refused past `MAX_CONFIG_BYTES` before any of it is parsed."""
    with open(path, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)  # a bound even for a device or a pipe
    if len(raw) > MAX_CONFIG_BYTES:
        raise SpecError(
            f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; a merge config is a few KiB (is this the right file?)"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text (byte {e.start})") from None


def setting(raw: Any, line: int, where: str, error: LineError) -> Setting:
    """A plain value, a gradient (list of numbers) or filter rules (list of {filter, value})."""
    if isinstance(raw, (bool, int, float, str)):
        return raw
    if isinstance(raw, Map):
        return Filtered((rule(raw, line, where, error),))
    if isinstance(raw, Seq) and raw:
        if all(_is_number(v) for v in raw):
            return Gradient(tuple(float(v) for v in raw))
        if all(isinstance(v, Map) for v in raw):
            return Filtered(tuple(rule(v, at, f"{where}[{i}]", error) for i, (v, at) in enumerate(zip(raw, raw.lines))))
        raise error(line, f"{where}: a list must be all numbers (a gradient) or all {{filter, value}} rules")
    raise error(line, f"{where}: expected a number, true/false, a string or a gradient list, got {raw!r}")


def rule(raw: Map, line: int, where: str, error: LineError) -> Rule:
    only_keys(raw, ("filter", "value"), where, error, " in a rule")
    if "value" not in raw:
        raise error(line, f"{where}: a rule needs a 'value'")
    filt, value, at = raw.get("filter"), raw["value"], raw.lines["value"]
    if filt is not None and not isinstance(filt, str):
        raise error(raw.lines["filter"], f"{where}.filter must be a string, got {filt!r}")
    if isinstance(value, Seq) and value and all(_is_number(v) for v in value):
        return Rule(filt, Gradient(tuple(float(v) for v in value)))
    if isinstance(value, (bool, int, float, str)):
        return Rule(filt, value)
    raise error(at, f"{where}.value: expected a number, true/false, a string or a gradient list, got {value!r}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def only_keys(m: Map, allowed: tuple[str, ...], where: str, error: LineError, context: str = "") -> None:
    """Refuse any key of `m` not in `allowed`, naming its line."""
    for key in m:
        if key not in allowed:
            raise error(m.lines[key], f"{where}: unsupported key {key!r}{context} (supported: {', '.join(allowed)})")
