"""mergekit's tokenizer settings: `tokenizer_source: union`, the `tokenizer:` block and
`chat_template`, as parsed from the config and as applied to the output folder.

```yaml
tokenizer:
  source: union                 # union (default), base, or a model folder
  pad_to_multiple_of: 64        # optional: rows up to a multiple, filled with the mean row
  tokens:                       # optional: where a token's embedding row comes from
    <|im_start|>: {source: {kind: model_token, model: ./chat, token: <s>}}
    <|im_end|>: {source: {kind: zero}, force: true}   # force: every model's row, not only missing ones
    <tool>: {source: ./tools}   # that model's row of the same token
chat_template: auto             # auto (the inputs' most common), alpaca, chatml, exaone, llama3, mistral, or Jinja
```

`tokenizer_source: union` is `tokenizer: {source: union}`. The vocabulary and each model's
embedding rows are built by `engine.tokenizer_build` and `engine.embed_rows`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.chat_templates import NAMED
from engine.errors import SpecError

log = logging.getLogger(__name__)

TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
TOKEN_KEYS = ("source", "force")
TEMPLATE_FILE = "chat_template.jinja"


@dataclass(frozen=True)
class TokenSource:
    """Where a token's embedding row comes from: `zero`; `model` (that model's row of the same
    token); `model_token` (that model's row of `token` or of id `token_id`)."""

    kind: str
    model: Path | None = None
    token: str | None = None
    token_id: int | None = None

    def to_json(self) -> object:
        if self.kind == "model":
            return str(self.model)
        if self.kind == "zero":
            return {"kind": "zero"}
        which = {"token": self.token} if self.token is not None else {"token_id": self.token_id}
        return {"kind": "model_token", "model": str(self.model), **which}


@dataclass(frozen=True)
class TokenConfig:
    """One entry of `tokenizer.tokens`: its source; `force` uses it for every model's row."""

    source: TokenSource
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """The output vocabulary: `source` "union", "base" or a model folder, plus added tokens."""

    source: str | Path
    tokens: tuple[tuple[str, TokenConfig], ...] = ()
    pad_to_multiple_of: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "tokens": {t: {"source": c.source.to_json(), "force": c.force} for t, c in self.tokens},
            "pad_to_multiple_of": self.pad_to_multiple_of,
        }


Folder = Callable[[Any, int, str], Path]  # (value, line, key) -> a model folder, as the config resolves it
Fail = Callable[[int, str], SpecError]  # (line, message) -> the error to raise


def parse_tokenizer(raw: Any, line: int, folder: Folder, fail: Fail) -> TokenizerSpec:
    """The `tokenizer:` block (a mapping whose `lines` give each key's line)."""
    if not isinstance(raw, dict):
        raise fail(line, "'tokenizer' must be a mapping with 'source', 'tokens' and/or 'pad_to_multiple_of'")
    lines = getattr(raw, "lines", {})
    for key in raw:
        if key not in TOKENIZER_KEYS:
            raise fail(
                lines.get(key, line), f"tokenizer: unsupported key {key!r} (supported: {', '.join(TOKENIZER_KEYS)})"
            )
    source = parse_source(raw.get("source", "union"), lines.get("source", line), folder, "tokenizer.source")
    pad = raw.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise fail(
            lines.get("pad_to_multiple_of", line),
            f"tokenizer.pad_to_multiple_of must be a positive integer, got {pad!r}",
        )
    tokens = raw.get("tokens") or {}
    at = lines.get("tokens", line)
    if not isinstance(tokens, dict):
        raise fail(at, "tokenizer.tokens must be a mapping of token: {source: ..., force: ...}")
    token_lines = getattr(tokens, "lines", {})
    parsed = tuple(
        (str(t), _token(cfg, token_lines.get(t, at), f"tokenizer.tokens[{t!r}]", folder, fail))
        for t, cfg in tokens.items()
    )
    return TokenizerSpec(source, parsed, pad)


def parse_source(value: Any, line: int, folder: Folder, key: str) -> str | Path:
    """`union`, `base`, or a model folder."""
    return value if value in ("union", "base") else folder(value, line, key)


def _token(raw: Any, line: int, where: str, folder: Folder, fail: Fail) -> TokenConfig:
    if not isinstance(raw, dict):
        raise fail(line, f"{where} must be a mapping with 'source' (and 'force')")
    lines = getattr(raw, "lines", {})
    for key in raw:
        if key not in TOKEN_KEYS:
            raise fail(lines.get(key, line), f"{where}: unsupported key {key!r} (supported: {', '.join(TOKEN_KEYS)})")
    force = raw.get("force", False)
    if not isinstance(force, bool):
        raise fail(lines.get("force", line), f"{where}.force must be true or false, got {force!r}")
    if raw.get("source") is None:
        raise fail(
            line, f"{where} needs a 'source': a model folder, {{kind: zero}} or {{kind: model_token, model, token}}"
        )
    src, at = raw["source"], lines.get("source", line)
    if not isinstance(src, dict):
        return TokenConfig(TokenSource("model", folder(src, at, f"{where}.source")), force)
    src_lines = getattr(src, "lines", {})
    kind = src.get("kind")
    allowed = {"zero": ("kind",), "model_token": ("kind", "model", "token", "token_id")}.get(str(kind))
    if allowed is None:
        raise fail(at, f"{where}.source.kind must be 'zero' or 'model_token', got {kind!r}")
    for key in src:
        if key not in allowed:
            raise fail(
                src_lines.get(key, at),
                f"{where}.source: unsupported key {key!r} for kind {kind} (supported: {', '.join(allowed)})",
            )
    if kind == "zero":
        return TokenConfig(TokenSource("zero"), force)
    if "model" not in src or ("token" in src) == ("token_id" in src):
        raise fail(at, f"{where}.source: kind model_token needs 'model' and one of 'token' or 'token_id'")
    token_id = src.get("token_id")
    if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0):
        raise fail(src_lines.get("token_id", at), f"{where}.source.token_id must be an integer >= 0, got {token_id!r}")
    token = None if "token" not in src else str(src["token"])
    model = folder(src["model"], src_lines.get("model", at), f"{where}.source.model")
    return TokenConfig(TokenSource("model_token", model, token, token_id), force)


def check_chat_template(value: Any) -> str | None:
    """Why `value` is not a chat template mergekit accepts (None when it is): `auto`, a name it
    ships, or Jinja (mergekit's test: at least 20 characters and a `{`)."""
    if not isinstance(value, str):
        return f"must be a string, got {value!r}"
    if value == "auto" or value in NAMED or (len(value) >= 20 and "{" in value):
        return None
    return f"{value!r} is neither auto, a named template ({', '.join(NAMED)}) nor a Jinja template"


def resolve_chat_template(value: str, folders: Sequence[Path]) -> str | None:
    """The template text: a named one, the Jinja given, or for `auto` the most common template
    among `folders`' tokenizers (the first listed wins a tie; None when none has one)."""
    if value != "auto":
        return NAMED.get(value, value)
    found = [t.strip() for t in (model_chat_template(f) for f in folders) if t]
    return Counter(found).most_common(1)[0][0] if found else None


def model_chat_template(folder: Path) -> str | None:
    """A model folder's chat template, as transformers loads it: chat_template.jinja, else
    tokenizer_config.json's `chat_template` (a string, or named templates: the `default`)."""
    try:
        return (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
    except OSError:
        pass
    try:
        value = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(value, list):
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    return value if isinstance(value, str) else None


def write_chat_template(folder: Path, text: str) -> None:
    """Set `text` as the chat template of the tokenizer written in `folder`: chat_template.jinja
    (what transformers 5 writes and reads first) and tokenizer_config.json's key where it has one."""
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        log.warning("a chat template is set but the output has no tokenizer; it is not saved")
        return
    (folder / TEMPLATE_FILE).write_text(text, encoding="utf-8")
    try:
        doc = json.loads(config.read_text(encoding="utf-8"))
    except ValueError:
        return
    if isinstance(doc, dict) and "chat_template" in doc:
        doc["chat_template"] = text
        config.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def set_chat_template(folder: Path, spec: Any) -> None:
    """Apply `spec.chat_template` to the tokenizer written in `folder` (`auto`: the most common
    among the base and the models, in that order)."""
    folders = list(dict.fromkeys([spec.base, *(m.path for m in spec.models)]))
    text = resolve_chat_template(spec.chat_template, folders)
    if text is None:
        log.warning("chat_template auto: no input has a chat template; none is set")
        return
    write_chat_template(folder, text)
