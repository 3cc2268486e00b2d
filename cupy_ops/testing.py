"""Comparison helpers shared by the self-check (`python -m cupy_ops check`), the tests and the benchmarks: the one
tolerance table by dtype, poisoning, and the default comparison of an op's written tensors with its reference."""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn

# (rtol, atol) for a result rounded to `dtype`, against a float64 reference, keyed by the compared tensor's dtype.
# - float16 / bfloat16: rtol just above one ulp (2^-10 and 2^-7 relative): float32 math and the float64
#   reference may round to neighbouring values. atol covers values near zero, where float32 rounding of a sum
#   (~eps32 * |operands|) exceeds the result's ulp.
# - float32: a few ulps of float32 exp/log/divide, with the same atol reason.
# - float8_e4m3fn: one ulp is 2^-3 relative (3 mantissa bits) and 2^-9 absolute among subnormals; compare after
#   dequantisation (value * scale) and scale atol with it.
TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1e-2, 1e-5),
    FP8: (0.125, 2.0**-9),
}
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of `t` as an integer tensor of the same shape (bit-exact comparisons, NaN payloads included)."""
    return t.view(_INT_OF_SIZE[t.element_size()])


def poison(*tensors: torch.Tensor | None) -> None:
    """All bits set: NaN in every float format here and -1 in every integer one, so an element an op does not
    write fails its check."""
    for t in tensors:
        if t is not None:
            t.view(torch.uint8).fill_(0xFF)


def outputs_to_poison(op, args: tuple) -> list[torch.Tensor]:
    """The op's outputs (written, not read) that share no storage with an argument it reads: an output given as an
    input too (an in-place call, where the schema allows it) keeps its values."""
    read = [a for n, a in zip(op.arguments, args) if isinstance(a, torch.Tensor) and n not in op.outputs]
    storages = {(a.device, a.untyped_storage().data_ptr()) for a in read}
    outputs = (args[op.arguments.index(n)] for n in op.outputs)
    return [t for t in outputs if t is not None and (t.device, t.untyped_storage().data_ptr()) not in storages]


def first_differences(bad: torch.Tensor, actual: torch.Tensor, expected: torch.Tensor, count: int = 5) -> str:
    """"<n> of <total> elements differ; first at (i, j): got x, expected y; ..." for a boolean mask `bad`."""
    where = [tuple(i) for i in bad.nonzero()[:count].tolist()]
    details = "; ".join(f"{i}: got {actual[i].item()!r}, expected {expected[i].item()!r}" for i in where)
    return f"{int(bad.sum())} of {bad.numel()} elements differ; first at {details}"


def mismatch(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, *,
             scale: float = 1.0) -> str | None:
    """None when `actual` matches `expected` within TOLERANCE[dtype] (default: actual's dtype) with NaN exactly
    where `expected` has NaN, else what differs. Integer tensors must be equal. fp8: both are multiplied by
    `scale` (the quantisation scale) first."""
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    dtype = dtype or actual.dtype
    a = actual.detach().cpu().to(torch.float64) * scale
    e = expected.detach().cpu().to(torch.float64) * scale
    if not dtype.is_floating_point:
        bad = a != e
        return first_differences(bad, a, e) if bool(bad.any()) else None
    rtol, atol = TOLERANCE[dtype]
    bad = (a.isnan() != e.isnan()) | ~torch.isclose(a, e, rtol=rtol, atol=atol * scale, equal_nan=True)
    if not bool(bad.any()):
        return None
    return f"{first_differences(bad, a, e)} (rtol={rtol}, atol={atol * scale:g})"


def compare_written(op, args: tuple, expected: tuple) -> str | None:
    """The default comparison of an op's written arguments (after a call with `args`) with `expected`, the
    reference's results: each within TOLERANCE of its dtype; fp8 tensors after scaling by the op's
    `output_scale` argument when it has one."""
    scale = args[op.arguments.index("output_scale")] if "output_scale" in op.arguments else None
    for name, want in zip(op.written, expected):
        got = args[op.arguments.index(name)]
        if got is None or want is None:
            continue
        problem = mismatch(got, want, scale=float(scale.reshape(())) if got.dtype == FP8 else 1.0)
        if problem:
            return f"{name}: {problem}"
    return None


def check_example(op, args: tuple) -> str | None:
    """Poison the op's outputs (written, not read; `outputs_to_poison`), run the op, compare every written argument
    with the float64 reference (op.compare, else `compare_written`); None when they agree."""
    written = [args[op.arguments.index(n)] for n in op.written]
    expected = op.reference(*args, compute_dtype=torch.float64)
    poison(*outputs_to_poison(op, args))
    op.public(*args)
    if any(isinstance(t, torch.Tensor) and t.is_cuda for t in written):
        torch.cuda.synchronize()
    return (op.compare or compare_written)(op, args, expected)
