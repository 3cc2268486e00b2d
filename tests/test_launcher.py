"""The launcher, checked without a GPU (libcuda replaced by a fake driver): cuLaunchKernelEx gets the
CUlaunchConfig cuda.h lays out (3-D grid and block, dynamic shared memory, stream, cluster and programmatic
dependent launch attributes), a
thread's first launch makes a context current only where none is, threads pack into their own buffers, dynamic
shared memory above 48 KiB is opted in once, a driver error becomes a RuntimeError naming it, and memset goes to
cuMemsetD8Async on the given stream."""

from __future__ import annotations

import ctypes
import struct
import threading
import time

import pytest

from cupy_ops._runtime import launcher
from cupy_ops._runtime.launcher import Kernel, LaunchConfig

PARAMS = struct.Struct("<2Q")
# CUlaunchConfig (cuda.h): gridDimX..blockDimZ, sharedMemBytes (uint32), padding, hStream, attrs, numAttrs.
CONFIG = struct.Struct("<7I4xQQI")
# CUlaunchAttribute: id, padding, then the 64-byte value union (clusterDim x, y, z first; or one int).
ATTRIBUTE = struct.Struct("<I4x3I52x")
INVALID_VALUE, INVALID_CONTEXT, INVALID_HANDLE, FUNCTION = 1, 201, 400, 0xF00D


class FakeDriver:
    """Just enough of libcuda: a per-thread current context (and a stack of pushed ones), function attributes,
    cuLaunchKernelEx and cuMemsetD8Async recording what they were given, or failing as the driver would (FUNCTION
    and the streams belong to device 0's context, 0xC0)."""

    def __init__(self):
        self.local = threading.local()
        self.launches, self.set_current, self.attributes, self.memsets = [], [], [], []
        self.pushed = []
        self.refused = 0  # launches refused for want of a current context (compute-sanitizer counts each one)
        self.fail_with = None

    def cuCtxGetCurrent(self, out):  # noqa: N802 - the driver's names
        ctypes.cast(out, ctypes.POINTER(ctypes.c_void_p))[0] = getattr(self.local, "context", None)
        return 0

    def cuCtxSetCurrent(self, context):  # noqa: N802
        self.local.context = context.value
        self.set_current.append((threading.get_ident(), context.value))
        return 0

    def cuCtxPushCurrent_v2(self, context):  # noqa: N802
        self.pushed.append(getattr(self.local, "context", None))
        self.local.context = context.value
        return 0

    def cuCtxPopCurrent_v2(self, out):  # noqa: N802
        self.local.context = self.pushed.pop() if self.pushed else None
        return 0

    def cuFuncSetAttribute(self, function, attribute, value):  # noqa: N802
        self.attributes.append((function.value, attribute, value))
        return 0

    def cuFuncGetAttribute(self, out, attribute, function):  # noqa: N802 - static shared memory: 8 KiB
        ctypes.cast(out, ctypes.POINTER(ctypes.c_int))[0] = 8192 if attribute == 1 else 0
        return 0

    def cuGetErrorName(self, status, out):  # noqa: N802 - unknown here: the launcher then says "CUresult <n>"
        return 1

    def cuMemsetD8Async(self, pointer, value, nbytes, stream):  # noqa: N802
        if getattr(self.local, "context", 0xC0) not in (None, 0xC0):  # the stream is device 0's
            return INVALID_HANDLE
        self.memsets.append((pointer.value, value.value, nbytes.value, stream.value))
        return 0

    def cuLaunchKernelEx(self, config, function, kernel_params, extra) -> int:  # noqa: N802
        if self.fail_with is not None:
            return self.fail_with
        if getattr(self.local, "context", None) is None:
            self.refused += 1
            return INVALID_CONTEXT
        if self.local.context != 0xC0:  # another device's context: not this function's
            return INVALID_HANDLE
        time.sleep(0)  # let other threads run here, as the real call releases the GIL in the driver
        params = ctypes.string_at(kernel_params[0], PARAMS.size)
        fields = CONFIG.unpack_from(config)
        raw = ctypes.string_at(fields[8], ATTRIBUTE.size * fields[9]) if fields[9] else b""
        attributes = tuple(ATTRIBUTE.unpack_from(raw, ATTRIBUTE.size * i) for i in range(fields[9]))
        self.launches.append((threading.get_ident(), function.value, fields[:8], fields[9], attributes, params))
        return 0


@pytest.fixture
def driver(monkeypatch):
    fake = FakeDriver()
    monkeypatch.setattr(launcher, "_libcuda", lambda: fake)
    monkeypatch.setattr(launcher, "_cu_launch_kernel_ex", fake.cuLaunchKernelEx)
    monkeypatch.setattr(launcher, "_primary_context", lambda device: ctypes.c_void_p(0xC0 + device))
    monkeypatch.setattr(launcher, "device_attribute", lambda device, name: 227 * 1024)
    monkeypatch.setattr(Kernel, "function", lambda self, device: FUNCTION)
    monkeypatch.setattr(launcher, "_buffers", launcher._Buffers())  # no thread has launched yet
    return fake


def _launch(config: LaunchConfig, values=(1, 2), stream=0x5EA):
    launcher.Launcher(Kernel("k.cu", "k"), 0, config).launch(stream, PARAMS.pack_into, values)


def test_config_is_packed_as_cuda_h_lays_it_out(driver):
    driver.local.context = 0xC0
    _launch(LaunchConfig((3, 4, 5), (32, 2, 1), 1024), (0xAB, 0xCD))
    (_, function, head, count, attributes, params), = driver.launches
    assert function == FUNCTION and head == (3, 4, 5, 32, 2, 1, 1024, 0x5EA) and count == 0 and attributes == ()
    assert PARAMS.unpack(params) == (0xAB, 0xCD)


def test_cluster_goes_as_a_launch_attribute(driver):
    driver.local.context = 0xC0
    _launch(LaunchConfig((8, 1, 1), (128, 1, 1), 0, (4, 1, 1)))
    (*_, count, attributes, _), = driver.launches
    assert count == 1 and attributes == ((4, 4, 1, 1),)  # CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION = 4


@pytest.mark.parametrize("cluster", [None, (2, 1, 1)])
def test_dependent_launch_goes_as_a_launch_attribute(driver, cluster):
    """LaunchConfig.dependent: CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION (6) with value 1, after the
    cluster's attribute when there is one."""
    driver.local.context = 0xC0
    _launch(LaunchConfig((8, 1, 1), (128, 1, 1), 0, cluster, dependent=True))
    (*_, count, attributes, _), = driver.launches
    expected = ((6, 1, 0, 0),) if cluster is None else ((4, 2, 1, 1), (6, 1, 0, 0))
    assert count == len(expected) and attributes == expected


def test_non_portable_cluster_size_is_allowed_on_the_function(driver):
    driver.local.context = 0xC0
    _launch(LaunchConfig((16, 1, 1), (128, 1, 1), 0, (16, 1, 1)))
    assert (FUNCTION, 14, 1) in driver.attributes  # CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED


def test_dynamic_shared_memory_is_opted_in_once_per_size(driver):
    """Any dynamic shared memory is opted in (the default limit is 48 KiB minus the kernel's static shared memory,
    8 KiB here: 44 KiB of dynamic memory would fail without it), once per larger size."""
    driver.local.context = 0xC0
    kernel = Kernel("k.cu", "k")
    for nbytes in (0, 44 * 1024, 100 * 1024, 100 * 1024, 64 * 1024):
        launcher.Launcher(kernel, 0, LaunchConfig((1, 1, 1), (32, 1, 1), nbytes))
    assert driver.attributes == [(FUNCTION, 8, 44 * 1024), (FUNCTION, 8, 100 * 1024)]  # MAX_DYNAMIC_SHARED_SIZE
    with pytest.raises(ValueError, match="asks for 225280 bytes of dynamic shared memory besides 8192 static; this "
                                         "GPU allows 232448 in all"):
        launcher.Launcher(kernel, 0, LaunchConfig((1, 1, 1), (32, 1, 1), 220 * 1024))


def test_first_launch_of_a_thread_without_a_context_makes_one_current(driver):
    """Before its first launch, not after a refused one: compute-sanitizer reports every refused call."""
    _launch(LaunchConfig((1, 1, 1), (32, 1, 1)))
    assert driver.set_current == [(threading.get_ident(), 0xC0)] and len(driver.launches) == 1
    assert driver.refused == 0
    _launch(LaunchConfig((1, 1, 1), (32, 1, 1)))
    assert len(driver.set_current) == 1 and len(driver.launches) == 2


def test_a_driver_error_is_raised_with_its_status(driver):
    driver.local.context = 0xC0
    driver.fail_with = INVALID_VALUE
    with pytest.raises(launcher.DriverError, match="kernel launch .* failed: CUresult 1") as info:
        _launch(LaunchConfig((1, 1, 1), (32, 1, 1)))
    assert info.value.status == INVALID_VALUE


def test_threads_pack_their_own_params(driver):
    """8 threads launch 50 times each with their own values at once: each launch carries its own thread's."""
    barrier = threading.Barrier(8)

    def launch_many(k: int) -> None:
        barrier.wait()
        for i in range(50):
            _launch(LaunchConfig((1, 1, 1), (32, 1, 1)), (k, i))

    threads = [threading.Thread(target=launch_many, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    by_thread = {}
    for ident, *_, params in driver.launches:
        by_thread.setdefault(ident, []).append(PARAMS.unpack(params))
    assert sorted(len(v) for v in by_thread.values()) == [50] * 8
    for values in by_thread.values():
        assert len({k for k, _ in values}) == 1 and [i for _, i in values] == list(range(50))


def test_memset_is_ordered_on_the_stream(driver):
    launcher.memset_async(0x1000, 0, 3088 * 4, 0x5EA, 0)
    launcher.memset_async(0x2000, 7, 0, 0x5EA, 0)  # nothing to set: no call
    assert driver.memsets == [(0x1000, 0, 3088 * 4, 0x5EA)]


def test_a_context_released_later_is_made_current_again(driver):
    launcher_ = launcher.Launcher(Kernel("k.cu", "k"), 0, LaunchConfig((1, 1, 1), (32, 1, 1)))
    launcher_.launch(0x5EA, PARAMS.pack_into, (1, 2))
    driver.local.context = None  # other code popped this thread's context
    launcher_.launch(0x5EA, PARAMS.pack_into, (3, 4))
    assert driver.refused == 1 and len(driver.launches) == 2


def test_another_devices_context_current_is_pushed_over_for_the_launch(driver):
    """torch can report device 0 as current while device 1's context is current in the thread (a device index it
    set lazily): the failed launch and memset are retried with device 0's context pushed, and the thread's
    context is left as it was."""
    driver.local.context = 0xC1
    _launch(LaunchConfig((1, 1, 1), (32, 1, 1)))
    launcher.memset_async(0x1000, 0, 64, 0x5EA, 0)
    assert len(driver.launches) == 1 and driver.memsets == [(0x1000, 0, 64, 0x5EA)]
    assert driver.local.context == 0xC1 and driver.pushed == [] and driver.set_current == []


def test_an_error_in_the_right_context_is_raised_without_a_retry(driver):
    driver.local.context = 0xC0
    driver.fail_with = INVALID_HANDLE
    with pytest.raises(launcher.DriverError, match="CUresult 400"):
        _launch(LaunchConfig((1, 1, 1), (32, 1, 1)))
    assert driver.pushed == [] and driver.set_current == []
