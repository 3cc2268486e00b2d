"""Fixtures shared by the test suite (plain helpers are in helpers.py), and a one-line-per-reason summary of
skipped tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cupy_ops._runtime import compiler

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def isolated_kernel_cache(tmp_path_factory):
    """Every test compiles into a fresh disk cache: nothing is read from, or left in, the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUPY_OPS_CACHE_DIR", str(tmp_path_factory.mktemp("kernel-cache")))
        compiler.clear_memory_cache()
        yield
    compiler.clear_memory_cache()


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    """An empty cache folder (not created yet) as CUPY_OPS_CACHE_DIR, and an empty in-memory cache."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("CUPY_OPS_CACHE_DIR", str(folder))
    compiler.clear_memory_cache()
    yield folder
    compiler.clear_memory_cache()


@pytest.fixture
def nvrtc_calls(monkeypatch) -> list:
    """Records every NVRTC compilation made in this process (the call still compiles)."""
    calls = []
    real = compiler._nvrtc_compile

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(compiler, "_nvrtc_compile", counting)
    return calls


@pytest.fixture
def subprocess_env(fresh_cache) -> dict:
    """Environment for a child `python` that imports this checkout's cupy_ops and shares `fresh_cache`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["CUPY_OPS_CACHE_DIR"] = str(fresh_cache)
    return env


@pytest.fixture(scope="session")
def vllm_ops():
    """vLLM 0.33's compiled ops (`torch.ops._C`) from the anchor library named by $CUPY_OPS_VLLM_ANCHOR, for GPU
    cross-checks; the test skips when it is unset or does not load (the anchor is never a dependency)."""
    from cupy_ops._bench.harness import try_load_vllm

    path = os.environ.get("CUPY_OPS_VLLM_ANCHOR")
    if not path:
        pytest.skip("CUPY_OPS_VLLM_ANCHOR is not set (vLLM's anchor library for cross-checks)")
    ops, error = try_load_vllm(path)
    if ops is None:
        pytest.skip(f"vLLM anchor did not load: {error}")
    return ops


def pytest_terminal_summary(terminalreporter):
    """Skips summed up by reason, one line each (e.g. "355 skipped: needs a CUDA GPU"), instead of a line per
    test and place."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{count} skipped: {reason}")
