"""Loading compiled kernels per device and launching them on torch's or CuPy's current stream.

Kernels are compiled by `compiler.py` (NVRTC through CuPy on a cache miss) and loaded into the device's primary
context, the one torch and CuPy share, with two driver calls through ctypes: a warm disk cache then never
imports CuPy (100-180 ms) on the caller's path. The launch is one `cuLaunchKernel` through CuPy's Cython
binding (imported in the background; `cuLaunchKernelEx` through ctypes until then) with a single by-value
params struct that the op packs with `struct`, instead of CuPy's `Function.__call__`, whose per-argument boxing
costs more than the kernel at small sizes.

Capture-safety: nothing here allocates device memory or synchronizes, and every launch names its stream, so a
launch inside `torch.cuda.graph` (or CuPy stream capture) is recorded into the graph.
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
import sys
import threading
import time

from . import compiler

__all__ = ["DriverError", "Kernel", "cu_launch_kernel_ex", "cupy_binding_ready", "cupy_launch_kernel", "device_arch",
           "fast_divmod", "launch", "launch_buffers", "launch_failed", "pack_launch_config"]

_CUDA_ERROR_INVALID_CONTEXT = 201


@functools.lru_cache(maxsize=1)
def _libcuda():
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    return lib


def _error_name(code: int) -> str:
    name = ctypes.c_char_p()
    try:
        _libcuda().cuGetErrorName(code, ctypes.byref(name))
    except OSError:  # no driver to ask
        pass
    return name.value.decode() if name.value else f"CUresult {code}"


def _check_cu(code: int, what: str) -> None:
    if code:
        raise RuntimeError(f"cupy_ops: {what} failed: {_error_name(code)}")


@functools.lru_cache(maxsize=None)
def _primary_context(device: int) -> ctypes.c_void_p:
    """The device's primary context (the one torch and CuPy use), retained for the life of the process."""
    lib = _libcuda()
    _check_cu(lib.cuInit(0), "cuInit")
    handle, context = ctypes.c_int(), ctypes.c_void_p()
    _check_cu(lib.cuDeviceGet(ctypes.byref(handle), device), f"cuDeviceGet({device})")
    _check_cu(lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), handle), "cuDevicePrimaryCtxRetain")
    return context


@functools.lru_cache(maxsize=None)
def device_arch(device: int) -> int:
    """Compute capability of `device` as an int, e.g. 90 for an H100."""
    lib = _libcuda()
    _check_cu(lib.cuInit(0), "cuInit")
    handle, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    _check_cu(lib.cuDeviceGet(ctypes.byref(handle), device), f"cuDeviceGet({device})")
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
    _check_cu(lib.cuDeviceGetAttribute(ctypes.byref(major), 75, handle), "cuDeviceGetAttribute")
    _check_cu(lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, handle), "cuDeviceGetAttribute")
    return major.value * 10 + minor.value


def _load_function(device: int, image: bytes, lowered_name: str) -> tuple[ctypes.c_void_p, int]:
    """(CUmodule, CUfunction) of `image` loaded into `device`'s primary context, whatever is current here."""
    lib = _libcuda()
    context = _primary_context(device)
    module, function, previous = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
    # cuda.h maps these names to their _v2 ABI; the bare symbols are the legacy ABI (INVALID_CONTEXT here).
    _check_cu(lib.cuCtxPushCurrent_v2(context), "cuCtxPushCurrent")
    try:
        _check_cu(lib.cuModuleLoadData(ctypes.byref(module), image), "cuModuleLoadData")
        _check_cu(lib.cuModuleGetFunction(ctypes.byref(function), module, lowered_name.encode()),
                  f"cuModuleGetFunction({lowered_name})")
    finally:
        lib.cuCtxPopCurrent_v2(ctypes.byref(previous))
    return module, function.value


def fast_divmod(divisor: int) -> tuple[int, int, int]:
    """(divisor, multiplier, shift) for common/fast_divmod.cuh: q = n * multiplier >> shift for n < 2^31."""
    s = (divisor - 1).bit_length()
    return divisor, -(-(1 << (32 + s)) // divisor), 32 + s


class Kernel:
    """One template instantiation of one `cuda_kernels/*.cu` file, loaded lazily once per device."""

    __slots__ = ("filename", "name_expression", "_functions", "_lock")

    def __init__(self, filename: str, name_expression: str):
        self.filename = filename
        self.name_expression = name_expression
        self._functions: dict[int, tuple[ctypes.c_void_p, int]] = {}  # device -> (CUmodule, CUfunction)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Kernel({self.filename!r}, {self.name_expression!r})"

    def compile(self, arch: int) -> compiler.CompiledKernel:
        target, native = compiler.supported_arch(arch)
        return compiler.compile_kernel(self.filename, self.name_expression, target, native=native)

    def function(self, device: int) -> int:
        """CUfunction handle (an address) for `device`, compiling (or reading the disk cache) and loading on first
        use."""
        loaded = self._functions.get(device)
        if loaded is not None:
            return loaded[1]
        with self._lock:
            loaded = self._functions.get(device)
            if loaded is None:
                compiled = self.compile(device_arch(device))
                loaded = self._functions[device] = _load_function(device, compiled.image, compiled.lowered_name)
        return loaded[1]


class DriverError(RuntimeError):
    """A failed driver call from the ctypes launch path; `status` is the CUresult (like CuPy's CUDADriverError)."""

    def __init__(self, status: int):
        self.status = status
        super().__init__(_error_name(status))


# ---- the launch, two ways ---------------------------------------------------------------------------------
#
# CuPy's Cython binding of cuLaunchKernel (`cupy.cuda.driver.launchKernel`) takes 11 ints: ~3.0 us a launch on
# the H100 VM. ctypes calls cuLaunchKernelEx with the grid, block and stream packed in a per-thread
# CUlaunchConfig: 4 ready-made arguments (no argtypes: ctypes converts one in ~0.2 us), yet ~0.6 us more a
# launch. CuPy's binding needs CuPy imported, 50-100 ms of mostly GIL-holding module set-up: on the caller's
# path it would be most of a warm-cache first call, and in a thread started right then it still stalls the
# caller's next steps. So the process's first launch starts a daemon thread that imports it a second later
# (at once if CuPy is already imported), and launches go through ctypes until it is ready;
# `CUPY_OPS_LAUNCH=ctypes` keeps them on ctypes. Both read the kernel's params struct, packed by the caller into
# this thread's `launch_buffers.params`. Hot paths inline `_launch_packed` (see merge_attn_states): each Python
# call level costs ~0.2 us.

# cuLaunchKernelEx's CUlaunchConfig (cuda.h): grid x/y/z, block x/y/z, dynamic shared bytes (7 x uint32), the
# stream, an attribute pointer and count.
pack_launch_config = struct.Struct("<7I4xQQI4x").pack_into
cupy_launch_kernel = None  # CuPy's launchKernel, once `_import_cupy_binding` has made it ready
_cupy_import = None  # the thread running `_import_cupy_binding`, once started
_cupy_import_lock = threading.Lock()  # two threads' first launches start one import
_CUPY_IMPORT_DELAY_S = 1.0


def _import_cupy_binding() -> None:
    global cupy_launch_kernel
    if "cupy" not in sys.modules:
        time.sleep(_CUPY_IMPORT_DELAY_S)
    try:
        import cupy  # noqa: F401 - CuPy's driver binding imports it on first use anyway: here, off the caller's path
        from cupy_backends.cuda.api import driver

        driver.ctxGetCurrent()  # loads its libcuda binding now rather than in the first launch through it
    except Exception:  # noqa: BLE001 - no usable CuPy: launches stay on ctypes
        return
    cupy_launch_kernel = driver.launchKernel


def _start_cupy_binding_import() -> None:
    """Import CuPy's launch binding in a daemon thread (a process may exit before, or during, the import),
    unless it is under way, ready, or `CUPY_OPS_LAUNCH=ctypes`."""
    global _cupy_import
    with _cupy_import_lock:
        if _cupy_import is None and cupy_launch_kernel is None and os.environ.get("CUPY_OPS_LAUNCH") != "ctypes":
            _cupy_import = threading.Thread(target=_import_cupy_binding, daemon=True,
                                            name="cupy_ops: import CuPy's launch binding")
            _cupy_import.start()


def cupy_binding_ready(timeout: float | None = None) -> bool:
    """Wait up to `timeout` s for the import of CuPy's launch binding, if one was started; is it in use now?"""
    if _cupy_import is not None:
        _cupy_import.join(timeout)
    return cupy_launch_kernel is not None


def cu_launch_kernel_ex(*args) -> int:  # noqa: F811 - the stub rebinds its own name
    """First call binds libcuda's cuLaunchKernelEx in place of this stub (no driver is needed before that)."""
    global cu_launch_kernel_ex
    cu_launch_kernel_ex = _libcuda().cuLaunchKernelEx
    return cu_launch_kernel_ex(*args)


class _LaunchBuffers(threading.local):
    """Per-thread launch buffers: the driver copies them during the launch, so one set per thread is enough (the
    launch releases the GIL, so threads must not share them). `params` holds the kernel's single by-value
    argument, `config` the ctypes path's CUlaunchConfig. `argv` (its address, for CuPy's binding) and
    `argv_array` (for ctypes) are cuLaunchKernel's kernelParams, one pointer to `params`; the thread's first
    launch sets them (`launch_failed`) once a context is current here: reading them before raises
    AttributeError, which sends that launch to `launch_failed` at no cost to the others."""

    def __init__(self):
        self.params = ctypes.create_string_buffer(4096)  # CUDA's by-value parameter limit
        self.config = ctypes.create_string_buffer(64)
        self._argv = (ctypes.c_void_p * 1)(ctypes.addressof(self.params))


launch_buffers = _LaunchBuffers()


def _launch_packed(function: int, grid: int, block_x: int, block_y: int, stream: int,
                   buffers: _LaunchBuffers) -> None:
    """Launch `function` with this thread's packed params, through CuPy's binding if bound, else ctypes."""
    launch_kernel = cupy_launch_kernel
    if launch_kernel is not None:
        launch_kernel(function, grid, 1, 1, block_x, block_y, 1, 0, stream, buffers.argv, 0)
        return
    pack_launch_config(buffers.config, 0, grid, 1, 1, block_x, block_y, 1, 0, stream, 0, 0)
    code = cu_launch_kernel_ex(buffers.config, ctypes.c_void_p(function), buffers.argv_array, None)
    if code:
        raise DriverError(code)


def launch(function: int, device: int, grid: int, block_x: int, block_y: int, stream: int, params_layout,
           params: tuple) -> None:
    """Launch `function` (from `Kernel.function(device)`) on the raw CUstream `stream` with one struct argument
    that `params_layout` (a little-endian `struct.Struct`) packs from `params`. 1-D grid, 2-D block, no dynamic
    shared memory."""
    buffers = launch_buffers
    params_layout.pack_into(buffers.params, 0, *params)
    try:
        _launch_packed(function, grid, block_x, block_y, stream, buffers)
    except Exception as exc:  # noqa: BLE001 - the binding's error (with .status) or a first launch here
        launch_failed(exc, function, device, grid, block_x, block_y, stream, buffers)


def _make_context_current(device: int) -> None:
    """Make `device`'s primary context current in this thread if none is, as the CUDA runtime does on a
    thread's first call (a thread that never touched CUDA has none, and a launch there would fail)."""
    lib, current = _libcuda(), ctypes.c_void_p()
    _check_cu(lib.cuCtxGetCurrent(ctypes.byref(current)), "cuCtxGetCurrent")
    if not current.value:
        _check_cu(lib.cuCtxSetCurrent(_primary_context(device)), "cuCtxSetCurrent")


def launch_failed(error: Exception, function: int, device: int, grid: int, block_x: int, block_y: int,
                  stream: int, buffers: _LaunchBuffers) -> None:
    """A launch with this thread's packed params raised `error`. The thread's first launch (no `argv` yet) and
    a launch that found no current context are made again with the device's context current; anything else
    is raised as a RuntimeError."""
    first_launch = isinstance(error, AttributeError) and not hasattr(buffers, "argv")
    if first_launch:
        _make_context_current(device)
        buffers.argv_array = buffers._argv
        buffers.argv = ctypes.addressof(buffers._argv)
    elif getattr(error, "status", None) == _CUDA_ERROR_INVALID_CONTEXT:
        _make_context_current(device)  # other code released this thread's context since its first launch
    else:
        raise RuntimeError(f"cupy_ops: kernel launch failed: {error}") from error
    try:
        _launch_packed(function, grid, block_x, block_y, stream, buffers)
    except Exception as again:  # noqa: BLE001 - reported as any failed launch
        raise RuntimeError(f"cupy_ops: kernel launch failed: {again}") from again
    if first_launch:
        _start_cupy_binding_import()
