"""The launcher, checked without a GPU (libcuda replaced by a fake driver): a thread's first launch makes a
context current only where none is, every thread packs into its own buffers, the ctypes path packs
cuLaunchKernelEx's CUlaunchConfig as cuda.h lays it out, a driver error becomes a RuntimeError naming it, and
the first launch imports CuPy's binding in the background (launches go through ctypes until it is ready)."""

from __future__ import annotations

import ctypes
import struct
import threading
import time

import pytest

from cupy_ops._runtime import launcher

PARAMS = struct.Struct("<2Q")
# CUlaunchConfig (cuda.h): gridDimX..blockDimZ, sharedMemBytes (uint32), padding, hStream, attrs, numAttrs.
CONFIG = struct.Struct("<7I4xQQI")
INVALID_VALUE, INVALID_CONTEXT = 1, 201


class FakeDriver:
    """cuCtxGetCurrent/cuCtxSetCurrent on a per-thread current context, and cuLaunchKernelEx recording
    (thread, function, CUlaunchConfig fields, params bytes), or failing as the driver would."""

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

    def cuGetErrorName(self, status, out):  # noqa: N802 - unknown here: the launcher then says "CUresult <n>"
        return 1

    def launch_ex(self, config, function, kernel_params, extra) -> int:
        if self.fail_with is not None:
            return self.fail_with
        if getattr(self.local, "context", None) is None:
            return INVALID_CONTEXT
        time.sleep(0)  # let other threads run here, as the real call releases the GIL in the driver
        params = ctypes.string_at(kernel_params[0], PARAMS.size)
        self.launches.append((threading.get_ident(), function.value, CONFIG.unpack_from(config), params))
        return 0


@pytest.fixture
def driver(monkeypatch):
    fake = FakeDriver()
    monkeypatch.setattr(launcher, "_libcuda", lambda: fake)
    monkeypatch.setattr(launcher, "cu_launch_kernel_ex", fake.launch_ex)
    launcher.cupy_binding_ready()  # an import started by an earlier test must not switch bindings here
    monkeypatch.setattr(launcher, "cupy_launch_kernel", None)  # the ctypes path...
    monkeypatch.setattr(launcher, "_cupy_import", None)
    monkeypatch.setenv("CUPY_OPS_LAUNCH", "ctypes")  # ...and no import of CuPy's binding
    monkeypatch.setattr(launcher, "_primary_context", lambda device: ctypes.c_void_p(0x1000 + device))
    monkeypatch.setattr(launcher, "launch_buffers", launcher._LaunchBuffers())  # no thread has launched yet
    return fake


def _launch(function: int, device: int, values: tuple, stream: int = 0) -> None:
    launcher.launch(function, device, 3, 32, 4, stream, PARAMS, values)


def test_first_launch_in_a_thread_without_context_makes_the_devices_current(driver):
    thread = threading.Thread(target=_launch, args=(7, 1, (1, 2)))
    thread.start()
    thread.join()
    assert driver.set_current == [(thread.ident, 0x1001)]
    assert [(who, function, params) for who, function, _, params in driver.launches] == [
        (thread.ident, 7, PARAMS.pack(1, 2))]


def test_a_thread_with_a_current_context_keeps_it(driver):
    driver.local.context = 0x2000  # e.g. torch made its device's context current in this thread
    _launch(7, 0, (3, 4))
    _launch(7, 0, (5, 6))
    assert driver.set_current == []
    assert [params for *_, params in driver.launches] == [PARAMS.pack(3, 4), PARAMS.pack(5, 6)]


def test_the_launch_config_is_laid_out_as_in_cuda_h(driver):
    driver.local.context = 0x2000
    _launch(0x7F00_0000_1000, 0, (1, 2), stream=0x5555_0000_0040)
    ((_, function, config, _),) = driver.launches
    assert function == 0x7F00_0000_1000  # a c_void_p: a bare int would not pass a 64-bit address
    assert config == (3, 1, 1, 32, 4, 1, 0, 0x5555_0000_0040, 0, 0)


def test_threads_pack_into_their_own_buffers(driver):
    """8 threads, 50 launches each, all at once: each launch carries its own thread's values."""
    barrier = threading.Barrier(8)

    def many(index: int) -> None:
        barrier.wait()
        for step in range(50):
            _launch(0x100 + index, 0, (0x100 + index, step))

    threads = [threading.Thread(target=many, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(driver.launches) == 400
    assert all(PARAMS.unpack(params)[0] == function for _, function, _, params in driver.launches)
    assert {PARAMS.unpack(params) for *_, params in driver.launches} == {
        (0x100 + i, s) for i in range(8) for s in range(50)}


@pytest.mark.parametrize("status", [INVALID_VALUE, INVALID_CONTEXT])
def test_a_driver_error_is_a_runtime_error(driver, status):
    driver.local.context = 0x2000
    _launch(7, 0, (1, 2))  # the thread's first launch succeeds
    driver.fail_with = status
    with pytest.raises(RuntimeError, match=f"cupy_ops: kernel launch failed: CUresult {status}"):
        _launch(7, 0, (1, 2))


def test_ctypes_only_starts_no_import(driver):
    driver.local.context = 0x2000
    _launch(7, 0, (1, 2))
    assert launcher._cupy_import is None and not launcher.cupy_binding_ready()


def test_the_first_launch_imports_cupys_binding_in_the_background(driver, monkeypatch):
    """The first launch goes through ctypes and starts the import; once ready, CuPy's binding is what the ops'
    inlined launches call. (Its libcuda is faked here: on a machine without a driver, see the next test.)"""
    driver_module = pytest.importorskip("cupy_backends.cuda.api.driver")
    monkeypatch.setattr(driver_module, "ctxGetCurrent", lambda: 0)
    monkeypatch.setattr(launcher, "_CUPY_IMPORT_DELAY_S", 0.0)
    monkeypatch.delenv("CUPY_OPS_LAUNCH")
    driver.local.context = 0x2000
    _launch(7, 0, (1, 2))
    assert len(driver.launches) == 1  # through ctypes
    assert launcher._cupy_import is not None and launcher._cupy_import.daemon
    assert launcher.cupy_binding_ready(timeout=120)
    assert launcher.cupy_launch_kernel is driver_module.launchKernel
    started = launcher._cupy_import
    launcher._start_cupy_binding_import()  # as another thread's first launch would: no second import
    assert launcher._cupy_import is started


def test_launches_stay_on_ctypes_when_cupys_binding_cannot_load(driver, monkeypatch):
    driver_module = pytest.importorskip("cupy_backends.cuda.api.driver")

    def no_driver():
        raise RuntimeError("CuPy failed to load libcuda.so.1")

    monkeypatch.setattr(driver_module, "ctxGetCurrent", no_driver)
    monkeypatch.setattr(launcher, "_CUPY_IMPORT_DELAY_S", 0.0)
    monkeypatch.delenv("CUPY_OPS_LAUNCH")
    driver.local.context = 0x2000
    _launch(7, 0, (1, 2))
    assert not launcher.cupy_binding_ready(timeout=120)
    _launch(7, 0, (3, 4))
    assert len(driver.launches) == 2
