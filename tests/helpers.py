"""Generic helpers every op's tests use: GPU marks and the device axis, verbose comparisons against the one
tolerance table (`cupy_ops.testing.TOLERANCE`), poisoned outputs, strided views with guard elements, and the
op-level checks (a call against the float64 reference, opcheck, torch.compile(fullgraph=True)).

Imported by the test modules (pytest puts tests/ on sys.path); fixtures live in conftest.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from cupy_ops import testing
from cupy_ops.testing import FP8, TOLERANCE, bits

HAS_CUDA = torch.cuda.is_available()
# GPU tests carry both marks: `-m gpu` selects them, and without a GPU they skip with this reason.
gpu = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
requires_two_gpus = pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
# Device axis of the tests that run both the CPU kernel (the reference) and the CUDA kernel.
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=(gpu, requires_cuda))]

SENTINEL = -4096.0   # finite poison (exact in every float dtype) for tests whose reference holds NaN
FP8_NAN_BYTE = 0x7F  # NaN in e4m3fn
GUARD = 7            # poisoned elements after every buffer: a write just past the last element lands there

__all__ = ["DEVICES", "FP8", "GUARD", "HAS_CUDA", "SENTINEL", "TOLERANCE", "assert_bitwise_equal", "assert_close",
           "assert_untouched", "bench_script", "bits", "check_call", "compiled_matches_eager", "gpu", "opcheck", "poison_",
           "requires_cuda", "requires_two_gpus", "strided", "synchronize"]


def bench_script(name: str):
    """bench/<name>.py (a developer's script, not a package module), loaded as a module."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def poison_(t: torch.Tensor, *, finite: bool = False) -> torch.Tensor:
    """Fill `t` with a value the op never writes: NaN (SENTINEL when finite=True; byte 0x7f for fp8; the type's
    least value for integers, as -1 is an index ops do write; True for bool)."""
    if t.dtype == FP8:
        t.view(torch.uint8).fill_(FP8_NAN_BYTE)
    elif t.dtype == torch.bool:
        t.fill_(True)
    elif not t.dtype.is_floating_point:
        t.fill_(torch.iinfo(t.dtype).min)
    else:
        t.fill_(SENTINEL if finite else float("nan"))
    return t


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, *, scale=None) -> None:
    """`actual` within TOLERANCE[actual.dtype] of `expected`, NaN exactly where `expected` has NaN; fp8 compared
    after dequantisation by `scale`. Fails with the count and the first bad indices."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        pytest.fail(f"{what}: got {actual.dtype} {tuple(actual.shape)}, expected {expected.dtype} "
                    f"{tuple(expected.shape)}", pytrace=False)
    problem = testing.mismatch(actual, expected, scale=1.0 if scale is None else float(scale))
    if problem:
        pytest.fail(f"{what}: {problem}", pytrace=False)


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Same shape, dtype and bits (so +inf stays +inf and NaN stays the same NaN)."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        pytest.fail(f"{what}: got {actual.dtype} {tuple(actual.shape)}, expected {expected.dtype} "
                    f"{tuple(expected.shape)}", pytrace=False)
    bad = bits(actual) != bits(expected)
    if bool(bad.any()):
        pytest.fail(f"{what}: not bit-exact: {testing.first_differences(bad, actual, expected)}", pytrace=False)


def strided(shape, strides, offset, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(view, buffer): a view of `shape`/`strides` at element `offset` of a flat buffer with GUARD spare elements."""
    extent = offset + (sum((s - 1) * st for s, st in zip(shape, strides)) + 1 if all(shape) else 0)
    buffer = torch.empty(extent + GUARD, dtype=dtype, device=device)
    return buffer.as_strided(shape, strides, offset), buffer


def assert_untouched(view: torch.Tensor, buffer: torch.Tensor, snapshot: torch.Tensor, what: str) -> None:
    """Every element of `buffer` outside `view` still holds the bits it had in `snapshot`."""
    inside = torch.zeros(buffer.shape, dtype=torch.bool, device=buffer.device)
    inside.as_strided(view.shape, view.stride(), view.storage_offset()).fill_(True)
    bad = ~inside & (bits(buffer) != bits(snapshot))
    if bool(bad.any()):
        pytest.fail(f"{what}: elements outside the view were written: "
                    f"{testing.first_differences(bad, buffer, snapshot)}", pytrace=False)


def check_call(op, args: tuple, entry=None) -> None:
    """Poison the op's outputs (but one given as an input too), call it (`entry`, default the public function),
    and compare every written argument with the float64 reference (op.compare or testing.compare_written)."""
    expected = op.reference(*args, compute_dtype=torch.float64)
    for value in testing.outputs_to_poison(op, args):
        poison_(value)
    (entry or op.public)(*args)
    for name in op.written:
        value = args[op.arguments.index(name)]
        if isinstance(value, torch.Tensor):
            synchronize(value.device)
    problem = (op.compare or testing.compare_written)(op, args, expected)
    if problem:
        pytest.fail(f"{op.name}: {problem}", pytrace=False)


class SchemaArgument(NamedTuple):
    name: str
    type: str
    written: bool
    default: str | None  # repr of the default value, None without one


def schema_arguments(schema) -> list[SchemaArgument]:
    """Each argument of a torch FunctionSchema as what a drop-in's schema must share with vLLM's."""
    return [SchemaArgument(a.name, str(a.type), a.alias_info is not None and a.alias_info.is_write,
                           repr(a.default_value) if a.has_default_value() else None) for a in schema.arguments]


def opcheck(op, args: tuple) -> None:
    """torch.library.opcheck of the registered op: schema (mutations declared), autograd registration, fake
    tensors and AOT dispatch. test_schema compares outputs with torch.allclose, which torch does not implement
    for float8 ("mul_cpu_reduced_float"): skipped for calls that write fp8."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if any(isinstance(a, torch.Tensor) and a.dtype == FP8 for a in args):
        utils = utils[1:]
    torch.library.opcheck(op.overload, args, test_utils=utils)


def compiled_matches_eager(op, make_args) -> None:
    """op.public inside torch.compile(fullgraph=True) (no graph break) writes the same bits as an eager call:
    `make_args()` gives a fresh call's arguments each time (same values)."""
    torch._dynamo.reset()

    def call(*args):
        op.public(*args)
        return tuple(args[op.arguments.index(n)] for n in op.written)

    compiled = torch.compile(call, fullgraph=True)
    got = compiled(*make_args())
    want = call(*make_args())
    for name, g, w in zip(op.written, got, want):
        if isinstance(g, torch.Tensor):
            synchronize(g.device)
            assert_bitwise_equal(g, w, f"{op.name} {name} under torch.compile")
