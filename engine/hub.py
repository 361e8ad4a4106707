"""Hugging Face Hub ids as model names: `OWNER/NAME` or `OWNER/NAME@REVISION` -> a snapshot
folder of the local Hugging Face cache. Imports no torch: the command line resolves its flags
before it imports the engine.

How a model name is read (flags and YAML alike):
1. A local path wins: if the name, as typed, is an existing path (relative to the config's folder
   in YAML, to the working directory for flags), it is that folder, whatever the cache holds. If
   the cache also holds a Hub model of that name, a warning says which one was used (write
   `./OWNER/NAME` to say "the local folder" without the warning).
2. Otherwise a name of the form `OWNER/NAME[@REVISION]` is a Hub model, read from the cache
   (`HubCache.folder`, found by cli.py from HF_HUB_CACHE, HF_HOME or ~/.cache/huggingface/hub)
   in its own layout: `models--OWNER--NAME/refs/REVISION` (a branch or tag; `main` when none is
   given) holds the commit whose `snapshots/<commit>` folder is read; REVISION may also be a
   commit id, or a unique prefix of one of 7+ hex digits, that has a snapshot.
3. A Hub model the cache lacks, or holds without weights, is downloaded first when
   `huggingface_hub` is installed and downloads are on (not HF_HUB_OFFLINE): its safetensors
   weights (its `.bin` ones only when it has no safetensors), config and tokenizer files, into
   the same cache, with huggingface_hub's progress bars. Else one line says what to run.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import SpecError
from engine.io.url import local_path, store_url
from engine.paths import HUB_ID

log = logging.getLogger(__name__)

# OWNER/NAME[@REVISION], as the Hub names a model (a branch may contain '/': refs/pr/1).
HUB_REF = re.compile(rf"(?P<repo>{HUB_ID.pattern})(?:@(?P<rev>[\w.-]+(?:/[\w.-]+)*))?")
DEFAULT_REVISION = "main"
# What a download fetches besides the weights: what a merge copies or reads (engine.io.output).
SIDE_PATTERNS = ["*.json", "tokenizer.model", "merges.txt", "*.jinja"]
# The weights a download takes, the first kind the repo has: transformers' safetensors (not a
# second copy such as Mistral's consolidated.safetensors), other safetensors, then .bin.
WEIGHT_CHOICES = ("model*.safetensors", "*.safetensors", "pytorch_model*.bin")
WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",  # a LoRA adapter (engine.io.lora)
)


@dataclass(frozen=True)
class HubCache:
    """Where Hub models are looked up, and whether a missing one may be downloaded."""

    folder: Path
    download: bool = True


def hub_cache(env: Mapping[str, str]) -> HubCache:
    """The cache huggingface_hub itself uses, from the environment `env` (cli.py passes
    os.environ): HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else HF_HOME/hub, else
    XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub. HF_HUB_OFFLINE=1 turns
    downloads off."""
    folder = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not folder:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        folder = os.path.join(home, "hub")
    offline = env.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return HubCache(Path(folder).expanduser(), download=not offline)


def resolve_model(typed: str, root: Path, hub: HubCache | None) -> Path:
    """The folder that the model name `typed` stands for (see the module docstring).

    Args:
        typed: a path, or a Hub id `OWNER/NAME[@REVISION]`.
        root: what a relative path is relative to.
        hub: the cache; None reads local paths only.
    Returns:
        The local path (existing or not: the caller says what is wrong with it) or the snapshot.
    Raises:
        SpecError: a Hub model that is neither in the cache nor downloadable, in one line.
    """
    if store_url(typed) is not None:  # a model in a store (engine.io.url): not a path
        return Path(typed)
    path = local_path(typed).expanduser()
    path = path if path.is_absolute() else root / path
    ref = HUB_REF.fullmatch(typed)
    if hub is None or ref is None:
        return path
    repo, rev = ref["repo"], ref["rev"]
    if os.path.lexists(path):
        if (hub.folder / _repo_dir(repo)).is_dir():
            log.warning(
                "%s: reading the local folder %s, not the Hub model in %s (a local path wins)", typed, path, hub.folder
            )
        return path
    if ".." in (rev or "").split("/"):
        raise SpecError(f"{typed}: revision {rev!r} is not a branch, tag or commit name")
    found = _snapshot(hub.folder / _repo_dir(repo), rev or DEFAULT_REVISION)
    if found is not None and _has_weights(found):
        return found
    return _download(typed, repo, rev, hub, found)


def snapshot_blobs(folder: Path) -> Path | None:
    """The `blobs` folder that the files of `folder` may link to, when `folder` is a snapshot
    of the Hugging Face cache (`models--OWNER--NAME/snapshots/COMMIT`); else None."""
    real = folder.resolve()
    repo = real.parent.parent
    if real.parent.name != "snapshots" or not repo.name.startswith("models--"):
        return None
    return repo / "blobs"


def _repo_dir(repo: str) -> str:
    return "models--" + repo.replace("/", "--")


def _snapshot(repo_dir: Path, rev: str) -> Path | None:
    """The snapshot folder of `rev` (a ref name, a commit id or a 7+ digit prefix of one)."""
    snapshots = repo_dir / "snapshots"
    ref = repo_dir / "refs" / rev
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        if re.fullmatch(r"[0-9a-f]{40}", commit) and (snapshots / commit).is_dir():
            return snapshots / commit
        return None
    if not re.fullmatch(r"[0-9a-f]{7,40}", rev) or not snapshots.is_dir():
        return None
    matches = [p for p in snapshots.iterdir() if p.name.startswith(rev) and p.is_dir()]
    return matches[0] if len(matches) == 1 else None


def _has_weights(folder: Path) -> bool:
    """A snapshot with weights, each shard its index names present: a partial download is not."""
    for name in WEIGHTS:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return True
        try:
            files = set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return True  # a bad index is the checkpoint reader's to explain
        return all(isinstance(f, str) and (folder / f).is_file() for f in files)
    return False


def _command(repo: str, rev: str | None) -> str:
    return f"`hf download {repo}" + (f" --revision {rev}`" if rev else "`")


def _download(typed: str, repo: str, rev: str | None, hub: HubCache, partial: Path | None) -> Path:
    """Download `repo` into the cache, or raise the one line that says how to."""
    where = f"{typed}: no such local folder, nor {'a complete ' if partial else ''}snapshot in the Hugging Face cache {hub.folder}"
    if not hub.download:
        raise SpecError(f"{where} (downloads are off: HF_HUB_OFFLINE); run {_command(repo, rev)} with a network")
    hf = _huggingface_hub()
    if hf is None:
        raise SpecError(
            f"{where}; run {_command(repo, rev)} first, or `pip install huggingface_hub` to let leanmerge download it"
        )
    log.warning("%s: downloading into %s", typed, hub.folder)
    try:
        return fetch(hf, repo, rev, hub.folder)
    except Exception as e:  # noqa: BLE001 - a network, auth or name error of huggingface_hub: said in one line
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise SpecError(
            f"{where}, and the download failed ({reason}); check the name, or run {_command(repo, rev)}"
        ) from None


def _huggingface_hub() -> Any:
    """The optional `huggingface_hub` module, or None when it is not installed."""
    try:
        import huggingface_hub
    except ImportError:
        return None
    return huggingface_hub


def fetch(hf: Any, repo: str, rev: str | None, cache: Path) -> Path:
    """Download the weights (safetensors when the repo has them, else `.bin`), config and
    tokenizer files of `repo` at `rev` into `cache`; the snapshot folder. `hf` is the
    huggingface_hub module (a stand-in in tests)."""
    files = hf.list_repo_files(repo, revision=rev)
    weights = next(([p] for p in WEIGHT_CHOICES if fnmatch.filter(files, p)), [WEIGHT_CHOICES[-1]])
    snapshot: Callable[..., str] = hf.snapshot_download
    return Path(snapshot(repo, revision=rev, cache_dir=cache, allow_patterns=[*weights, *SIDE_PATTERNS]))
