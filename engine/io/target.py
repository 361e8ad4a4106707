"""What may stand at the output's name, and how the finished merge replaces it.

The rule for `--overwrite`: a folder is replaced only when every entry in it is a model file
(weights `*.safetensors` / `pytorch_model*.bin`, their index, config, generation config,
tokenizer files, a model card `README.md`, `mergekit_config.yml`) and it holds weights. That is
what leanmerge writes, and what a downloaded model is; anything else in the folder (a
subfolder, a note, a `.git`) is the user's, and the run is refused before any work, naming it.
Never replaced, with or without `--overwrite`: a file, a symbolic link (the link would be
replaced, not what it names: give the real folder), the working directory or a folder above it,
a folder that is or holds an input. An empty folder is taken as if absent.

Everything here runs under the output's lock (`engine.io.lock`) and is checked again at commit:
a folder that appeared or changed during the run is not replaced without the rule's consent.
The replaced folder is parked at `.NAME.leanmerge-old` between two renames; a run stopped there
leaves it, and the next run puts it back (when the target is missing: it is then the only copy)
or removes it (when the target is in place).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import stat
from pathlib import Path

from engine.errors import OutputError
from engine.io.checkpoint import INDEX_NAME
from engine.io.output import SIDE_FILES
from engine.io.record import fsync_dir
from engine.io.zarr_format import ZARR_DIR

log = logging.getLogger(__name__)

MODEL_FILES: frozenset[str] = frozenset(
    {*SIDE_FILES, INDEX_NAME, "pytorch_model.bin.index.json", "README.md", "mergekit_config.yml"}
)
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", ZARR_DIR)
SHOWN = 3  # entries named in a refusal


def old_dir_for(target: Path) -> Path:
    """Where the replaced output waits between the two renames of a commit."""
    return target.parent / f".{target.name}.leanmerge-old"


def resolve_target(output: Path | str) -> Path:
    """The output as an absolute path whose parent folders' links are resolved (so `-o .`, `-o
    ../x` and a relative path name one place); the last part is kept as typed, never followed.

    Raises:
        OutputError: the output is the root folder or a symbolic link (dangling or not).
    """
    path = Path(os.path.abspath(output))  # folds "." and ".." and a trailing "/"
    if not path.name:
        raise OutputError(f"{output}: the root folder cannot be the output; choose a new folder")
    target = path.parent.resolve() / path.name
    if target.is_symlink():
        to = os.readlink(target)
        state = "" if target.exists() else ", which does not exist"
        raise OutputError(
            f"{target}: is a symbolic link (to {to}{state}); give the real folder as -o, or remove the link"
        )
    return target


def make_parent(target: Path) -> None:
    """Create the output's missing parent folders, as mergekit does; refuse one not writable."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{target.parent}: cannot create the output's parent folder: {e.strerror}") from None
    if not os.access(target.parent, os.W_OK):
        raise OutputError(f"{target.parent}: not writable")


def check_target(target: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Refuse before any work what the merge may not write or replace (see the module's rule)."""
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the working directory was removed: nothing of it to protect
        cwd = None
    if cwd is not None and (target == cwd or target in cwd.parents):
        raise OutputError(f"{target}: is the working directory or a folder above it; choose a new folder as -o")
    for folder in inputs:
        f = folder.resolve()
        if target == f or f in target.parents or target in f.parents:
            raise OutputError(f"{target}: output overlaps input folder {folder}; choose another output")
    if not os.path.lexists(target):
        return
    if target.is_symlink() or not target.is_dir():
        raise OutputError(f"{target}: exists and is not a folder; leanmerge replaces only model folders")
    if not any(os.scandir(target)):
        return  # an empty folder: the commit's rename replaces it
    if not overwrite:
        raise OutputError(f"{target}: output already exists; pass --overwrite to replace it")
    check_replaceable(target)


def check_replaceable(folder: Path, *, need_weights: bool = True) -> None:
    """Refuse a folder that holds anything but model files (or, with `need_weights`, no weights)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        raise OutputError(f"{folder}: cannot list it to see what --overwrite would replace: {e.strerror}") from None
    foreign = [n + ("/" if _is_dir(folder / n) else "") for n in names if not _model_file(folder / n)]
    if foreign:
        more = f" (and {len(foreign) - SHOWN} more)" if len(foreign) > SHOWN else ""
        raise OutputError(
            f"{folder}: --overwrite replaces only a model folder (weights, index, config, tokenizer files) and this "
            f"one also holds {', '.join(foreign[:SHOWN])}{more}; move those out or choose another -o"
        )
    if need_weights and not any(_weights(n) for n in names):
        raise OutputError(f"{folder}: holds no model weights (*.safetensors); --overwrite replaces only a model folder")


def clear_leftovers(target: Path) -> None:
    """Undo a commit stopped between its two renames: put the parked old model back where the
    target is missing (it may be the only copy), or remove it where the new target is in place."""
    old = old_dir_for(target)
    if not os.path.lexists(old):
        return
    if old.is_symlink() or not old.is_dir():
        raise OutputError(f"{old}: not a folder leanmerge left (a link or a file at its reserved name); remove it")
    if not os.path.lexists(target):
        os.rename(old, target)
        log.warning("%s: put back the previous model from %s (a run was stopped while replacing it)", target, old)
        return
    try:
        check_replaceable(old, need_weights=False)  # a removal stopped half-way leaves fewer files
    except OutputError:
        raise OutputError(
            f"{old}: holds more than the model a stopped --overwrite parks there; move it away (left unchanged)"
        ) from None
    shutil.rmtree(old)
    log.info("%s: removed the previous model a stopped run left", old)


def commit_output(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished `tmp` into place, checking `target` again first (it may have appeared
    or changed during the run) and replacing an old `target` only now."""
    fsync_dir(tmp)
    old = None
    if os.path.lexists(target) and (target.is_symlink() or not target.is_dir() or any(os.scandir(target))):
        if not overwrite or target.is_symlink() or not target.is_dir():
            raise OutputError(
                f"{target}: appeared while this merge ran; the finished merge is kept in {tmp}: move it "
                "where you want it (or remove what appeared and run the same command again)"
            )
        check_replaceable(target)
        old = old_dir_for(target)
        try:
            os.rename(target, old)
        except OSError as e:
            raise OutputError(
                f"{target}: cannot move it aside to {old} ({e.strerror}); the merge is in {tmp}"
            ) from None
    try:
        os.rename(tmp, target)
    except OSError as e:
        if old is not None:
            os.rename(old, target)
        raise OutputError(
            f"{target}: cannot move the finished merge into place ({e.strerror}); it is in {tmp}"
        ) from None
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old)


def check_temp(tmp: Path) -> None:
    """Refuse a link or file planted where the temporary folder goes (never followed or removed)."""
    if tmp.is_symlink():
        raise OutputError(
            f"{tmp}: a symbolic link (to {os.readlink(tmp)}) where leanmerge keeps its temporary folder; "
            "remove the link (nothing was followed or written)"
        )
    if os.path.lexists(tmp) and not tmp.is_dir():
        raise OutputError(f"{tmp}: a file where leanmerge keeps its temporary folder; remove it")


def _model_file(path: Path) -> bool:
    """A model file by name, stored as a file or a link (a hub cache's snapshots link blobs), or
    the zarr group leanmerge writes (`model.zarr/` with its `zarr.json`)."""
    mode = os.lstat(path).st_mode
    if stat.S_ISDIR(mode) and path.name == ZARR_DIR:
        return (path / "zarr.json").is_file()
    return (stat.S_ISREG(mode) or stat.S_ISLNK(mode)) and (path.name in MODEL_FILES or _weights(path.name))


def _weights(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in WEIGHT_PATTERNS)


def _is_dir(path: Path) -> bool:
    return stat.S_ISDIR(os.lstat(path).st_mode)
