"""The launcher calls libcuda through ctypes, so no header picks the ABI version of each entry point for it.

cuda.h `#define`s some names to a newer ABI (cuCtxPushCurrent -> cuCtxPushCurrent_v2); calling the bare symbol
reaches the legacy ABI, which fails at run time (CUDA_ERROR_INVALID_CONTEXT) on a GPU only. This CPU test reads
the pip wheel's cuda.h and checks that every driver function the launcher names is the one cuda.h would pick.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cupy_ops._runtime import compiler, launcher

# Names cuda.h maps to per-thread-default-stream variants only under CUDA_API_PER_THREAD_DEFAULT_STREAM, which
# we do not use: the launcher always passes an explicit stream.
_PER_THREAD_STREAM_ONLY = {"cuLaunchKernel", "cuLaunchKernelEx"}


def _cuda_h() -> str:
    path = Path(compiler.cuda_include_dir()) / "cuda.h"
    if not path.is_file():
        pytest.skip(f"no cuda.h beside the NVRTC headers ({path})")
    return path.read_text(errors="replace")


def test_launcher_calls_the_abi_version_cuda_h_selects():
    header = _cuda_h()
    renamed = dict(re.findall(r"^\s*#\s*define\s+(cu[A-Za-z0-9]+)\s+(cu[A-Za-z0-9]+_v\d+)\b", header, re.M))
    assert "cuCtxPushCurrent" in renamed, "cuda.h layout changed: this test no longer reads its renames"
    used = set(re.findall(r"\.(cu[A-Z][A-Za-z0-9_]+)\b", Path(launcher.__file__).read_text()))
    assert used, "found no driver calls in launcher.py"
    stale = sorted(name for name in used if name in renamed and name not in _PER_THREAD_STREAM_ONLY)
    assert not stale, f"launcher.py calls legacy ABI symbols; use {[renamed[n] for n in stale]}"
    declared = set(re.findall(r"\b(cu[A-Z][A-Za-z0-9_]+)\s*\(", header))
    unknown = sorted(used - declared - set(renamed.values()))
    assert not unknown, f"launcher.py calls driver functions cuda.h does not declare: {unknown}"
