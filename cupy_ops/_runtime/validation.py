"""Validation of one call against an op's declarations, before anything is launched or written: kinds, devices,
dtypes, shapes, strides, scalar types, the op's own `check`, and memory overlap of written tensors. Every error is
a ValueError or TypeError naming the op and the argument."""

from __future__ import annotations

import numbers
from typing import Any

import torch

from . import arrays, launcher
from .records import Call, TensorArg, TensorInfo

__all__ = ["overlap_pairs", "same_layout", "validate"]


def validate(op, args: tuple) -> tuple[Call, list]:
    """Check every argument of `op` (torch tensors on one device, or CuPy arrays); return the `Call` that `check`
    and `plan` see and each tensor argument's `arrays.ArrayInfo` (None when absent), in schema order."""
    name = op.name
    info: dict[str, arrays.ArrayInfo | None] = {}
    kind = None
    for spec in op.tensor_args:
        value = args[op.arguments.index(spec.name)]
        if value is None:
            if spec.name not in op.optional:
                raise TypeError(f"{name}: {spec.name} must be a tensor, got None")
            info[spec.name] = None
            continue
        info[spec.name] = arrays.describe(value, name, spec.name, kind)
        kind = kind or (torch.Tensor if isinstance(value, torch.Tensor) else type(value))
        if spec.name in op.writes and getattr(value, "requires_grad", False):
            raise ValueError(f"{name}: {spec.name} requires grad, but the op writes it in place and has no backward "
                             "(pass a tensor that does not require grad: .detach(), or torch.no_grad())")
    given = [(n, i) for n, i in info.items() if i is not None]
    device = given[0][1].device if given else arrays.CPU
    for arg, i in given:
        if i.device != device:
            raise ValueError(f"{name}: {arg} is on {arrays.device_name(i.device)} but {given[0][0]} is on "
                             f"{arrays.device_name(device)}; all tensors must be on one device")
    if device >= 0:
        _check_arch(name, given[0][0], device)
    dims: dict[str, int] = {}
    bound_by: dict[str, str] = {}
    for spec in op.tensor_args:
        i = info[spec.name]
        if i is None:
            continue
        if spec.dtypes is not None:
            _check_dtype(name, spec, i.dtype, info)
        if spec.shape is not None:
            _check_shape(name, spec, i.shape, dims, bound_by)
        if spec.unit_last_stride and i.shape and i.shape[-1] > 1 and i.strides[-1] != 1:
            raise ValueError(f"{name}: {spec.name} must have a contiguous last dimension (stride 1), got strides "
                             f"{tuple(i.strides)}")
    values: dict[str, Any] = {}
    for position in op._scalar_positions:
        arg = op.arguments[position]
        values[arg] = _check_scalar(name, arg, args[position], op.scalar_types[arg], arg in op.optional)
    for spec in op.tensor_args:
        i = info[spec.name]
        values[spec.name] = None if i is None else TensorInfo(
            i.dtype, tuple(i.shape), tuple(i.strides), i.itemsize, i.ptr & 15 if spec.aligned else None)
    call = Call(name, values, dims, device)
    if op.check is not None:
        op.check(call)
    _check_overlap(op, info, addresses=device != arrays.META)  # meta tensors: no memory for two to share
    return call, [info[n] for n in op.tensor_names]


def _check_dtype(name: str, spec: TensorArg, dtype, info: dict) -> None:
    entries = (spec.dtypes,) if isinstance(spec.dtypes, str) else spec.dtypes
    accepted = [info[d].dtype if isinstance(d, str) and info[d] is not None else d for d in entries]
    if dtype not in accepted:
        names = [f"{d}'s dtype ({dtype_name(a)})" if isinstance(d, str) else dtype_name(d)
                 for d, a in zip(entries, accepted)]
        raise TypeError(f"{name}: {spec.name} must be {_or(names)}, got {dtype_name(dtype)}")


def _check_shape(name: str, spec: TensorArg, shape: tuple, dims: dict, bound_by: dict) -> None:
    want = spec.shape
    pretty = "[" + ", ".join(map(str, want)) + "]"
    if len(shape) != len(want):
        raise ValueError(f"{name}: {spec.name} must be {pretty}, got shape {tuple(shape)}")
    for size, symbol in zip(shape, want):
        expected = symbol if isinstance(symbol, int) else dims.setdefault(symbol, size)
        if size != expected:
            source = f" ({symbol} = {expected} from {bound_by[symbol]})" if symbol in bound_by else ""
            raise ValueError(f"{name}: {spec.name} has shape {tuple(shape)}, expected {pretty}{source}")
        if isinstance(symbol, str):
            bound_by.setdefault(symbol, spec.name)


def overlap_pairs(op):
    """(written argument, other argument, same view allowed) for every pair whose memory must not overlap."""
    may_alias = {t.name: set(t.may_alias) for t in op.tensor_args}
    done = set()
    for w in op.tensor_names:
        if w not in op.writes:
            continue
        for other in op.tensor_names:
            if other != w and (other, w) not in done:
                done.add((w, other))
                yield w, other, other in may_alias[w] or w in may_alias[other]


def _check_overlap(op, info: dict, addresses: bool = True) -> None:
    """Written tensors whose elements share memory (a layout question), then, with `addresses`, written tensors
    that overlap another argument."""
    for arg in op.writes:
        i = info.get(arg)
        if i is not None and arrays.has_internal_overlap(i):
            raise ValueError(f"{op.name}: {arg} must not have elements that share memory (an expanded view?)")
    if not addresses:
        return
    for w, other, same_ok in overlap_pairs(op):
        a, b = info[w], info[other]
        if a is None or b is None or not arrays.elements_overlap(a, b):
            continue
        if same_ok and a.ptr == b.ptr and same_layout(a, b):
            continue
        raise ValueError(f"{op.name}: {w} {'partially overlaps' if same_ok else 'overlaps'} {other} in memory")


def same_layout(a: arrays.ArrayInfo, b: arrays.ArrayInfo) -> bool:
    return a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype


# The oldest compute capability served: CI compiles every kernel for sm_80 and sm_90, and the top-k kernels use
# sm_80 instructions (__reduce_add_sync), so an older GPU would meet an NVRTC error at its first call instead.
MIN_ARCH = 80


def _check_arch(op: str, arg: str, device: int) -> None:
    arch = launcher.device_arch(device)
    if arch < MIN_ARCH:
        raise ValueError(f"{op}: {arg} is on cuda:{device}, a GPU of compute capability {arch // 10}.{arch % 10}; "
                         f"cupy_ops needs {MIN_ARCH // 10}.{MIN_ARCH % 10} or newer (A100, A10, L4, H100 and later)")


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _or(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


# Schema scalar type -> (the values accepted, the Python type check and plan see). NumPy's integer and float scalars
# pass, as torch.ops takes them (numbers.Integral / numbers.Real); bool is an int to Python but not to the schema.
_SCALAR_KINDS = {"int": (numbers.Integral, int), "float": (numbers.Real, float), "bool": (bool, bool)}


def _check_scalar(op: str, name: str, value, type_name: str, optional: bool):
    if value is None:
        if optional:
            return None
        raise TypeError(f"{op}: {name} must be {type_name}, got None")
    kind = _SCALAR_KINDS.get(type_name)
    if kind is None:
        raise TypeError(f"{op}: {name} has schema type {type_name}, which cupy_ops does not validate yet")
    accepted, python_type = kind
    if not isinstance(value, accepted) or (python_type is not bool and isinstance(value, bool)):
        raise TypeError(f"{op}: {name} must be {'an' if type_name == 'int' else 'a'} {type_name}"
                        f"{' or None' if optional else ''}, got {type(value).__name__}")
    return python_type(value)
