"""Torch tensors and CuPy arrays seen through one small record: pointer, dtype, shape, strides, device.

No conversion happens: a torch tensor gives `data_ptr()` (0.1 us; `cupy.from_dlpack` costs ~33 us per tensor),
a CuPy array gives `data.ptr`. Dtypes are reported as torch dtypes for both kinds so that ops validate once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy
import torch

__all__ = ["CPU", "META", "ArrayInfo", "absent", "byte_extent", "describe", "device_name", "elements_overlap",
           "has_internal_overlap", "is_cupy_array", "memory_span", "metadata_guard", "spans_overlap"]

# CuPy dtype name -> torch dtype (bfloat16 and float8_e4m3fn arrive through ml_dtypes, e.g. via DLPack).
_CUPY_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float64": torch.float64,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


CPU, META = -1, -2  # ArrayInfo.device for CPU and meta tensors; CUDA devices are their ordinals


class ArrayInfo(NamedTuple):
    ptr: int
    dtype: Any            # torch.dtype, or the CuPy/NumPy dtype when torch has no equivalent
    shape: tuple
    strides: tuple        # in elements
    device: int           # CUDA ordinal, CPU (-1) or META (-2)
    itemsize: int


def device_name(device: int) -> str:
    return "cpu" if device == CPU else "meta" if device == META else f"cuda:{device}"


try:  # dynamo's C++ tensor check, a private API: without it `metadata_guard` returns None
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:
    _TensorGuards = None


class _Absent(torch.Tensor):
    """The type of `absent()`'s stand-ins. No caller's tensor has this exact type. Its methods skip
    __torch_function__, so `data_ptr()` is as cheap as a plain tensor's (and 0: it has no storage)."""

    __torch_function__ = torch._C._disabled_torch_function_impl


def absent() -> torch.Tensor:
    """A new stand-in for an optional tensor argument that was not given, in `metadata_guard` checks: a guard
    made with it fails for any tensor in that place, and a guard made with a tensor there fails for it. One per
    optional argument: a guard never passes one object given twice."""
    return torch.empty(0).as_subclass(_Absent)


def metadata_guard(*tensors: torch.Tensor) -> Callable[..., bool] | None:
    """A function that, given as many tensors, says whether each has the exact Python type, dtype, device,
    dispatch keys, requires_grad, sizes and strides of `tensors`: dynamo's TensorGuards, the C++ check that
    torch.compile runs on every call of a compiled function (~0.1 us a tensor; reading shape, dtype, device and
    strides from Python costs ~0.35 us). It also fails when one Python object is given twice (a view of it is
    another object). None where this torch has no usable one."""
    if _TensorGuards is None:
        return None
    try:
        guard = _TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                              dynamic_dims_strides=[list(t.stride()) for t in tensors])
        return guard.check if guard.check(*tensors) else None
    except Exception:  # noqa: BLE001 - another torch's private API: go without
        return None


def is_cupy_array(x: object) -> bool:
    # Never import CuPy just to answer "no"; a CuPy another thread is still importing has no ndarray yet (and
    # holds no arrays either).
    ndarray = getattr(sys.modules.get("cupy"), "ndarray", None)
    return ndarray is not None and isinstance(x, ndarray)


def describe(x: object, op: str, arg: str, kind: type | None) -> ArrayInfo:
    """Describe `x`, which must be of the same kind (torch.Tensor or cupy.ndarray) as `kind`."""
    if type(x) is torch.Tensor or isinstance(x, torch.Tensor):
        if kind is not None and kind is not torch.Tensor:
            raise TypeError(f"{op}: {arg} is a torch.Tensor but other arguments are CuPy arrays; use one kind")
        if x.is_nested or x.layout != torch.strided:
            raise TypeError(f"{op}: {arg} is a {'nested' if x.is_nested else x.layout} tensor; cupy_ops reads "
                            "strided (dense) tensors")
        if x.is_neg() or x.is_conj():  # its memory holds other values than it shows (x.conj().imag, say)
            raise TypeError(f"{op}: {arg} is a lazily negated or conjugated view; call .resolve_neg() or "
                            ".resolve_conj() first")
        device_type = x.device.type
        device = {"cuda": x.device.index, "cpu": CPU, "meta": META}.get(device_type)
        if device is None:
            raise TypeError(f"{op}: {arg} is on {x.device}; cupy_ops runs on CUDA tensors (and its references on "
                            "CPU tensors)")
        if device != META and x.numel():
            low, high = byte_extent(x.shape, x.stride(), x.element_size())
            start = x.storage_offset() * x.element_size()
            try:
                held = x.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError):  # a subclass without a storage of its own: nothing to check
                held = start + high
            if start + low < 0 or start + high > held:
                raise ValueError(f"{op}: {arg} reaches past its storage ({held} bytes): a freed or shrunk storage "
                                 "(resize_(0), FSDP) holds none of what the tensor shows")
        return ArrayInfo(0 if device == META else x.data_ptr(), x.dtype, tuple(x.shape), x.stride(), device,
                         x.element_size())
    if is_cupy_array(x):
        if kind is not None and kind is torch.Tensor:
            raise TypeError(f"{op}: {arg} is a CuPy array but other arguments are torch tensors; use one kind")
        itemsize = x.itemsize
        if any(s % itemsize for s in x.strides):
            raise ValueError(f"{op}: {arg} has strides {x.strides} that are not a multiple of its item size")
        dtype = _CUPY_DTYPES.get(x.dtype.name, x.dtype)
        return ArrayInfo(x.data.ptr, dtype, x.shape, tuple(s // itemsize for s in x.strides), x.device.id,
                         itemsize)
    raise TypeError(f"{op}: {arg} must be a torch.Tensor or a cupy.ndarray, got {type(x).__name__}")


def byte_extent(shape, strides, itemsize: int) -> tuple[int, int]:
    """(first byte, one past the last byte) an array of this layout can touch, relative to its data pointer;
    (0, 0) when it has no elements. Strides in elements, any sign."""
    if 0 in shape:
        return 0, 0
    low = high = 0
    for size, stride in zip(shape, strides):
        reach = (size - 1) * stride
        if reach < 0:
            low += reach
        else:
            high += reach
    return low * itemsize, (high + 1) * itemsize


def memory_span(info: ArrayInfo) -> tuple[int, int]:
    """[first byte, one past the last byte] that the array can touch; empty arrays touch nothing."""
    low, high = byte_extent(info.shape, info.strides, info.itemsize)
    return info.ptr + low, info.ptr + high


def spans_overlap(a: ArrayInfo, b: ArrayInfo) -> bool:
    a0, a1 = memory_span(a)
    b0, b1 = memory_span(b)
    return a0 < b1 and b0 < a1


class _LayoutOnly:
    """A NumPy array interface with `info`'s address, shape and strides: NumPy reads no memory through it."""

    def __init__(self, info: ArrayInfo):
        self.__array_interface__ = {"data": (info.ptr, False), "shape": tuple(info.shape), "version": 3,
                                    "strides": tuple(s * info.itemsize for s in info.strides),
                                    "typestr": f"|V{info.itemsize}"}


# Bound on the work of NumPy's exact overlap test (a small integer program: a few steps per dimension for the
# layouts views make); past it the pair counts as overlapping.
_OVERLAP_MAX_WORK = 100_000


def elements_overlap(a: ArrayInfo, b: ArrayInfo) -> bool:
    """True when an element of `a` and one of `b` share a byte. Spans that overlap are decided exactly (NumPy's
    `shares_memory` on the layouts), so disjoint interleaved views of one buffer, such as the halves of
    `xz.chunk(2, dim=1)` or a tensor's columns and its last column, do not overlap."""
    if 0 in a.shape or 0 in b.shape or not spans_overlap(a, b):
        return False
    try:
        return bool(numpy.shares_memory(numpy.asarray(_LayoutOnly(a)), numpy.asarray(_LayoutOnly(b)),
                                        max_work=_OVERLAP_MAX_WORK))
    except numpy.exceptions.TooHardError:
        return True


def has_internal_overlap(info: ArrayInfo) -> bool:
    """True when two elements share an address (e.g. an expanded, stride-0 output): writes would race."""
    if 0 in info.shape:
        return False  # no elements, nothing to share
    dims = sorted((abs(st), size) for size, st in zip(info.shape, info.strides) if size > 1)
    reach = 1  # elements spanned by the inner dimensions so far
    for stride, size in dims:
        if stride < reach:
            return True
        reach = stride * (size - 1) + reach
    return False
