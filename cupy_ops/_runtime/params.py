"""A kernel's params struct, declared field by field in Python as the `.cu` declares it in C.

Every kernel takes one plain-old-data struct by value (mamba's and FlashInfer's kernel ABI). The op declares it
once with the field constructors below, in the C order; `CStruct` lays the fields out with C's natural
alignment and packs them with `struct`. Pointer fields come first and are bound to tensor arguments (or scratch
buffers) by name: the runtime fills them per call. Every other field is a number fixed per layout, which the
op's plan supplies once; a call then packs only its pointers and one pre-packed tail. `tests/test_params.py`
checks every op's declaration against its `.cu` (names, types, counts, and offsets and size through NVRTC).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import NamedTuple

__all__ = ["CStruct", "Field", "f32", "f64", "fast_divmod", "i32", "i64", "ptr", "u32", "u64", "u8"]


class Field(NamedTuple):
    """One struct member: `count` consecutive values of C type `ctype` (struct format `fmt`). A pointer field
    (`ctype` "ptr") carries `source`, the argument or scratch buffer whose data pointer it gets."""

    name: str
    ctype: str
    fmt: str
    count: int = 1
    source: str | None = None

    @property
    def size(self) -> int:
        return struct.calcsize("<" + self.fmt) * self.count

    @property
    def align(self) -> int:
        return 8 if self.ctype == "fast_divmod" else struct.calcsize("<" + self.fmt[0])


def ptr(name: str, source: str | None = None) -> Field:
    """A device pointer (any `T*`), filled per call with the data pointer of argument `source` (default: the
    argument called `name`), or 0 when that optional argument is None."""
    return Field(name, "ptr", "Q", 1, source or name)


def i64(name: str, count: int = 1) -> Field:
    return Field(name, "int64_t", "q", count)


def u64(name: str, count: int = 1) -> Field:
    return Field(name, "uint64_t", "Q", count)


def i32(name: str, count: int = 1) -> Field:
    return Field(name, "int", "i", count)


def u32(name: str, count: int = 1) -> Field:
    return Field(name, "uint32_t", "I", count)


def u8(name: str, count: int = 1) -> Field:
    """A `bool` or `unsigned char`."""
    return Field(name, "uint8_t", "B", count)


def f32(name: str, count: int = 1) -> Field:
    return Field(name, "float", "f", count)


def f64(name: str, count: int = 1) -> Field:
    return Field(name, "double", "d", count)


def fast_divmod(name: str) -> Field:
    """common/fast_divmod.cuh's `fast_divmod` (divisor, multiplier, shift: 3 x uint64); its value is
    `launcher.fast_divmod(divisor)`."""
    return Field(name, "fast_divmod", "3Q", 1)


class CStruct:
    """A C struct's layout: `CStruct("MergeAttnStatesParams", [ptr("output"), ..., i64("num_rows"), ...])`.

    `pointers`: the pointer fields, in order (they must come first); `pack(values)` packs the other fields
    from a {name: value} mapping into the fixed tail; `pack_into(buffer, 0, *pointer_values, tail)` writes the
    whole struct."""

    def __init__(self, name: str, fields: Sequence[Field]):
        self.name = name
        self.fields = tuple(fields)
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"{name}: duplicate field names")
        kinds = [f.ctype == "ptr" for f in self.fields]
        if kinds != sorted(kinds, reverse=True):
            raise ValueError(f"{name}: pointer fields must come first (the per-call part of the struct)")
        self.pointers = tuple(f for f in self.fields if f.ctype == "ptr")
        # Pointers are 8 bytes each from offset 0; the tail's format carries C's padding explicitly.
        self.offsets = {f.name: 8 * i for i, f in enumerate(self.pointers)}
        offset, tail_format, max_align = 8 * len(self.pointers), "<", 8
        for f in self.fields[len(self.pointers):]:
            pad = -offset % f.align
            offset += pad
            self.offsets[f.name] = offset
            tail_format += (f"{pad}x" if pad else "") + f.fmt * f.count
            offset += f.size
            max_align = max(max_align, f.align)
        self.size = offset + (-offset % max_align)
        tail_bytes = self.size - 8 * len(self.pointers)
        self._tail = struct.Struct(tail_format + (f"{self.size - offset}x" if self.size > offset else ""))
        assert self._tail.size == tail_bytes, (self.name, self._tail.size, tail_bytes)
        self.pack_into = struct.Struct(f"<{len(self.pointers)}Q{tail_bytes}s").pack_into

    def pack(self, values: Mapping[str, object]) -> bytes:
        """The fixed tail (every non-pointer field) packed from `values`; arrays take sequences, fast_divmod a
        (divisor, multiplier, shift) triple."""
        missing = [f.name for f in self.fields[len(self.pointers):] if f.name not in values]
        extra = sorted(set(values) - {f.name for f in self.fields})
        if missing or extra:
            raise ValueError(f"{self.name}: values missing for {missing}, unknown fields {extra}")
        flat = []
        for f in self.fields[len(self.pointers):]:
            value = values[f.name]
            if f.ctype == "fast_divmod" or f.count > 1:
                flat.extend(value)
            else:
                flat.append(value)
        return self._tail.pack(*flat)

    def __repr__(self) -> str:
        return f"CStruct({self.name!r}, {len(self.fields)} fields, {self.size} bytes)"
