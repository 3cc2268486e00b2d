"""The two driver bindings a launch can go through (CuPy's Cython `launchKernel`, or ctypes where CuPy's is
missing) both launch correctly and turn a driver error into a RuntimeError, not a crash. GPU only."""

from __future__ import annotations

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
    launches = []
    if request.param == "cupy":
        cupy_binding = pytest.importorskip("cupy_backends.cuda.api.driver").launchKernel

        def recording(*args):
            launches.append(args)
            return cupy_binding(*args)

        monkeypatch.setattr(launcher, "cupy_launch_kernel", recording)
        monkeypatch.setattr(launcher, "bind_cupy_launch_kernel", lambda: recording)
    else:
        launch_ex = launcher._libcuda().cuLaunchKernelEx

        def recording(*args):
            launches.append(args)
            return launch_ex(*args)

        monkeypatch.setattr(launcher, "cupy_launch_kernel", None)
        monkeypatch.setattr(launcher, "bind_cupy_launch_kernel", lambda: None)
        monkeypatch.setattr(launcher, "cu_launch_kernel_ex", recording)
    monkeypatch.setattr(mas, "_layouts", {})
    return launches


def test_both_bindings_launch_the_checked_and_the_cached_path(binding):
    run_and_check(make_case(37, 8, 128, torch.bfloat16, "cuda", seed=1))  # validated, then remembered
    run_and_check(make_case(37, 8, 128, torch.bfloat16, "cuda", seed=2))  # the cached layout's launch
    assert len(binding) == 2


def test_a_driver_error_is_a_runtime_error(binding):
    """Too many threads per block: the driver refuses the launch (nothing runs); the op's error names it."""
    case = make_case(4, 2, 64, torch.float32, "cuda")
    cupy_ops.merge_attn_states(*case.args())  # compile and load
    function = next(iter(mas._layouts.values()))[2]
    stream = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())
    with pytest.raises(RuntimeError, match="cupy_ops: kernel launch failed: .*INVALID_VALUE"):
        launcher.launch(function, torch.cuda.current_device(), 1, 2048, 1, stream, mas._PARAMS,
                        (0, 0, 0, 0, 0, 0, 0, 0, bytes(mas._LAYOUT_TAIL.size)))
    torch.cuda.synchronize()  # the context is still usable
