"""Store URLs: which model names are fsspec URLs, and the filesystem behind one.

A model (input or zarr output) may live at a URL of any fsspec protocol: `memory://` (one
process), `s3://` with s3fs installed (`pip install 'leanmerge[s3]'`), and the others fsspec
knows. `file://` URLs are local paths and take the local route (a real lock, a temporary folder
renamed into place). A URL survives `pathlib`: click and the spec hold model names as `Path`,
which folds `memory://x/y` into `memory:/x/y`; `store_url` reads both spellings.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from engine.errors import CheckpointError, EngineError

_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):/+(.*)", re.S)
EXTRAS = {"s3": "s3", "s3a": "s3"}  # protocol -> the leanmerge extra that installs its filesystem


def store_url(text: Path | str) -> str | None:
    """The fsspec URL `text` names (also as `pathlib` spelled it), or None for a local path
    (`file://` included: see `local_path`)."""
    from fsspec.registry import known_implementations, registry

    m = _URL.fullmatch(str(text))
    if m is None:
        return None
    proto = m[1].lower()
    if proto in ("file", "local") or (proto not in known_implementations and proto not in registry):
        return None
    return f"{proto}://{m[2].rstrip('/')}"


def local_path(text: Path | str) -> Path:
    """`file:///abs/path` (or `file:/abs/path`, as `pathlib` spells it) as a path; anything else unchanged."""
    m = _URL.fullmatch(str(text))
    return Path("/" + m[2]) if m is not None and m[1].lower() == "file" else Path(text)


def shown(path: Path | str) -> str:
    """A location as the user typed it: the URL for a store path, else the path."""
    return store_url(path) or str(path)


def store_fs(url: str, error: type[EngineError]) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of `url`; a protocol whose package is missing is one
    `error` line naming what to install."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as e:
        proto = url.partition("://")[0]
        extra = EXTRAS.get(proto)
        fix = f"pip install 'leanmerge[{extra}]'" if extra else f"install fsspec's package for {proto}:// ({e})"
        raise error(f"{url}: {proto}:// URLs need a filesystem package that is not installed: {fix}") from None
    return fs, str(path)


def copy_file(src: Path, dst: Path) -> bool:
    """Copy the file `src` (a path, or an object at a store URL) to `dst`; False where there is none."""
    url = store_url(src)
    if url is None:
        if not src.is_file():
            return False
        shutil.copyfile(src, dst)
        return True
    fs, path = store_fs(url, CheckpointError)
    if not fs.isfile(path):
        return False
    dst.write_bytes(fs.cat_file(path))
    return True
