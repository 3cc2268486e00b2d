"""Every op's params structs, declared in Python (`cupy_ops._runtime.params`), against the C structs in its `.cu`
files: the same members in the same order with the same types and counts (parsed from the source), and the same
offsets and size (static_asserts compiled by NVRTC, no GPU). Also the layout rules of `CStruct` itself."""

from __future__ import annotations

import re

import pytest
from example_op.scaled_copy import OP as EXAMPLE_OP

from cupy_ops._runtime import compiler
from cupy_ops._runtime import params as P
from cupy_ops.ops import ops

# C spellings -> the Field.ctype they declare.
_C_TYPES = {"int64_t": "int64_t", "long long": "int64_t", "uint64_t": "uint64_t", "unsigned long long": "uint64_t",
            "int": "int", "int32_t": "int", "uint32_t": "uint32_t", "unsigned int": "uint32_t", "unsigned": "uint32_t",
            "float": "float", "double": "double", "bool": "uint8_t", "uint8_t": "uint8_t", "unsigned char": "uint8_t",
            "fast_divmod": "fast_divmod"}
_MEMBER = re.compile(r"^\s*(?:const\s+)?([A-Za-z_][\w\s:]*?)\s*(\*?)\s*(?:const\s+)?(\w+)\s*(?:\[(\d+)\])?\s*;")


def _structs():
    """(op, struct, kernel root, .cu file) for every declared struct, found in the sources of the op's kernels."""
    found = []
    for op in [*ops().values(), EXAMPLE_OP]:
        sources = {(k.source, k.root) for k in op.kernels}
        for struct in op.params:
            owner = [(s, r) for s, r in sources if f"struct {struct.name} " in _read(s, r)]
            assert owner, f"{op.name}: struct {struct.name} is in none of {sorted(s for s, _ in sources)}"
            found.append((op.name, struct, owner[0][1], owner[0][0]))
    return found


def _read(source, root):
    return ((compiler.kernel_dir() if root is None else root) / source).read_text()


def _c_members(text: str, name: str) -> list[tuple[str, str, int]]:
    body = re.search(rf"struct {name}\s*{{(.*?)\n}};", text, re.S)
    assert body, f"no 'struct {name} {{ ... }};' found"
    members = []
    for line in body.group(1).splitlines():
        line = line.split("//")[0]
        if not line.strip():
            continue
        match = _MEMBER.match(line)
        assert match, f"cannot read member line {line!r} of {name}"
        ctype, star, member, count = match.groups()
        ctype = "ptr" if star else _C_TYPES[" ".join(ctype.replace("cupy_ops::", "").split())]
        members.append((member, ctype, int(count or 1)))
    return members


STRUCTS = _structs()
IDS = [f"{op}-{struct.name}" for op, struct, _, _ in STRUCTS]


@pytest.mark.parametrize("op_name, struct, root, source", STRUCTS, ids=IDS)
def test_members_match_the_c_struct(op_name, struct, root, source):
    declared = [(f.name, f.ctype, f.count) for f in struct.fields]
    assert declared == _c_members(_read(source, root), struct.name), (
        f"{op_name}: P.CStruct {struct.name!r} (member, C type, count) differs from the struct in {source}")


@pytest.mark.parametrize("op_name, struct, root, source", STRUCTS, ids=IDS)
def test_offsets_and_size_match_nvrtc(op_name, struct, root, source):
    namespaces = re.findall(r"^namespace (\w+)", _read(source, root), re.M)
    checks = [f'static_assert(sizeof({struct.name}) == {struct.size}, "size");']
    # __INTADDR__ (EDG's) makes the classic offsetof a constant: __builtin_offsetof needs NVRTC 13.4+ (12.x and
    # 13.0-13.3 lack it; the H200 machine has 13.0).
    checks += [f"static_assert((unsigned long long)__INTADDR__(&(({struct.name}*)0)->{name}) == {offset}, "
               f'"{name}");' for name, offset in struct.offsets.items()]
    text = "\n".join([f'#include "{source}"', *(f"using namespace {n};" for n in namespaces), *checks])
    compiler.compile_source(text, 90, root=root)


def test_pointers_must_come_first():
    with pytest.raises(ValueError, match="pointer fields must come first"):
        P.CStruct("Bad", [P.i64("n"), P.ptr("x")])


def test_layout_pads_like_c():
    s = P.CStruct("S", [P.ptr("a"), P.i32("n"), P.i64("m"), P.f32("x"), P.u8("flag", 3)])
    assert s.offsets == {"a": 0, "n": 8, "m": 16, "x": 24, "flag": 28} and s.size == 32
    buffer = bytearray(s.size)
    s.pack_into(buffer, 0, 0xABC, s.pack({"n": -1, "m": 2, "x": 1.5, "flag": (1, 0, 1)}))
    assert buffer[:8] == (0xABC).to_bytes(8, "little") and buffer[8:12] == b"\xff" * 4 and buffer[28:31] == b"\1\0\1"


def test_values_must_name_every_field():
    s = P.CStruct("S", [P.ptr("a"), P.i64("n")])
    with pytest.raises(ValueError, match=r"missing for \['n'\]"):
        s.pack({})
    with pytest.raises(ValueError, match=r"unknown fields \['m'\]"):
        s.pack({"n": 1, "m": 2})
