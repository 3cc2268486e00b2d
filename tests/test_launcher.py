"""The launcher, checked without a GPU (libcuda and the driver binding replaced by fakes): a thread's first launch
makes a context current only where none is, every thread packs into its own params buffer, a driver error
becomes a RuntimeError naming it, and launches go through ctypes until CuPy is imported, then CuPy's binding."""

from __future__ import annotations

import ctypes
import struct
import sys
import threading
import time

import pytest

from cupy_ops._runtime import launcher

PARAMS = struct.Struct("<2Q")
INVALID_VALUE, INVALID_CONTEXT = 1, 201


class FakeDriver:
    """cuCtxGetCurrent/cuCtxSetCurrent on a per-thread current context, and a cuLaunchKernel binding that
    records (thread, function, params bytes) or raises like CuPy's binding when no context is current."""

    def __init__(self):
        self.local = threading.local()
        self.launches, self.set_current = [], []
        self.fail_with = None

    def cuCtxGetCurrent(self, out):  # noqa: N802 - the driver's name
        ctypes.cast(out, ctypes.POINTER(ctypes.c_void_p))[0] = getattr(self.local, "context", None)
        return 0

    def cuCtxSetCurrent(self, context):  # noqa: N802
        self.local.context = context.value
        self.set_current.append((threading.get_ident(), context.value))
        return 0

    def launch(self, function, gx, gy, gz, bx, by, bz, shared, stream, kernel_params, extra):
        if self.fail_with is not None:
            raise _error(self.fail_with)
        if getattr(self.local, "context", None) is None:
            raise _error(INVALID_CONTEXT)
        time.sleep(0)  # let other threads run here, as the real launch releases the GIL during the driver call
        params_address = ctypes.c_void_p.from_address(kernel_params).value
        self.launches.append((threading.get_ident(), function, ctypes.string_at(params_address, PARAMS.size)))


def _error(status: int) -> Exception:
    error = RuntimeError(f"CUDA error {status}")
    error.status = status
    return error


@pytest.fixture
def driver(monkeypatch):
    fake = FakeDriver()
    monkeypatch.setattr(launcher, "_libcuda", lambda: fake)
    monkeypatch.setattr(launcher, "bind_launch_kernel", lambda: fake.launch)
    monkeypatch.setattr(launcher, "_primary_context", lambda device: ctypes.c_void_p(0x1000 + device))
    monkeypatch.setattr(launcher, "launch_buffers", launcher._LaunchBuffers())  # no thread has launched yet
    return fake


def _launch(function: int, device: int, values: tuple) -> None:
    launcher.launch(function, device, 1, 32, 1, 0, PARAMS, values)


def test_first_launch_in_a_thread_without_context_makes_the_devices_current(driver):
    thread = threading.Thread(target=_launch, args=(7, 1, (1, 2)))
    thread.start()
    thread.join()
    assert driver.set_current == [(thread.ident, 0x1001)]
    assert driver.launches == [(thread.ident, 7, PARAMS.pack(1, 2))]


def test_a_thread_with_a_current_context_keeps_it(driver):
    driver.local.context = 0x2000  # e.g. torch made its device's context current in this thread
    _launch(7, 0, (3, 4))
    _launch(7, 0, (5, 6))
    assert driver.set_current == []
    assert [params for _, _, params in driver.launches] == [PARAMS.pack(3, 4), PARAMS.pack(5, 6)]


def test_threads_pack_into_their_own_buffers(driver):
    """8 threads, 50 launches each, all at once: each launch carries its own thread's values."""
    barrier = threading.Barrier(8)

    def many(index: int) -> None:
        barrier.wait()
        for step in range(50):
            _launch(index, 0, (index, step))

    threads = [threading.Thread(target=many, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(driver.launches) == 400
    assert all(PARAMS.unpack(params)[0] == function for _, function, params in driver.launches)
    assert {PARAMS.unpack(params) for _, _, params in driver.launches} == {(i, s) for i in range(8) for s in range(50)}


@pytest.mark.parametrize("status", [INVALID_VALUE, INVALID_CONTEXT])
def test_a_driver_error_is_a_runtime_error(driver, status):
    driver.local.context = 0x2000
    _launch(7, 0, (1, 2))  # the thread's first launch succeeds
    driver.fail_with = status
    with pytest.raises(RuntimeError, match=f"cupy_ops: kernel launch failed: CUDA error {status}"):
        _launch(7, 0, (1, 2))


def test_ctypes_until_cupy_is_imported_then_cupys_binding(monkeypatch):
    cupy_binding = pytest.importorskip("cupy_backends.cuda.api.driver").launchKernel
    monkeypatch.setattr(launcher, "launch_kernel", launcher.ctypes_launch_kernel)
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    assert launcher.bind_launch_kernel() is launcher.ctypes_launch_kernel  # importing CuPy would cost 50-100 ms
    monkeypatch.setitem(sys.modules, "cupy", pytest.importorskip("cupy"))
    assert launcher.bind_launch_kernel() is cupy_binding
    assert launcher.launch_kernel is cupy_binding  # what the ops' inlined launches call


def test_ctypes_binding_packs_the_config_and_passes_handles_as_pointers(monkeypatch):
    """cuLaunchKernelEx through ctypes without argtypes: grid, block, shared bytes and stream packed in the
    CUlaunchConfig layout of cuda.h, the handles as c_void_p (a bare int would not pass a 64-bit address), this
    thread's own kernelParams as its array; a nonzero CUresult raises DriverError carrying it."""
    calls = []

    def record(config, *handles):
        calls.append((bytes(config), handles))
        return 0

    monkeypatch.setattr(launcher, "_cu_launch_kernel_ex", record)
    launcher.ctypes_launch_kernel(0x7F00_0000_1000, 3, 1, 1, 32, 4, 1, 0, 0x5555_0000_0040, 0x7FFF_0000_0010, 0)
    ((config, handles),) = calls
    # CUlaunchConfig: gridDimX..blockDimZ, sharedMemBytes (uint32), pad, hStream, attrs (pointers), numAttrs
    assert struct.unpack_from("<7I4xQQI", config) == (3, 1, 1, 32, 4, 1, 0, 0x5555_0000_0040, 0, 0)
    assert [type(h) for h in handles[:2]] == [ctypes.c_void_p] * 2 and handles[2] is None
    assert [h.value for h in handles[:2]] == [0x7F00_0000_1000, 0x7FFF_0000_0010]
    monkeypatch.setattr(launcher, "_cu_launch_kernel_ex", lambda *args: INVALID_VALUE)
    with pytest.raises(launcher.DriverError) as raised:
        launcher.ctypes_launch_kernel(1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0)
    assert raised.value.status == INVALID_VALUE


def test_ctypes_binding_passes_the_threads_params_array_by_reference(driver, monkeypatch):
    calls = []
    monkeypatch.setattr(launcher, "_cu_launch_kernel_ex", lambda *args: calls.append(args) or 0)
    buffers = launcher.launch_buffers
    driver.local.context = 0x2000
    _launch(7, 0, (1, 2))  # sets this thread's argv
    launcher.ctypes_launch_kernel(7, 1, 1, 1, 32, 1, 1, 0, 0, buffers.argv, 0)
    assert calls[-1][2] is buffers._argv
    assert ctypes.addressof(buffers._argv) == buffers.argv
