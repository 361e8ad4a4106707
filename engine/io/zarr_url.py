"""A zarr output at a store URL (`merge --format zarr -o memory://…`, `s3://…`; `convert … --to zarr`).

Object storage has no rename, so the local rule (a temporary folder renamed when complete)
becomes a temporary location and a marker. The chunks go to `.NAME.leanmerge-tmp/model.zarr`
beside the target in the store, a group whose leanmerge attributes have no record yet; the
journal, the side files and the lock stay on this machine, in a work folder keyed by the URL
(`StoreTarget.anchor`), so `--resume` continues a killed run here as it does for a folder. The
commit copies the finished group into the target, its group `zarr.json` (the marker: it carries
the record `verify` checks) last, so a target without it is never a model; a commit cut short is
finished by the next run, from the temporary group, before anything else.

What is never deleted: a target that holds anything but a leanmerge zarr model (weights with
their record, and model files: config, tokenizer, card), with or without `--overwrite`, and a
temporary location holding anything but a group of ours.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import OutputError
from engine.io.journal import JOURNAL_NAME
from engine.io.target import MODEL_FILES, SHOWN
from engine.io.url import store_fs, store_url
from engine.io.zarr_format import ATTRS, ZARR_DIR

log = logging.getLogger(__name__)
TMP_SUFFIX = ".leanmerge-tmp"
GROUP_META = f"{ZARR_DIR}/zarr.json"  # the marker: written last, removed first
# What the temporary group's marker becomes once copied into place: ours, not finished.
COMMITTED = {"zarr_format": 3, "node_type": "group", "attributes": {ATTRS: {"spec_sha256": "", "committed": True}}}


@dataclass(frozen=True)
class StoreTarget:
    """The output URL, its filesystem, and the local work folder's anchor (see the module docstring)."""

    url: str
    fs: Any
    path: str  # the target inside `fs`
    tmp_path: str  # the temporary location inside `fs`
    anchor: Path  # the lock file and the local temporary folder (engine.io.output) sit beside it

    @classmethod
    def of(cls, url: str, work_root: Path) -> StoreTarget:
        """The target at `url`, its journal kept under `work_root`."""
        fs, path = store_fs(url, OutputError)
        head, sep, name = path.rstrip("/").rpartition("/")
        if not name or not head.strip("/"):
            raise OutputError(f"{url}: give a folder inside the store (PROTOCOL://BUCKET/NAME), not its root")
        key = hashlib.sha256(url.encode()).hexdigest()[:16]
        return cls(url, fs, path.rstrip("/"), f"{head}{sep}.{name}{TMP_SUFFIX}", work_root / f"{name}-{key}")

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]

    @property
    def zarr_root(self) -> str:
        """Where the writer puts the group: the temporary location, as a URL zarr opens."""
        return f"{self.url.partition('://')[0]}://{self.tmp_path.lstrip('/')}/{ZARR_DIR}"

    def check(self, overwrite: bool, inputs: Sequence[Path], side: Path) -> None:
        """Refuse before any work what may not be written (see the module docstring); first finish
        a commit an earlier run was stopped in (`side`: its local folder, with the side files)."""
        for folder in inputs:
            url = store_url(folder)
            if url is not None and (
                url == self.url or url.startswith(self.url + "/") or self.url.startswith(url + "/")
            ):
                raise OutputError(f"{self.url}: output overlaps input {url}; choose another output")
        tmp = _record(self.fs, self.tmp_path)
        if tmp is None:
            _refuse_foreign(self.fs, self.tmp_path, "the temporary location of this output")
        elif "tensor_crc32" in tmp:  # finished, its commit stopped: the temporary group is the complete copy
            log.warning("%s: finishing the commit a stopped run left", self.url)
            self.publish(side, replace=True)
            if side.is_dir() and not side.is_symlink():
                shutil.rmtree(side)  # what it held was committed with it
        names = _names(self.fs, self.path)
        if not names:
            return
        if not overwrite:
            raise OutputError(f"{self.url}: output already exists; pass --overwrite to replace it")
        self._check_replaceable(names)

    def reset_temp(self) -> None:
        """Start the temporary location afresh (a new run): remove a group of ours left there."""
        if _names(self.fs, self.tmp_path):
            self._remove_temp_tree()

    def publish(self, side: Path, *, replace: bool) -> None:
        """Copy the finished temporary group (and the files in the local folder `side`, the
        journal aside) into the target, its group metadata last, then remove the temporary
        location; with `replace` an old model at the target (`check`ed) goes first, marker first."""
        names = _names(self.fs, self.path)
        if names and not replace:
            raise OutputError(
                f"{self.url}: appeared while this merge ran; the finished merge is kept at {self.tmp_path}: "
                "remove what appeared and run the same command again"
            )
        if names:
            self._check_replaceable(names, partial=_record(self.fs, self.path) is None)
            self._remove_model()
        for f in sorted(side.iterdir()) if side.is_dir() else ():
            if f.is_file() and f.name != JOURNAL_NAME:
                self.fs.pipe_file(f"{self.path}/{f.name}", f.read_bytes())
        objects = sorted(self.fs.find(self.tmp_path))
        marker = f"{self.tmp_path}/{GROUP_META}"
        for src in [o for o in objects if o != marker] + [marker]:
            self.fs.copy(src, self.path + src[len(self.tmp_path) :])
        # committed: the temporary group stops being a finished one before it goes, so a stop
        # while removing it leaves a group of ours to remove, never a partial one to commit again
        self.fs.pipe_file(marker, json.dumps(COMMITTED).encode())
        self._remove_temp_tree()

    def remove_temp(self) -> None:
        """Remove the temporary location (a bad input ended the run: nothing to resume)."""
        if _record(self.fs, self.tmp_path) is not None:
            self._remove_temp_tree()

    def _remove_temp_tree(self) -> None:
        """Remove the temporary location, its marker last: stopped half-way, it is still ours."""
        marker = f"{self.tmp_path}/{GROUP_META}"
        for obj in sorted(self.fs.find(self.tmp_path)):
            if obj != marker:
                self.fs.rm_file(obj)
        self.fs.rm(self.tmp_path, recursive=True)

    def _check_replaceable(self, names: list[str], *, partial: bool = False) -> None:
        """Refuse a target that is not a finished leanmerge zarr model (or, `partial`: what a
        stopped commit left, model files and a group without its marker)."""
        foreign = [n for n in names if n not in MODEL_FILES and n != ZARR_DIR]
        record = _record(self.fs, self.path)
        if foreign or not (partial or (record is not None and "tensor_crc32" in record)):
            what = f"also holds {', '.join(foreign[:SHOWN])}" if foreign else "holds no finished leanmerge zarr model"
            raise OutputError(
                f"{self.url}: --overwrite replaces only a leanmerge zarr model and this location {what}; "
                "choose another output"
            )

    def _remove_model(self) -> None:
        """Remove the checked model at the target: its marker first, so a stop half-way leaves no model."""
        if self.fs.exists(f"{self.path}/{GROUP_META}"):
            self.fs.rm(f"{self.path}/{GROUP_META}")
        for n in _names(self.fs, self.path):
            self.fs.rm(f"{self.path}/{n}", recursive=True)


def _names(fs: Any, path: str) -> list[str]:
    """The entries directly under `path` (none where it does not exist)."""
    if not fs.exists(path):
        return []
    return sorted(
        str(e).rstrip("/").rpartition("/")[2] for e in fs.ls(path, detail=False) if str(e).rstrip("/") != path
    )


def _record(fs: Any, path: str) -> dict[str, Any] | None:
    """The leanmerge attributes of the group under `path` (None: no group of ours there)."""
    try:
        meta = json.loads(fs.cat_file(f"{path.rstrip('/')}/{GROUP_META}"))
    except (OSError, ValueError):
        return None
    attrs = meta.get("attributes", {}).get(ATTRS) if isinstance(meta, dict) else None
    return attrs if isinstance(attrs, dict) and "spec_sha256" in attrs else None


def _refuse_foreign(fs: Any, path: str, what: str) -> None:
    names = _names(fs, path)
    if names:
        raise OutputError(
            f"{path}: {what} holds {', '.join(names[:SHOWN])}, which leanmerge did not write; move it away"
        )
