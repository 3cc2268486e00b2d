"""The shared runtime every op uses: compile and cache (`compiler`), describe arrays (`arrays`), launch (`launch`)."""

from . import launcher
from .arrays import ArrayInfo, describe, is_cupy_array
from .compiler import CompileError, PtxasReport, cache_dir, compile_kernel, kernel_dir, ptxas_report
from .launcher import Kernel, device_arch, fast_divmod, launch

__all__ = [
    "ArrayInfo",
    "CompileError",
    "Kernel",
    "PtxasReport",
    "cache_dir",
    "compile_kernel",
    "describe",
    "device_arch",
    "fast_divmod",
    "is_cupy_array",
    "kernel_dir",
    "launch",
    "launcher",
    "ptxas_report",
]
