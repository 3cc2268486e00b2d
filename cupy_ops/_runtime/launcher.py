"""The CUDA driver through ctypes: load compiled kernels per device, query the device and a kernel's occupancy,
and launch kernels or memsets on a raw stream.

Kernels are compiled by `compiler.py` and loaded into the device's primary context, the one torch and CuPy
share. Every call here goes straight to libcuda through ctypes, so a warm disk cache never imports CuPy
(100-180 ms) on the caller's path. One launch is `cuLaunchKernelEx` with a `LaunchConfig` (3-D grid and block,
dynamic shared memory, thread-block cluster) and a single by-value params struct that the runtime packs with
`struct`. (CuPy's Cython binding of cuLaunchKernel: 4.84 against ctypes' cuLaunchKernelEx 5.56 us a prepacked
launch, H200 VM medians, bench/results/h200-eager-breakdown.json; whole merge calls on an H100 7.47 against 7.15:
under the 1 us that would justify a second binding and the CuPy import it needs on the caller's path.)

Capture-safety: nothing here allocates device memory or synchronizes, and every launch and memset names its
stream, so both are recorded into a CUDA graph under `torch.cuda.graph` (or CuPy stream capture).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import struct
import threading
from typing import NamedTuple

from . import compiler

__all__ = ["DriverError", "Kernel", "LaunchConfig", "Launcher", "device_arch", "device_attribute",
           "fast_divmod", "memset_async", "occupancy", "max_active_clusters"]


# cuDeviceGetAttribute ids (cuda.h, CUdevice_attribute)
_DEVICE_ATTRIBUTES = {
    "max_threads_per_block": 1,
    "max_shared_memory_per_block": 8,
    "sm_count": 16,
    "compute_capability_major": 75,
    "compute_capability_minor": 76,
    "max_shared_memory_per_sm": 81,
    "max_shared_memory_per_block_optin": 97,
    "l2_cache_size": 38,
    "cluster_launch": 120,
}
_FUNCTION_ATTRIBUTES = {"max_threads_per_block": 0, "static_shared_bytes": 1, "local_bytes": 3, "registers": 4}
_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED = 14
_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION = 4
_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6


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


class DriverError(RuntimeError):
    """A failed driver call; `status` is its CUresult."""

    def __init__(self, status: int, what: str = "CUDA driver call"):
        self.status = status
        super().__init__(f"cupy_ops: {what} failed: {_error_name(status)}")


def _check_cu(code: int, what: str) -> None:
    if code:
        raise DriverError(code, what)


@functools.lru_cache(maxsize=None)
def _device_handle(device: int) -> int:
    lib = _libcuda()
    _check_cu(lib.cuInit(0), "cuInit")
    handle = ctypes.c_int()
    _check_cu(lib.cuDeviceGet(ctypes.byref(handle), device), f"cuDeviceGet({device})")
    return handle.value


@functools.lru_cache(maxsize=None)
def _primary_context(device: int) -> ctypes.c_void_p:
    """The device's primary context (the one torch and CuPy use), retained for the life of the process."""
    context = ctypes.c_void_p()
    _check_cu(_libcuda().cuDevicePrimaryCtxRetain(ctypes.byref(context), _device_handle(device)),
              "cuDevicePrimaryCtxRetain")
    return context


@functools.lru_cache(maxsize=None)
def device_attribute(device: int, name: str) -> int:
    """One of `_DEVICE_ATTRIBUTES` (e.g. "sm_count", "max_shared_memory_per_block_optin") of `device`."""
    value = ctypes.c_int()
    _check_cu(_libcuda().cuDeviceGetAttribute(ctypes.byref(value), _DEVICE_ATTRIBUTES[name],
                                              _device_handle(device)), f"cuDeviceGetAttribute({name})")
    return value.value


def device_arch(device: int) -> int:
    """Compute capability of `device` as an int, e.g. 90 for an H100."""
    return (device_attribute(device, "compute_capability_major") * 10
            + device_attribute(device, "compute_capability_minor"))


class _ContextPushed:
    """`with _ContextPushed(device):` makes the device's primary context current for driver calls that need one,
    whatever this thread has current, and restores it after."""

    def __init__(self, device: int):
        self.context = _primary_context(device)

    def __enter__(self):
        _check_cu(_libcuda().cuCtxPushCurrent_v2(self.context), "cuCtxPushCurrent")

    def __exit__(self, *exc):
        _libcuda().cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))


def fast_divmod(divisor: int) -> tuple[int, int, int]:
    """(divisor, multiplier, shift) for common/fast_divmod.cuh: q = n * multiplier >> shift for n < 2^31."""
    s = (divisor - 1).bit_length()
    return divisor, -(-(1 << (32 + s)) // divisor), 32 + s


class Kernel:
    """One template instantiation of one `.cu` file, loaded lazily once per device.

    `source`: file name under `root` (default: the package's cuda_kernels/); `name_expression`: the
    instantiation, e.g. "cupy_ops::merge_attn_states_kernel<float, float, 4, false>". `known_spills`: (NVRTC
    (major, minor), arch) -> the most bytes of spill stores and of spill loads ptxas may report for this
    instantiation there, where an op keeps a spill (its module says why, with measurements); elsewhere none."""

    __slots__ = ("source", "name_expression", "root", "known_spills", "_functions", "_lock", "_dynamic_smem")

    def __init__(self, source: str, name_expression: str, root=None, known_spills=None):
        self.source = source
        self.name_expression = name_expression
        self.root = root
        self.known_spills = dict(known_spills or {})
        self._functions: dict[int, int] = {}  # device -> CUfunction
        self._dynamic_smem: dict[int, int] = {}  # device -> opted-in dynamic shared memory
        self._lock = threading.Lock()  # loading, rerooting, and the opt-in's check, driver call and record

    def __repr__(self) -> str:
        return f"Kernel({self.source!r}, {self.name_expression!r})"

    def reroot(self, root) -> None:
        """Compile from `root` from now on (None: the package's cuda_kernels/), forgetting what was loaded: a
        developer's A/B of two kernel trees in one process (bench/tune.py --tree)."""
        with self._lock:
            self.root = root
            self._functions.clear()
            self._dynamic_smem.clear()

    def spill_allowance(self, arch: int) -> int:
        """Bytes of spill stores (and of loads) accepted at `arch` with this NVRTC: 0 unless in `known_spills`."""
        return self.known_spills.get((compiler.nvrtc_version()[:2], arch), 0)

    def spills_allowed(self, report: compiler.PtxasReport) -> bool:
        """Whether ptxas' `report` for this instantiation spills no more than its allowance at the report's arch."""
        return max(report.spill_stores, report.spill_loads) <= self.spill_allowance(report.arch)

    def compile(self, arch: int) -> compiler.CompiledKernel:
        target, native = compiler.supported_arch(arch)
        return compiler.compile_kernel(self.source, self.name_expression, target, native=native, root=self.root)

    def function(self, device: int) -> int:
        """CUfunction handle (an address) for `device`, compiling (or reading the disk cache) and loading on first
        use."""
        function = self._functions.get(device)
        if function is not None:
            return function
        with self._lock:
            function = self._functions.get(device)
            if function is None:
                compiled = self.compile(device_arch(device))
                function = self._functions[device] = _load_function(device, compiled.image, compiled.lowered_name)
        return function

    def attribute(self, device: int, name: str) -> int:
        """One of `_FUNCTION_ATTRIBUTES` of this kernel on `device`: "registers" (per thread),
        "static_shared_bytes", "local_bytes" (spills and stack), "max_threads_per_block"."""
        value = ctypes.c_int()
        with _ContextPushed(device):
            _check_cu(_libcuda().cuFuncGetAttribute(ctypes.byref(value), _FUNCTION_ATTRIBUTES[name],
                                                    ctypes.c_void_p(self.function(device))),
                      f"cuFuncGetAttribute({name})")
        return value.value

    def allow_dynamic_smem(self, device: int, nbytes: int) -> None:
        """Opt the kernel in to `nbytes` of dynamic shared memory, once per device and size. Without it the driver
        allows 48 KiB minus the kernel's static shared memory, and refuses a launch that asks for more
        (CUDA_ERROR_INVALID_VALUE)."""
        if nbytes <= self._dynamic_smem.get(device, 0):
            return
        limit = device_attribute(device, "max_shared_memory_per_block_optin")
        static = self.attribute(device, "static_shared_bytes")
        if nbytes + static > limit:
            raise ValueError(f"cupy_ops: {self.name_expression} asks for {nbytes} bytes of dynamic shared memory "
                             f"besides {static} static; this GPU allows {limit} in all")
        # Under the lock, and only upwards: two threads planning different sizes could otherwise leave the smaller
        # one set last, and the larger one's cached launches would fail with CUDA_ERROR_INVALID_VALUE on every call.
        function = self.function(device)  # before the lock, which loading takes
        with self._lock:
            if nbytes <= self._dynamic_smem.get(device, 0):
                return
            with _ContextPushed(device):
                _check_cu(_libcuda().cuFuncSetAttribute(ctypes.c_void_p(function),
                                                        _FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes),
                          "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)")
            self._dynamic_smem[device] = nbytes


def _load_function(device: int, image: bytes, lowered_name: str) -> int:
    """CUfunction of `image` loaded into `device`'s primary context, whatever is current in this thread."""
    lib = _libcuda()
    module, function = ctypes.c_void_p(), ctypes.c_void_p()
    with _ContextPushed(device):
        _check_cu(lib.cuModuleLoadData(ctypes.byref(module), image), "cuModuleLoadData")
        _check_cu(lib.cuModuleGetFunction(ctypes.byref(function), module, lowered_name.encode()),
                  f"cuModuleGetFunction({lowered_name})")
    return function.value


class LaunchConfig(NamedTuple):
    """Grid and block (x, y, z), dynamic shared memory in bytes, thread-block cluster (x, y, z) or None, and
    `dependent`: a programmatic dependent launch (sm_90; CUDA graphs capture it as a programmatic edge), which the
    GPU may start while the stream's previous kernel finishes; such a kernel must wait for it
    (common/grid_dependency.cuh: wait_for_previous_grids) before it reads global memory."""

    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_bytes: int = 0
    cluster: tuple[int, int, int] | None = None
    dependent: bool = False

    @property
    def threads(self) -> int:
        return self.block[0] * self.block[1] * self.block[2]

    @property
    def blocks(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


# cuLaunchKernelEx's CUlaunchConfig (cuda.h): grid x/y/z, block x/y/z, dynamic shared bytes (7 x uint32), the
# stream (at byte 32), a CUlaunchAttribute pointer and count. Only the stream changes between calls.
_CONFIG = struct.Struct("<7I4xQQI4x")
_STREAM_OFFSET = 32
_pack_stream = struct.Struct("<Q").pack_into
# CUlaunchAttribute: id (uint32), 4 bytes of padding, a 64-byte value union (clusterDim: 3 x uint32;
# programmaticStreamSerializationAllowed: int).
_LAUNCH_ATTRIBUTE = struct.Struct("<I4x3I52x")


def _launch_attributes(config: LaunchConfig) -> bytes:
    """The CUlaunchAttribute array of `config`: its cluster shape, then programmatic serialization if dependent."""
    found = [] if config.cluster is None else [(_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION, *config.cluster)]
    if config.dependent:
        found.append((_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, 1, 0, 0))
    return b"".join(_LAUNCH_ATTRIBUTE.pack(*attribute) for attribute in found)


class Launcher:
    """One kernel ready to launch with one `LaunchConfig` on one device: `launch(stream, pack_into, values)`
    packs the kernel's params struct with `pack_into(buffer, 0, *values)` (a `struct.Struct.pack_into`) and
    launches it on the raw CUstream `stream`."""

    __slots__ = ("function", "device", "config", "_attributes", "_packed_config", "_local")

    def __init__(self, kernel: Kernel, device: int, config: LaunchConfig):
        self.function = ctypes.c_void_p(kernel.function(device))
        self.device = device
        self.config = config
        kernel.allow_dynamic_smem(device, config.shared_bytes)
        if config.cluster is not None and config.cluster[0] * config.cluster[1] * config.cluster[2] > 8:
            with _ContextPushed(device):  # planning may run with another device's context current, or none
                _check_cu(_libcuda().cuFuncSetAttribute(
                    self.function, _FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1),
                    "cuFuncSetAttribute(NON_PORTABLE_CLUSTER_SIZE_ALLOWED)")
        attributes = _launch_attributes(config)
        self._attributes = ctypes.create_string_buffer(attributes, len(attributes)) if attributes else None
        self._packed_config = _CONFIG.pack(*config.grid, *config.block, config.shared_bytes, 0,
                                           0 if self._attributes is None else ctypes.addressof(self._attributes),
                                           len(attributes) // _LAUNCH_ATTRIBUTE.size)
        self._local = threading.local()  # this launch's CUlaunchConfig per thread: calls only write the stream

    def _config(self, stream: int) -> ctypes.Array:
        try:
            config = self._local.config
        except AttributeError:
            config = self._local.config = ctypes.create_string_buffer(self._packed_config, len(self._packed_config))
        _pack_stream(config, _STREAM_OFFSET, stream)
        return config

    def launch(self, stream: int, pack_into, values) -> None:
        buffers = _buffers
        pack_into(buffers.params, 0, *values)
        try:  # `_config`, inlined: each Python call level costs ~0.2 us on the GPU machines' VMs
            config = self._local.config
            _pack_stream(config, _STREAM_OFFSET, stream)
        except AttributeError:  # this thread's first launch of this kernel and config
            _make_context_current(self.device)  # a thread that never touched CUDA has none: no failed launch
            config = self._config(stream)
        code = _cu_launch_kernel_ex(config, self.function, buffers.argv, None)
        if code:
            with _context_to_retry_in(self.device, code, f"kernel launch ({self.config})"):
                _check_cu(_cu_launch_kernel_ex(self._config(stream), self.function, buffers.argv, None),
                          f"kernel launch ({self.config})")

    def max_active_clusters(self) -> int:
        """Clusters of this launch's shape that can be resident at once on the whole GPU (cluster launches only)."""
        count = ctypes.c_int()
        with _ContextPushed(self.device):
            _check_cu(_libcuda().cuOccupancyMaxActiveClusters(ctypes.byref(count), self.function,
                                                              self._config(0)), "cuOccupancyMaxActiveClusters")
        return count.value


def _cu_launch_kernel_ex(*args) -> int:
    """First call binds libcuda's cuLaunchKernelEx in place of this stub (no driver is needed before that)."""
    global _cu_launch_kernel_ex
    _cu_launch_kernel_ex = _libcuda().cuLaunchKernelEx
    return _cu_launch_kernel_ex(*args)


class _Buffers(threading.local):
    """Per-thread launch buffers: the driver copies them during the launch, so one set per thread is enough (the
    launch releases the GIL, so threads must not share them). `params` holds the kernel's single by-value
    argument, `argv` cuLaunchKernelEx's kernelParams (one pointer to `params`)."""

    def __init__(self):
        self.params = ctypes.create_string_buffer(4096)  # CUDA's by-value parameter limit
        self.argv = (ctypes.c_void_p * 1)(ctypes.addressof(self.params))


_buffers = _Buffers()


def _current_context() -> int | None:
    current = ctypes.c_void_p()
    _check_cu(_libcuda().cuCtxGetCurrent(ctypes.byref(current)), "cuCtxGetCurrent")
    return current.value


def _make_context_current(device: int) -> None:
    """Make `device`'s primary context current in this thread if none is, as the CUDA runtime does on a
    thread's first call."""
    if not _current_context():
        _check_cu(_libcuda().cuCtxSetCurrent(_primary_context(device)), "cuCtxSetCurrent")


def _context_to_retry_in(device: int, code: int, what: str):
    """After a driver call for `device` failed with `code` (the driver's current context is only read then, so
    calls that succeed cost nothing): a context manager to retry it in, or DriverError(code) when the context was
    not the reason. No context current in this thread (other code released it): the device's primary context is
    made current, as the CUDA runtime does. Another device's current: the call is retried with the device's pushed
    (torch reports device d as current while a device index it set lazily left another device's context current
    in the thread, e.g. after a first `torch.empty(device="cuda:1")`, until torch's next device switch)."""
    current = _current_context()
    if not current:
        _make_context_current(device)
        return contextlib.nullcontext()
    if current != _primary_context(device).value:
        return _ContextPushed(device)
    raise DriverError(code, what)


def occupancy(kernel: Kernel, device: int, threads_per_block: int, shared_bytes: int = 0) -> int:
    """Blocks of `kernel` that fit on one SM at once with this block size and dynamic shared memory (the
    driver's answer for this exact instantiation: registers, static and dynamic shared memory)."""
    kernel.allow_dynamic_smem(device, shared_bytes)
    count = ctypes.c_int()
    with _ContextPushed(device):
        _check_cu(_libcuda().cuOccupancyMaxActiveBlocksPerMultiprocessor(
            ctypes.byref(count), ctypes.c_void_p(kernel.function(device)), threads_per_block,
            ctypes.c_size_t(shared_bytes)), "cuOccupancyMaxActiveBlocksPerMultiprocessor")
    return count.value


def max_active_clusters(kernel: Kernel, device: int, config: LaunchConfig) -> int:
    """Clusters of `config`'s shape that can be resident on the whole GPU at once."""
    return Launcher(kernel, device, config).max_active_clusters()


def memset_async(pointer: int, value: int, nbytes: int, stream: int, device: int) -> None:
    """Set `nbytes` bytes at `pointer` to `value` (0-255), ordered on `stream` (captured by CUDA graphs)."""
    if nbytes == 0:
        return
    lib = _libcuda()
    code = lib.cuMemsetD8Async(ctypes.c_uint64(pointer), ctypes.c_ubyte(value), ctypes.c_size_t(nbytes),
                               ctypes.c_void_p(stream))
    if code:
        with _context_to_retry_in(device, code, "cuMemsetD8Async"):
            _check_cu(lib.cuMemsetD8Async(ctypes.c_uint64(pointer), ctypes.c_ubyte(value), ctypes.c_size_t(nbytes),
                                          ctypes.c_void_p(stream)), "cuMemsetD8Async")
