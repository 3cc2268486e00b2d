"""Loading compiled kernels per device and launching them on torch's or CuPy's current stream.

Kernels are compiled by `compiler.py` (NVRTC through CuPy on a cache miss) and loaded into the device's primary
context, the one torch and CuPy share, with two driver calls through ctypes: a warm disk cache then never
imports CuPy (100-180 ms). The launch is one `cuLaunchKernelEx` through ctypes with a single by-value params
struct that the op packs with `struct`, instead of CuPy's `Function.__call__`, whose per-argument boxing costs
more than the kernel at small sizes.

Capture-safety: nothing here allocates device memory or synchronizes, and every launch names its stream, so a
launch inside `torch.cuda.graph` (or CuPy stream capture) is recorded into the graph.
"""

from __future__ import annotations

import ctypes
import functools
import struct
import threading

from . import compiler

__all__ = ["Kernel", "device_arch", "fast_divmod", "launch"]

_CUDA_ERROR_INVALID_CONTEXT = 201


@functools.lru_cache(maxsize=1)
def _libcuda():
    # No argtypes on the launch: ctypes' per-argument conversion cost ~2 us a cuLaunchKernel (measured on the
    # H100 VM: 9.7 us with argtypes, 7.6 us without, 7.5 us through cuda.bindings). Callers pass c_void_p handles.
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernelEx.restype = ctypes.c_int
    lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    return lib


def _error_name(code: int) -> str:
    name = ctypes.c_char_p()
    _libcuda().cuGetErrorName(code, ctypes.byref(name))
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


def _load_function(device: int, image: bytes, lowered_name: str) -> tuple[ctypes.c_void_p, ctypes.c_void_p]:
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
    return module, function


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
        self._functions: dict[int, tuple[ctypes.c_void_p, ctypes.c_void_p]] = {}  # device -> (module, function)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Kernel({self.filename!r}, {self.name_expression!r})"

    def compile(self, arch: int) -> compiler.CompiledKernel:
        target, native = compiler.supported_arch(arch)
        return compiler.compile_kernel(self.filename, self.name_expression, target, native=native)

    def function(self, device: int) -> ctypes.c_void_p:
        """CUfunction handle for `device`, compiling (or reading the disk cache) and loading on first use."""
        loaded = self._functions.get(device)
        if loaded is not None:
            return loaded[1]
        with self._lock:
            loaded = self._functions.get(device)
            if loaded is None:
                compiled = self.compile(device_arch(device))
                loaded = self._functions[device] = _load_function(device, compiled.image, compiled.lowered_name)
        return loaded[1]


# cuLaunchKernelEx's CUlaunchConfig (cuda.h): grid x/y/z, block x/y/z, dynamic shared bytes (7 x uint32), the
# stream, an attribute pointer and count; padded to 64 bytes, then the kernel's params struct. One pack_into
# fills both, and the ctypes call converts 4 arguments instead of cuLaunchKernel's 11 (~0.5 us less per launch
# on the H100 VM).
_CONFIG_FORMAT = "7I4xQQI4x"
_PARAMS_OFFSET = 64
_with_config: dict = {}  # params struct.Struct -> struct.Struct of config + params


def _config_and_params(params_layout) -> struct.Struct:
    layout = _with_config.get(params_layout)
    if layout is None:
        padding = _PARAMS_OFFSET - struct.calcsize("<" + _CONFIG_FORMAT)
        layout = _with_config[params_layout] = struct.Struct(
            f"<{_CONFIG_FORMAT}{padding}x{params_layout.format.lstrip('<=@!>')}")
    return layout


class _LaunchBuffers(threading.local):
    """Per-thread launch config + params buffer: the driver copies it during the call, so one per thread is
    enough (ctypes releases the GIL during the call, so threads must not share it)."""

    def __init__(self):
        self.buffer = ctypes.create_string_buffer(_PARAMS_OFFSET + 4096)  # CUDA's by-value parameter limit
        self.config = ctypes.c_void_p(ctypes.addressof(self.buffer))
        self.argv = (ctypes.c_void_p * 1)(ctypes.addressof(self.buffer) + _PARAMS_OFFSET)


_buffers = _LaunchBuffers()


def launch(function: ctypes.c_void_p, device: int, grid: int, block_x: int, block_y: int, stream: int,
           params_layout, params: tuple) -> None:
    """Launch `function` (from `Kernel.function(device)`) on the raw CUstream `stream` with one struct argument
    that `params_layout` (a little-endian `struct.Struct`) packs from `params`. 1-D grid, 2-D block, no dynamic
    shared memory."""
    buffers = _buffers
    layout = _with_config.get(params_layout) or _config_and_params(params_layout)
    layout.pack_into(buffers.buffer, 0, grid, 1, 1, block_x, block_y, 1, 0, stream, 0, 0, *params)
    code = _cu_launch_kernel_ex(buffers.config, function, buffers.argv, None)
    if code == _CUDA_ERROR_INVALID_CONTEXT:
        # A thread that has not touched CUDA yet has no current context: make the device's primary one current,
        # as the CUDA runtime would on its first call in this thread.
        _libcuda().cuCtxSetCurrent(_primary_context(device))
        code = _cu_launch_kernel_ex(buffers.config, function, buffers.argv, None)
    if code:
        raise RuntimeError(f"cupy_ops: kernel launch failed: {_error_name(code)}")


def _cu_launch_kernel_ex(*args) -> int:
    """First call binds libcuda's cuLaunchKernelEx in place of this stub (no driver is needed before that)."""
    global _cu_launch_kernel_ex
    _cu_launch_kernel_ex = _libcuda().cuLaunchKernelEx
    return _cu_launch_kernel_ex(*args)
