"""The shared runtime every op uses: declare and run ops (`op`), params structs (`params`), compile and cache
(`compiler`), load and launch (`launcher`), torch tensors and CuPy arrays seen alike (`arrays`)."""

from . import compiler, launcher, params
from .arrays import ArrayInfo, describe, is_cupy_array
from .compiler import CompileError, PtxasReport, cache_dir, compile_kernel, kernel_dir, ptxas_report
from .launcher import Kernel, LaunchConfig, device_arch, device_attribute, fast_divmod, memset_async, occupancy
from .op import Call, Launch, Memset, Op, Scratch, TensorArg, TensorInfo, registry
from .validation import dtype_name

__all__ = [
    "ArrayInfo", "Call", "CompileError", "Kernel", "Launch", "LaunchConfig", "Memset", "Op", "PtxasReport",
    "Scratch", "TensorArg", "TensorInfo", "cache_dir", "compile_kernel", "compiler", "describe", "device_arch",
    "device_attribute", "dtype_name", "fast_divmod", "is_cupy_array", "kernel_dir", "launcher", "memset_async",
    "occupancy", "params", "ptxas_report", "registry",
]
