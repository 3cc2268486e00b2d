"""Loading compiled kernels per device and launching them on torch's or CuPy's current stream.

The launch is one `cuLaunchKernel` call through ctypes with a single by-value params struct that the op packs
with `struct` (a few hundred ns), instead of CuPy's `Function.__call__`, whose per-argument boxing costs more
than the kernel at small sizes. Kernels are compiled by `compiler.py` and loaded with CuPy's `Module`, so the
driver context is the device's primary context, which torch and CuPy share.

Capture-safety: nothing here allocates device memory or synchronizes, and every launch names its stream, so a
launch inside `torch.cuda.graph` (or CuPy stream capture) is recorded into the graph.
"""

from __future__ import annotations

import ctypes
import functools
import threading

from . import compiler

__all__ = ["Kernel", "device_arch", "fast_divmod", "launch"]

_CUDA_ERROR_INVALID_CONTEXT = 201


@functools.lru_cache(maxsize=1)
def _libcuda():
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernel.argtypes = [
        ctypes.c_void_p,                                    # CUfunction
        ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,        # grid
        ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,        # block
        ctypes.c_uint,                                      # dynamic shared memory
        ctypes.c_void_p,                                    # CUstream
        ctypes.c_void_p,                                    # void** kernelParams
        ctypes.c_void_p,                                    # void** extra
    ]
    lib.cuLaunchKernel.restype = ctypes.c_int
    lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    return lib


def _error_name(code: int) -> str:
    name = ctypes.c_char_p()
    _libcuda().cuGetErrorName(code, ctypes.byref(name))
    return name.value.decode() if name.value else f"CUresult {code}"


@functools.lru_cache(maxsize=None)
def device_arch(device: int) -> int:
    """Compute capability of `device` as an int, e.g. 90 for an H100."""
    from cupy.cuda import runtime

    props = runtime.getDeviceProperties(device)
    return props["major"] * 10 + props["minor"]


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
        self._functions: dict[int, tuple[object, int]] = {}  # device -> (CuPy Module, CUfunction)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Kernel({self.filename!r}, {self.name_expression!r})"

    def compile(self, arch: int) -> compiler.CompiledKernel:
        target, native = compiler.supported_arch(arch)
        return compiler.compile_kernel(self.filename, self.name_expression, target, native=native)

    def function(self, device: int) -> int:
        """CUfunction handle for `device`, compiling and loading on first use."""
        loaded = self._functions.get(device)
        if loaded is not None:
            return loaded[1]
        with self._lock:
            loaded = self._functions.get(device)
            if loaded is None:
                import cupy

                compiled = self.compile(device_arch(device))
                with cupy.cuda.Device(device):
                    module = cupy.cuda.function.Module()
                    module.load(compiled.image)
                    loaded = (module, module.get_function(compiled.lowered_name).ptr)
                self._functions[device] = loaded
        return loaded[1]


class _LaunchBuffers(threading.local):
    """Per-thread params buffer: cuLaunchKernel copies it at the call, so one per thread is enough."""

    def __init__(self):
        self.params = ctypes.create_string_buffer(4096)  # CUDA's by-value parameter limit
        self.argv = (ctypes.c_void_p * 1)(ctypes.addressof(self.params))


_buffers = _LaunchBuffers()


def launch(function: int, grid: int, block: tuple[int, int], params_layout, params: tuple, stream: int) -> None:
    """Launch `function` on `stream` with one struct argument packed by `params_layout` (a `struct.Struct`)."""
    buffers = _buffers
    params_layout.pack_into(buffers.params, 0, *params)
    lib = _libcuda()
    code = lib.cuLaunchKernel(function, grid, 1, 1, block[0], block[1], 1, 0, stream, buffers.argv, None)
    if code == _CUDA_ERROR_INVALID_CONTEXT:
        # A thread that has not touched the CUDA runtime yet has no current context: bind the primary one.
        from cupy.cuda import runtime

        runtime.setDevice(runtime.getDevice())
        code = lib.cuLaunchKernel(function, grid, 1, 1, block[0], block[1], 1, 0, stream, buffers.argv, None)
    if code != 0:
        raise RuntimeError(f"cupy_ops: kernel launch failed: {_error_name(code)}")
