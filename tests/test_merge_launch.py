"""The host side of a CUDA launch, checked without a GPU: `_launch` runs on CPU tensors' descriptions with the
module load and the driver call replaced by a recorder. Covers what would otherwise only fail on a GPU: the
params struct packed in the .cu field order, vector widths that every row start is aligned to, a grid that
covers every row, no launch for empty inputs, and exact row -> (token, head) division."""

from __future__ import annotations

import inspect
import random
import re
import struct

import pytest
import torch
from merge_utils import FP8, LAYOUTS, make_case

import cupy_ops
from cupy_ops._runtime import compiler, launcher
from cupy_ops.ops import merge_attn_states as mas

MAX_THREADS_PER_BLOCK = 256  # the kernel's __launch_bounds__


@pytest.fixture
def launches(monkeypatch) -> list:
    """Each launch as (kernel name expression, grid, (block x, block y), params layout, params); nothing reaches
    a driver. Arguments are read by name from `launcher.launch`'s signature, whatever their order."""
    calls = []
    signature = inspect.signature(launcher.launch)

    def record(*args, **kwargs):
        a = signature.bind(*args, **kwargs).arguments
        block = a["block"] if "block" in a else (a["block_x"], a["block_y"])
        calls.append((a["function"], a["grid"], tuple(block), a["params_layout"], tuple(a["params"])))

    monkeypatch.setattr(launcher.Kernel, "function", lambda self, device: self.name_expression)
    monkeypatch.setattr(cupy_ops._runtime, "launch", record)
    monkeypatch.setattr(mas, "_configs", {})  # configs hold the loaded function: build them under the fake
    return calls


def _launch(case) -> None:
    mas._launch(mas._check(*case.args()), 0)


def _struct_fields() -> list[tuple[str, int]]:
    """(field name, 8-byte words) of MergeAttnStatesParams, read from the kernel source."""
    text = (compiler.kernel_dir() / mas.SOURCE).read_text()
    body = re.search(r"struct MergeAttnStatesParams \{(.*?)\n\};", text, re.DOTALL).group(1)
    fields = []
    for line in body.splitlines():
        line = line.split("//")[0].strip()
        if line:
            kind, name, count = re.fullmatch(r"(?:const\s+)?([\w:]+\*?)\s+(\w+)(?:\[(\d+)\])?;", line).groups()
            fields.append((name, 3 if kind == "fast_divmod" else int(count or 1)))
    return fields


def _template_arguments(name_expression: str) -> list[str]:
    return [a.strip() for a in name_expression[name_expression.index("<") + 1:-1].split(",")]


@pytest.mark.parametrize("fp8", [False, True], ids=["float16", "fp8"])
@pytest.mark.parametrize("with_output_lse", [True, False], ids=["lse", "no-lse"])
def test_params_follow_the_struct_field_order(launches, fp8, with_output_lse):
    """Every value lands in the .cu struct field of its name (distinct strides per tensor expose a swap)."""
    n, h, d = 7, 3, 40
    case = make_case(n, h, d, torch.float16, "cpu", fp8=fp8, p=4, with_output_lse=with_output_lse,
                     layout="padded")
    _launch(case)
    (_, _, _, layout, params), = launches
    lse = case.output_lse
    expected = {
        "output": [case.output.data_ptr()], "output_lse": [0 if lse is None else lse.data_ptr()],
        "prefix_output": [case.prefix_output.data_ptr()], "prefix_lse": [case.prefix_lse.data_ptr()],
        "suffix_output": [case.suffix_output.data_ptr()], "suffix_lse": [case.suffix_lse.data_ptr()],
        "output_scale": [case.output_scale.data_ptr() if fp8 else 0],
        "prefill_tokens": [4], "num_rows": [n * h], "num_heads": [h], "head_size": [d],
        "row_to_token": list(launcher.fast_divmod(h)),
        "output_stride": list(case.output.stride()[:2]), "prefix_stride": list(case.prefix_output.stride()[:2]),
        "suffix_stride": list(case.suffix_output.stride()[:2]),
        "output_lse_stride": [0, 0] if lse is None else list(lse.stride()),
        "prefix_lse_stride": list(case.prefix_lse.stride()), "suffix_lse_stride": list(case.suffix_lse.stride()),
    }
    fields = _struct_fields()
    assert sorted(name for name, _ in fields) == sorted(expected)
    assert [len(expected[name]) for name, _ in fields] == [words for _, words in fields]
    assert layout.size == 8 * sum(words for _, words in fields)
    # Every value of this case is >= 0, so reading all words as unsigned compares pointers and strides alike.
    words = struct.unpack(f"<{layout.size // 8}Q", layout.pack(*params))
    assert list(words) == [value for name, _ in fields for value in expected[name]]


@pytest.mark.parametrize("kind", ["float32", "float16", "bfloat16-to-fp8"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("d", [5, 100, 128, 2201])
def test_vector_width_and_grid(launches, kind, layout, d):
    """The chosen kernel's vector width divides every row start of every [n, h, d] tensor (in bytes: width x
    item size), is at most d, and is the widest (16 bytes) for aligned contiguous rows and 1 at odd offsets;
    blocks stay within 256 threads, cover every row, and a row's threads cover d (or loop at 256 threads)."""
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16-to-fp8": torch.bfloat16}[kind]
    n, h = 9, 5
    case = make_case(n, h, d, dtype, "cpu", fp8=kind.endswith("fp8"), layout=layout)
    _launch(case)
    (name, grid, (threads_per_row, rows_per_block), _, _), = launches
    scalar, out, vec, wide = _template_arguments(name)
    vec = int(vec)
    assert scalar == {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}[dtype]
    assert out == ("cupy_ops::fp8_e4m3" if case.output.dtype == FP8 else scalar) and wide == "false"
    for t in (case.output, case.prefix_output, case.suffix_output):
        step = vec * t.element_size()
        starts = [t[i, j].data_ptr() for i in range(n) for j in range(h)]
        assert all(s % step == 0 for s in starts), f"{vec}-element vectors misaligned on a row of {tuple(t.stride())}"
    assert vec <= d
    widest = 16 // case.prefix_output.element_size()
    if layout == "contiguous" and d % widest == 0:
        assert vec == widest
    if layout in ("offset1", "offset_mixed"):
        assert vec == 1
    assert threads_per_row * rows_per_block <= MAX_THREADS_PER_BLOCK
    assert grid * rows_per_block >= n * h and (grid - 1) * rows_per_block < n * h
    assert threads_per_row * vec >= d or threads_per_row == MAX_THREADS_PER_BLOCK


@pytest.mark.parametrize("shape", [(0, 4, 64), (5, 0, 64)], ids=["no-tokens", "no-heads"])
def test_no_launch_without_rows(launches, shape):
    """No rows: no launch (a zero-size grid is an error, and CuPy-style clamping would run one block)."""
    _launch(make_case(*shape, torch.float16, "cpu"))
    assert launches == []


@pytest.mark.parametrize("divisor", [1, 2, 3, 5, 7, 8, 32, 48, 100, 128, 1000, 65537, 2**31 - 1])
def test_fast_divmod_is_exact_below_2_pow_31(divisor):
    """q = (n * multiplier mod 2^64) >> shift, as common/fast_divmod.cuh computes it, equals n // divisor for
    every n < 2^31 tried: the ends of the range, multiples of the divisor and their neighbours, random values."""
    d, multiplier, shift = launcher.fast_divmod(divisor)
    assert d == divisor and 0 <= multiplier < 2**64 and shift < 64
    rng = random.Random(divisor)
    ns = {0, 1, 2**31 - 1, 2**31 - 2, divisor - 1, divisor}
    for q in [1, 2, 3, (2**31 - 1) // divisor - 1, (2**31 - 1) // divisor]:
        ns.update({q * divisor - 1, q * divisor, q * divisor + 1})
    ns.update(rng.randrange(2**31) for _ in range(2000))
    for value in sorted(v for v in ns if 0 <= v < 2**31):
        assert ((value * multiplier) % 2**64) >> shift == value // divisor, value
