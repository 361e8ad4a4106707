"""Model folders as the spec names them, and what is wrong with one; imports no torch, so that
the command line can check its flags before it imports the engine."""

from __future__ import annotations

import re
from pathlib import Path

from engine.io.url import local_path, store_url

# `owner/name`, as the Hugging Face Hub names a model: said when no such local folder exists.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def real_path(path: Path | str) -> Path:
    """A folder as the spec identifies it: its resolved real path, however it was typed (relative
    or absolute, through a symlink, with `~`), so that a resume, a `verify` or a run from another
    directory names the same inputs and gets the same digest. A store URL (engine.io.url) stays as it is."""
    if store_url(path) is not None:
        return Path(path)
    return local_path(path).expanduser().resolve()


def folder_problem(path: Path, typed: str | None = None) -> str | None:
    """What is wrong with `path` as a model folder (`typed`: as the user wrote it), or None.

    One message for flags and YAML. A Hub id reaches here only where no Hugging Face cache was
    given (the Python API): the command line reads Hub ids from the cache (engine.hub).
    """
    path = local_path(path)
    if path.is_dir() or store_url(path) is not None:  # a store URL is checked when opened
        return None
    if path.exists():
        return f"{path} is a file, not a model folder"
    typed = str(path) if typed is None else typed
    hub = f"hf download {typed} --local-dir DIR" if HUB_ID.fullmatch(typed) else "download them"
    return f"{path} does not exist (here a model is a local folder: {hub}, then give DIR)"


def split_model_arg(arg: str) -> tuple[str, float | None]:
    """`DIR` or `DIR:WEIGHT` from the command line -> (DIR, WEIGHT or None)."""
    path, sep, weight = arg.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass  # a ':' that is part of the path
    return arg, None
