"""What an op declares and what its `check` and `plan` see: the records of `cupy_ops._runtime.op`."""

from __future__ import annotations

from typing import Any, NamedTuple

from .launcher import Kernel, LaunchConfig
from .params import CStruct

__all__ = ["Call", "Launch", "Memset", "Scratch", "TensorArg", "TensorInfo"]


class TensorArg(NamedTuple):
    """A tensor argument of the schema, as validation sees it.

    role: "in" (read), "out" (written, not read: tests poison it) or "inout" (read, then written). Only schema
        arguments marked written (`Tensor!`) may be "out" or "inout"; one the kernel only reads may still be "in"
        (vLLM's selective_scan_fwd marks inputs `Tensor!`): overlap rules follow the roles.
    shape: one entry per dimension, a symbol (str) bound by the first argument that has it or an int; None
        accepts any shape (the op's `check` decides).
    dtypes: accepted dtypes (TypeError otherwise); an entry may be the name of an earlier argument, accepting
        its dtype ("x" alone: the same dtype as x; ("logits", torch.float32): logits' dtype or float32); None
        accepts any (the op's `check` decides).
    unit_last_stride: the last dimension must have stride 1 (when it has more than one element).
    aligned: the plan reads this pointer's alignment (`TensorInfo.align`, its address modulo 16): the layout
        cache then keys on it.
    may_alias: (written arguments) inputs this argument may be exactly (same address, strides and dtype), as in
        an in-place call; any other overlap with another argument is rejected.
    """

    name: str
    role: str = "in"
    shape: tuple | None = None
    dtypes: tuple | str | None = None
    unit_last_stride: bool = False
    aligned: bool = False
    may_alias: tuple[str, ...] = ()


class TensorInfo(NamedTuple):
    """A tensor argument as `check` and `plan` see it: no data pointer, only its alignment where declared."""

    dtype: Any
    shape: tuple
    strides: tuple
    itemsize: int
    align: int | None  # address % 16 for `aligned` arguments, else None

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


class Launch(NamedTuple):
    """Launch `kernel` with `config`; its params struct `params` gets `values` (every non-pointer field)."""

    kernel: Kernel
    config: LaunchConfig
    params: CStruct
    values: dict


class Memset(NamedTuple):
    """Set the first `nbytes` bytes of tensor argument (or scratch buffer) `target` to `value`, on the stream."""

    target: str
    nbytes: int
    value: int = 0


class Scratch(NamedTuple):
    """A temporary device buffer of `nbytes` bytes for this call (torch's caching allocator, or CuPy's pool for
    CuPy arrays), named so that pointer fields and memsets can use it. Uninitialised. 0 bytes: no buffer, and
    the pointer fields naming it get a null pointer (a plan that needs none says so without another struct)."""

    name: str
    nbytes: int


class Call:
    """What `check` and `plan` see: every argument by name (`TensorInfo`, None for an absent optional tensor, or
    the scalar's value), `dims` (symbol -> size), `device` (CUDA ordinal, or arrays.CPU / arrays.META)."""

    def __init__(self, op: str, values: dict, dims: dict, device: int):
        self.__dict__.update(values)
        self.op, self.dims, self.device = op, dims, device

    def reject(self, arg: str, message: str, error: type = ValueError):
        """Raise `error` naming the op and `arg`: `call.reject("output", "must be ...")`."""
        raise error(f"{self.op}: {arg} {message}")
