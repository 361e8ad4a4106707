"""Hub ids (`OWNER/NAME[@REVISION]`) read from a Hugging Face cache folder built here, offline;
downloads go through a stand-in for huggingface_hub, never the network."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from engine.cli import main
from engine.config import load_config
from engine.errors import CheckpointError, SpecError
from engine.hub import SIDE_PATTERNS, HubCache, fetch, hub_cache, resolve_model
from engine.io.checkpoint import open_checkpoint

from conftest import SHAPES, family_tensors, write_checkpoint

SHA1, SHA2 = "1" * 8 + "a" * 32, "2" * 8 + "b" * 32


def cache_model(cache: Path, repo: str, commit: str, tensors: dict[str, torch.Tensor], refs: tuple[str, ...]) -> Path:
    """Put `tensors` into `cache` as huggingface_hub does: files in `blobs/` named by their hash,
    `snapshots/COMMIT/*` symlinks to them, `refs/REF` holding the commit; the snapshot folder."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    staged = write_checkpoint(repo_dir / "staging", tensors)
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for f in sorted(staged.iterdir()):
        blob = repo_dir / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        f.replace(blob)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob.name)
    staged.rmdir()
    for ref in refs:
        (repo_dir / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """`org/base` at main, and `org/ft` at two commits: main (SHA1) and tag v2 (SHA2)."""
    base, ft1, ft2 = family_tensors(SHAPES, 2, seed=7, dtype=torch.bfloat16)
    root = tmp_path / "hub"
    cache_model(root, "org/base", SHA1, base, ("main",))
    cache_model(root, "org/ft", SHA1, ft1, ("main",))
    cache_model(root, "org/ft", SHA2, ft2, ("v2", "refs/pr/3"))
    return root


def test_hub_ids_resolve_offline(cache: Path, tmp_path: Path) -> None:
    """By branch (main by default), tag, PR ref, commit id and a unique prefix of one."""
    hub = HubCache(cache, download=False)
    snap = cache / "models--org--ft" / "snapshots"
    for typed, commit in [
        ("org/ft", SHA1),
        ("org/ft@main", SHA1),
        ("org/ft@v2", SHA2),
        ("org/ft@refs/pr/3", SHA2),
        (f"org/ft@{SHA2}", SHA2),
        (f"org/ft@{SHA2[:7]}", SHA2),
    ]:
        assert resolve_model(typed, tmp_path, hub) == snap / commit, typed
    ckpt = open_checkpoint(resolve_model("org/ft@v2", tmp_path, hub))  # through the symlinks into blobs/
    assert set(ckpt.tensors) == set(SHAPES)
    weights = snap / SHA2 / "model.safetensors"
    weights.unlink()
    weights.symlink_to((cache / "models--org--base" / "snapshots" / SHA1 / "model.safetensors").resolve())
    with pytest.raises(CheckpointError, match="outside the model folder"):  # only its own repo's blobs
        open_checkpoint(snap / SHA2)


def test_missing_hub_model_is_one_line_saying_what_to_run(cache: Path, tmp_path: Path) -> None:
    offline = HubCache(cache, download=False)
    with pytest.raises(SpecError) as e:
        resolve_model("org/nothing@v1", tmp_path, offline)
    assert str(e.value) == (
        f"org/nothing@v1: no such local folder, nor snapshot in the Hugging Face cache {cache} (downloads are off: HF_HUB_OFFLINE); "
        "run `hf download org/nothing --revision v1` with a network"
    )
    with pytest.raises(SpecError, match=r"^org/ft@v9: no such local folder, nor snapshot in the Hugging Face cache"):
        resolve_model("org/ft@v9", tmp_path, offline)  # a revision the cache does not know


def test_without_huggingface_hub_the_line_says_to_install_it(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` fails
    with pytest.raises(SpecError) as e:
        resolve_model("org/nothing", tmp_path, HubCache(cache))
    assert str(e.value) == (
        f"org/nothing: no such local folder, nor snapshot in the Hugging Face cache {cache}; run `hf download org/nothing` first, or "
        "`pip install huggingface_hub` to let leanmerge download it"
    )


class FakeHub(types.ModuleType):
    """Stands for huggingface_hub: records calls; a download writes a snapshot into the cache."""

    def __init__(self, files: list[str], fail: Exception | None = None) -> None:
        super().__init__("huggingface_hub")
        self.files, self.fail, self.calls = files, fail, []  # type: list[tuple[str, Any]]

    def list_repo_files(self, repo: str, revision: str | None = None) -> list[str]:
        self.calls.append(("list_repo_files", (repo, revision)))
        if self.fail is not None:
            raise self.fail
        return self.files

    def snapshot_download(self, repo: str, **kw: Any) -> str:
        self.calls.append(("snapshot_download", (repo, kw)))
        tensors = family_tensors(SHAPES, 0, seed=1, dtype=torch.float16)[0]
        cache = Path(kw["cache_dir"])
        shutil.rmtree(cache / ("models--" + repo.replace("/", "--")) / "snapshots" / SHA2, ignore_errors=True)
        return str(cache_model(cache, repo, SHA2, tensors, (kw["revision"] or "main",)))


@pytest.mark.parametrize(
    ("files", "weights"),
    [
        (["config.json", "model-00001-of-00002.safetensors", "consolidated.safetensors", "pytorch_model.bin"], "model*.safetensors"),
        (["config.json", "weights.safetensors", "pytorch_model.bin"], "*.safetensors"),
        (["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"], "pytorch_model*.bin"),
    ],
)  # fmt: skip
def test_download_prefers_safetensors(tmp_path: Path, files: list[str], weights: str) -> None:
    hf = FakeHub(files)
    folder = fetch(hf, "org/new", "v1", tmp_path / "hub")
    assert folder == tmp_path / "hub" / "models--org--new" / "snapshots" / SHA2
    assert hf.calls == [
        ("list_repo_files", ("org/new", "v1")),
        (
            "snapshot_download",
            ("org/new", {"revision": "v1", "cache_dir": tmp_path / "hub", "allow_patterns": [weights, *SIDE_PATTERNS]}),
        ),
    ]


def test_a_missing_model_is_downloaded_then_read(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    hf = FakeHub(["config.json", "model.safetensors"])
    monkeypatch.setitem(sys.modules, "huggingface_hub", hf)
    with caplog.at_level(logging.WARNING):
        folder = resolve_model("org/new", tmp_path, HubCache(cache))
    assert folder == cache / "models--org--new" / "snapshots" / SHA2 and open_checkpoint(folder).tensors
    assert [c[0] for c in hf.calls] == ["list_repo_files", "snapshot_download"]
    assert caplog.messages == [f"org/new: downloading into {cache}"]
    assert resolve_model("org/new", tmp_path, HubCache(cache, download=False)) == folder  # cached now
    hf.calls.clear()
    (folder / "model.safetensors").unlink()  # a partial snapshot is completed first
    assert resolve_model("org/new", tmp_path, HubCache(cache)) == folder and len(hf.calls) == 2
    failing = FakeHub([], fail=OSError("Connection refused\n  by the host"))
    monkeypatch.setitem(sys.modules, "huggingface_hub", failing)
    with pytest.raises(SpecError) as e:
        resolve_model("org/other", tmp_path, HubCache(cache))
    assert str(e.value) == (
        f"org/other: no such local folder, nor snapshot in the Hugging Face cache {cache}, and the download failed (Connection refused by the host); "
        "check the name, or run `hf download org/other`"
    )


def test_a_local_path_wins_over_a_hub_id(cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    local = tmp_path / "org" / "ft"
    local.mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        assert resolve_model("org/ft", tmp_path, HubCache(cache)) == local
    assert caplog.messages == [
        f"org/ft: reading the local folder {local}, not the Hub model in {cache} (a local path wins)"
    ]


def test_cache_folder_from_the_environment(tmp_path: Path) -> None:
    home = Path("~").expanduser()
    assert hub_cache({}) == HubCache(home / ".cache" / "huggingface" / "hub", download=True)
    assert hub_cache({"XDG_CACHE_HOME": "/x"}).folder == Path("/x/huggingface/hub")
    assert hub_cache({"HF_HOME": "/h", "XDG_CACHE_HOME": "/x"}).folder == Path("/h/hub")
    assert hub_cache({"HF_HUB_CACHE": "/c", "HF_HOME": "/h"}).folder == Path("/c")
    assert hub_cache({"HF_HUB_OFFLINE": "1"}).download is False


def test_merge_hub_ids_by_flags_and_yaml(cache: Path, tmp_path: Path) -> None:
    """The command reads HF_HUB_CACHE; flags and YAML name Hub ids (with @revision and :WEIGHT)
    and merge what their snapshot folders hold; the card names the ids."""
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    flags = ["merge", "--method", "task_arithmetic", "--base", "org/base", "--model", "org/ft:0.5"]
    by_flags = CliRunner().invoke(main, [*flags, "--model", "org/ft@v2:0.25", str(tmp_path / "a")], env=env)
    assert by_flags.exit_code == 0, by_flags.output
    config = tmp_path / "merge.yml"
    config.write_text(
        "merge_method: task_arithmetic\nbase_model: org/base\nmodels:\n  - model: org/ft\n    parameters: {weight: 0.5}\n"
        f"  - model: org/ft@{SHA2[:7]}\n    parameters: {{weight: 0.25}}\n"
    )
    by_yaml = CliRunner().invoke(main, ["merge", str(config), str(tmp_path / "b")], env=env)
    assert by_yaml.exit_code == 0, by_yaml.output
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    card = (tmp_path / "a" / "README.md").read_text()
    assert card.startswith("---\nbase_model:\n- org/base\n- org/ft\nlibrary_name: transformers\n"), card
    for line in (
        f"onto the base model org/base@{SHA1}.",
        f"* org/ft@{SHA1}",
        f"* org/ft@{SHA2}",
        f"model: org/ft@{SHA2}",
    ):
        assert line in card, line
    spec = load_config(tmp_path / "a" / "mergekit_config.yml", hub=HubCache(cache, download=False))
    assert spec.base == cache / "models--org--base" / "snapshots" / SHA1
    missing = CliRunner().invoke(main, [*flags[:-2], "--model", "org/nothing", str(tmp_path / "c")], env=env)
    assert missing.exit_code == 1 and missing.stderr.strip().splitlines() == [
        f"Error: --model: org/nothing: no such local folder, nor snapshot in the Hugging Face cache {cache} (downloads are off: HF_HUB_OFFLINE); "
        "run `hf download org/nothing` with a network"
    ]
    assert not (tmp_path / "c").exists()


def test_inspect_takes_hub_ids(cache: Path) -> None:
    """`inspect` reads Hub ids from the cache as merge does: each id its snapshot (a revision
    too), compared with the first; an id in no cache is the merge's one line, exit 1."""
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = CliRunner().invoke(main, ["inspect", "--json", "org/base", "org/ft", "org/ft@v2"], env=env)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    snaps = [cache / "models--org--base" / "snapshots" / SHA1, *(cache / "models--org--ft" / "snapshots" / c for c in (SHA1, SHA2))]  # fmt: skip
    assert doc["base"] == str(snaps[0]) and [m["path"] for m in doc["models"]] == [str(s) for s in snaps]
    assert [c["homologous"] for c in doc["comparisons"]] == [True, True]
    missing = CliRunner().invoke(main, ["inspect", "org/base", "org/nothing"], env=env)
    assert missing.exit_code == 1 and missing.stderr.strip().splitlines() == [
        f"Error: org/nothing: no such local folder, nor snapshot in the Hugging Face cache {cache} (downloads are off: HF_HUB_OFFLINE); "
        "run `hf download org/nothing` with a network"
    ]
