"""Fused kernels: built once into the kernel cache, loaded by later merges, same bytes as eager."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from test_dare import dare_spec

from engine import aot
from engine.kernels import CompiledApply
from engine.methods.base import Chunk, Method, TensorParams
from engine.methods.registry import get_method
from engine.rng import KeyedRng, stream_key

Example = tuple[Method, TensorParams, Chunk, torch.Tensor, list[torch.Tensor]]


def example(density: float, n: int = 5000, start: int = 12345) -> Example:
    """A 2-model dare_ties chunk in bf16; `density` picks the kernel (it is a constant in it)."""
    method = get_method("dare_ties")
    spec = dare_spec("dare_ties", Path("b"), [Path("m1"), Path("m2")], [0.7, 0.4], [density, 0.5], normalize=True)
    g = torch.Generator().manual_seed(start)
    base, *models = (torch.randn(n, generator=g).to(torch.bfloat16) for _ in range(3))
    streams = tuple(KeyedRng(stream_key(0, "t", m)) for m in range(2))
    return method, spec.tensor_params(), Chunk(streams, start, 1 << 20), base, models


def eager(method: Method, p: TensorParams, c: Chunk, base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    return method.apply(base.float(), [m.float() for m in models], p, {}, c).to(torch.bfloat16)


def dtypes_of(base: torch.Tensor, models: list[torch.Tensor]) -> aot.Dtypes:
    return (base.dtype, *(m.dtype for m in models), base.dtype)


@pytest.mark.slow
@pytest.mark.skipif(not aot.supported(), reason="this torch cannot load AOTInductor packages")
def test_kernel_is_built_once_then_loaded_from_the_cache(caplog: pytest.LogCaptureFixture) -> None:
    """A damaged package is rebuilt; the next instance (the next merge) loads the kernel on its
    first chunk without compiling anything, for chunks of any length and position."""
    method, p, c, base, models = example(density=0.3)
    path = aot.kernel_path(method, p, dtypes_of(base, models))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a package")
    first = CompiledApply(method)
    out = torch.empty_like(base)
    with caplog.at_level(logging.WARNING):
        assert first.run(base, models, p, {}, c, out)  # not behind: the first chunk waits for the build
    assert "cannot load the cached kernel" in caplog.text
    assert torch.equal(out, eager(method, p, c, base, models))
    assert aot.load(path) is not None

    later = CompiledApply(method, behind=True)
    for n, start in [(5000, 99), (7, 2**32 + 5), (4096, 2**40)]:  # chunks never cross 2**32
        _, _, c2, base2, models2 = example(density=0.3, n=n, start=start)
        out = torch.empty_like(base2)
        assert later.run(base2, models2, p, {}, c2, out)
        assert torch.equal(out, eager(method, p, c2, base2, models2))
    assert later._worker is None  # nothing was compiled


@pytest.mark.slow
def test_kernel_built_in_the_background_declines_until_ready() -> None:
    """`--compile auto` merges eagerly while the kernel builds behind; once ready it takes over
    with the same bytes."""
    method, p, c, base, models = example(density=0.35)
    kernel = CompiledApply(method, behind=True)
    out = torch.empty_like(base)
    assert not kernel.run(base, models, p, {}, c, out)  # building: the caller merges eagerly
    assert not kernel.run(base, models, p, {}, c, out)  # asked once; still building or ready
    kernel.wait()
    assert kernel.run(base, models, p, {}, c, out)
    assert torch.equal(out, eager(method, p, c, base, models))
    kernel.close()
    assert kernel._worker is not None and not kernel._worker.is_alive()


def test_kernel_path_names_everything_the_code_depends_on() -> None:
    """Different parameters, dtypes or methods never share a kernel; the same ones always do."""
    method, p, _, base, models = example(density=0.3)
    bf16 = dtypes_of(base, models)
    path = aot.kernel_path(method, p, bf16)
    assert path == aot.kernel_path(method, example(density=0.3)[1], bf16)
    others = {
        aot.kernel_path(method, example(density=0.31)[1], bf16),
        aot.kernel_path(method, p, (torch.float16, *bf16[1:])),
        aot.kernel_path(method, p, (*bf16[:-1], torch.float32)),
        aot.kernel_path(get_method("dare_linear"), p, bf16),
    }
    assert path not in others and len(others) == 4
    assert path.parent == aot.cache_root()


def test_one_element_chunks_and_a_close_with_nothing_built() -> None:
    """A chunk too short for the kernel's dynamic dimension runs eager without asking for a
    kernel; closing an instance that never built anything is a no-op."""
    method, p, c, base, models = example(density=0.3, n=1)
    kernel = CompiledApply(method, behind=True)
    assert not kernel.run(base, models, p, {}, c, torch.empty_like(base))
    assert kernel._worker is None
    kernel.close()
    kernel.close(wait=False)


def test_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(aot.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert aot.cache_root() == tmp_path / "leanmerge" / "kernels"
    monkeypatch.setenv(aot.CACHE_ENV, str(tmp_path / "k"))
    assert aot.cache_root() == tmp_path / "k"
