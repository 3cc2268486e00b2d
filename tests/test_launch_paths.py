"""The two driver bindings a launch can go through (CuPy's Cython `launchKernel`, or ctypes where CuPy's is
missing) both launch correctly and turn a driver error into a RuntimeError, not a crash. GPU only."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from merge_utils import gpu, make_case, requires_cuda, run_and_check

import cupy_ops
from cupy_ops._runtime import launcher
from cupy_ops.ops import merge_attn_states as mas

pytestmark = [gpu, requires_cuda]


@pytest.fixture(params=["cupy", "ctypes"])
def binding(request, monkeypatch) -> list:
    """Every launch in the test goes through one binding, recorded; returns the record."""
    launcher.cupy_binding_ready()  # an import started by an earlier launch must not switch bindings mid-test
    monkeypatch.setattr(launcher, "_start_cupy_binding_import", lambda: None)
    launches = []
    if request.param == "cupy":
        cupy_binding = pytest.importorskip("cupy_backends.cuda.api.driver").launchKernel

        def recording(*args):
            launches.append(args)
            return cupy_binding(*args)

        monkeypatch.setattr(launcher, "cupy_launch_kernel", recording)
    else:
        launch_ex = launcher._libcuda().cuLaunchKernelEx

        def recording(*args):
            launches.append(args)
            return launch_ex(*args)

        monkeypatch.setattr(launcher, "cupy_launch_kernel", None)
        monkeypatch.setattr(launcher, "cu_launch_kernel_ex", recording)
    monkeypatch.setattr(mas, "_layouts", {})
    monkeypatch.setattr(mas, "_recent_layout", None)
    return launches


def test_both_bindings_launch_the_checked_and_the_cached_path(binding):
    run_and_check(make_case(37, 8, 128, torch.bfloat16, "cuda", seed=1))  # validated, then remembered
    run_and_check(make_case(37, 8, 128, torch.bfloat16, "cuda", seed=2))  # the cached layout's launch
    assert len(binding) == 2


def test_a_driver_error_is_a_runtime_error(binding):
    """Too many threads per block: the driver refuses the launch (nothing runs); the op's error names it."""
    case = make_case(4, 2, 64, torch.float32, "cuda")
    cupy_ops.merge_attn_states(*case.args())  # compile and load
    function = next(iter(mas._layouts.values()))[4]
    stream = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())
    with pytest.raises(RuntimeError, match="cupy_ops: kernel launch failed: .*INVALID_VALUE"):
        launcher.launch(function, torch.cuda.current_device(), 1, 2048, 1, stream, mas._PARAMS,
                        (0, 0, 0, 0, 0, 0, 0, 0, bytes(mas._LAYOUT_TAIL.size)))
    torch.cuda.synchronize()  # the context is still usable


_CAPTURE_WHILE_IMPORTING = """
import torch
import cupy_ops
from cupy_ops._runtime import launcher
from cupy_ops.testing import mismatch

n, h, d = 64, 8, 128
prefix = torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16)
suffix = torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16)
prefix_lse = torch.randn(h, n, device="cuda")
suffix_lse = torch.randn(h, n, device="cuda")
output = torch.empty_like(prefix)
output_lse = torch.empty(h, n, device="cuda")
args = (output, output_lse, prefix, prefix_lse, suffix, suffix_lse)
launcher._CUPY_IMPORT_DELAY_S = 0.0  # import at once: the capture below then overlaps it
cupy_ops.merge_attn_states(*args)  # the process's first launch: starts importing CuPy's binding
torch.cuda.synchronize()
importing = launcher._cupy_import.is_alive()
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):  # global capture mode: a CUDA call from the import thread would break it
    cupy_ops.merge_attn_states(*args)
output.fill_(float("nan"))
output_lse.fill_(float("nan"))
graph.replay()
expected, expected_lse = cupy_ops.merge_attn_states_ref(prefix, prefix_lse, suffix, suffix_lse)
torch.cuda.synchronize()
assert mismatch(output, expected, torch.bfloat16) is None, mismatch(output, expected, torch.bfloat16)
assert mismatch(output_lse, expected_lse, torch.float32) is None
print("importing during capture:", importing, "binding ready:", launcher.cupy_binding_ready(timeout=120))
"""


def test_capture_while_cupys_binding_is_imported(subprocess_env):
    """A fresh process with a warm kernel cache (no NVRTC, so nothing imported CuPy): its first launch starts
    the background import of CuPy's binding (without the usual delay), and a CUDA graph captured right after
    (torch's global capture mode) neither fails nor misses the launch."""
    for _ in range(2):  # the first child fills the kernel cache; the second is the test
        child = subprocess.run([sys.executable, "-c", _CAPTURE_WHILE_IMPORTING], env=subprocess_env,
                               capture_output=True, text=True, timeout=300, check=False)
        assert child.returncode == 0, child.stderr[-2000:]
    assert "binding ready: True" in child.stdout, child.stdout
