"""The project's shape: names other modules import keep working after a module is split, the
pieces split out import only downward (STYLE.md: no two files that import each other), and a
hung test fails the run with every stack."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parent.parent / "engine"

# old module -> (names importers use, the modules split out of it)
SPLITS = {
    "execute": (
        ("Event", "OnEvent", "Pipeline", "execute", "execute_rows", "first_rows", "read_schedule", "tensor_stats"),
        ("pipeline", "prefetch", "stage"),
    ),
    "config": (("MAX_CONFIG_BYTES", "MAX_LIST_ITEMS", "MAX_NODES", "load_config"), ("config_yaml",)),
    "rng": (("KeyedRng", "keep_threshold", "stream_key"), ("rng_hash",)),
}


def _engine_imports(module: str) -> set[str]:
    """The `engine.*` modules `engine/<module>.py` imports, at any depth of its code."""
    tree = ast.parse((ENGINE / f"{module}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("engine"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names if node.module == "engine")
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("engine"))
    return out


@pytest.mark.parametrize("old", sorted(SPLITS))
def test_split_module_keeps_its_public_names(old: str) -> None:
    module = __import__(f"engine.{old}", fromlist=["_"])
    names, _ = SPLITS[old]
    assert [n for n in names if not hasattr(module, n)] == []
    assert set(names) <= set(module.__all__)


@pytest.mark.parametrize("old", sorted(SPLITS))
def test_split_out_pieces_do_not_import_their_old_module(old: str) -> None:
    _, pieces = SPLITS[old]
    back = {p: sorted(m for m in _engine_imports(p) if m == f"engine.{old}") for p in pieces}
    assert back == {p: [] for p in pieces}


def test_split_pieces_stay_under_the_module_guide() -> None:
    """STYLE.md: modules under about 400 lines (the split ones were 489-553)."""
    pieces = [p for old, (_, split) in SPLITS.items() for p in (old, *split)]
    long = {p: n for p in pieces if (n := len((ENGINE / f"{p}.py").read_text().splitlines())) > 430}
    assert long == {}


def test_a_hung_test_fails_with_every_stack(pytestconfig: pytest.Config, tmp_path: Path) -> None:
    """The project's pytest settings turn a hang into a failed run that prints every thread's
    stack (the hung test named in it), not a wait until CI's limit: tried on a test that sleeps."""
    assert float(pytestconfig.getini("faulthandler_timeout")) > 0
    assert pytestconfig.getini("faulthandler_exit_on_timeout") is True
    (tmp_path / "test_sleeps.py").write_text("import time\n\n\ndef test_sleeps_forever():\n    time.sleep(120)\n")
    ini = Path(__file__).resolve().parent.parent / "pyproject.toml"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(ini), "-p", "no:cacheprovider", "-o", "faulthandler_timeout=1",
         str(tmp_path / "test_sleeps.py")],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode != 0
    assert "Timeout (0:00:01)!" in run.stderr and "in test_sleeps_forever" in run.stderr, run.stderr
