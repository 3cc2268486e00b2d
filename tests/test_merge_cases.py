"""merge_attn_states on each device (the CPU kernel here; the CUDA kernel on a GPU): layouts, head sizes, empty
inputs, lse special values, fp8 quantisation, the prefill count, in-place calls. Outputs are poisoned first and
compared with the float64 reference; buffers around every output keep their poison."""

from __future__ import annotations

import math

import pytest
import torch
from merge_utils import (
    DEVICES,
    FP8,
    LAYOUTS,
    assert_bitwise_equal,
    assert_close,
    check_outputs,
    kinds,
    make_case,
    poison_,
    run_and_check,
    strided,
    synchronize,
)

import cupy_ops

# Output kinds of the layout grids: the three input dtypes (vector widths 4, 8, 8) and fp8 output (1-byte stores).
KINDS = kinds("float32", "float16", "bfloat16", "bfloat16-to-fp8")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("d", [100, 128])
def test_layouts(device, kind, layout, d):
    """Every named layout (merge_utils.LAYOUTS says why each exists) for every output kind. d = 128 allows the
    widest vectors; d = 100 is not a multiple of the 16-byte pack. 19 tokens x 3 heads: odd, and more than one
    block of rows; p = n // 2 so both the merge and the copy path run."""
    dtype, fp8 = KINDS[kind]
    case = make_case(19, 3, d, dtype, device, fp8=fp8, p=9, layout=layout, seed=d)
    run_and_check(case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["float32", "float16", "bfloat16-to-fp8"])
@pytest.mark.parametrize("layout", ["contiguous", "padded"])
@pytest.mark.parametrize("d", [1, 5, 33, 80, 96, 2201])
def test_head_sizes(device, kind, layout, d):
    """Head sizes that are not a multiple of the pack: 1, 5, 33 (scalar tails), 80 and 96 (vLLM's odd-multiple
    sizes), and 2201, past 256 threads x 8 elements per row, so threads loop and one of them owns a ragged tail.
    "padded" keeps 16-byte row starts, so the kernel takes vectors for the body and scalars for the tail."""
    dtype, fp8 = KINDS[kind]
    case = make_case(5, 3, d, dtype, device, fp8=fp8, p=3, layout=layout, seed=d)
    run_and_check(case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 8, 128), (0, 1, 5), (4, 0, 64)], ids=["n0", "n0-odd-d", "h0"])
@pytest.mark.parametrize("p", [None, 0])
def test_empty_inputs_are_a_no_op(device, shape, p):
    """No rows to merge: no error and no element of any output buffer written (vLLM launched a block anyway)."""
    case = make_case(*shape, torch.float16, device, p=p, layout="head_slice")
    run_and_check(case)
    case = make_case(*shape, torch.bfloat16, device, fp8=True, p=p, layout="offset1")
    run_and_check(case)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_head_size_still_writes_output_lse(device):
    """d = 0 leaves no output element, but the merged lse of every (head, token) is still defined and written."""
    case = make_case(6, 3, 0, torch.float16, device, p=4)
    run_and_check(case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["output_lse-no-tokens", "output-no-heads"])
def test_empty_views_with_zero_strides_are_a_no_op(device, which):
    """An empty tensor has no elements to overlap, whatever its strides (torch.as_strided can give a 0 stride)."""
    n, h, d = (0, 4, 64) if which == "output_lse-no-tokens" else (5, 0, 64)
    case = make_case(n, h, d, torch.float16, device)
    if which == "output_lse-no-tokens":
        case.output_lse = case.output_lse.as_strided((h, n), (0, 1))
    else:
        case.output = case.output.as_strided((n, h, d), (0, d, 1))
    case.outputs = [(getattr(case, name), buffer, name) for _, buffer, name in case.outputs]
    run_and_check(case)


# (prefix lse, suffix lse) pairs with special values. +-inf means "this side saw no keys" (either sign); NaN
# propagates. Each pair is its own test, so a failure names the pair.
INF, NAN = math.inf, math.nan
LSE_PAIRS = {
    "prefix-empty(-inf)": (-INF, 1.5), "prefix-empty(+inf)": (INF, 1.5),
    "suffix-empty(-inf)": (1.5, -INF), "suffix-empty(+inf)": (1.5, INF),
    "both-empty(-inf,-inf)": (-INF, -INF), "both-empty(+inf,-inf)": (INF, -INF),
    "both-empty(-inf,+inf)": (-INF, INF), "both-empty(+inf,+inf)": (INF, INF),
    "tie": (2.0, 2.0), "far-apart": (0.0, 30.0), "large": (100.0, 99.0), "large-negative": (-100.0, -101.0),
    "nan-prefix": (NAN, 1.0), "nan-suffix": (1.0, NAN), "nan-both": (NAN, NAN),
    "nan-prefix,suffix-empty(-inf)": (NAN, -INF), "nan-suffix,prefix-empty(-inf)": (-INF, NAN),
    "nan-prefix,suffix-empty(+inf)": (NAN, INF), "nan-suffix,prefix-empty(+inf)": (INF, NAN),
}


def _expected_merge(P: float, S: float, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The spec's rule for one (token, head), written out case by case in float64 (independent of the op)."""
    if math.isnan(P) or math.isnan(S):
        return torch.full_like(x, NAN), NAN
    if math.isinf(P) and math.isinf(S):
        return x, -INF
    if math.isinf(P):
        return y, S
    if math.isinf(S):
        return x, P
    w = 1.0 / (1.0 + math.exp(S - P))  # prefix weight
    return x * w + y * (1.0 - w), max(P, S) + math.log1p(math.exp(-abs(P - S)))


@pytest.mark.parametrize("pair", LSE_PAIRS)
@pytest.mark.parametrize("device", DEVICES)
def test_lse_special_values(device, pair):
    """Every (token, head) gets the same lse pair; outputs are poisoned with a finite sentinel, since NaN is an
    expected result here."""
    P, S = LSE_PAIRS[pair]
    n, h, d = 3, 2, 40
    case = make_case(n, h, d, torch.float32, device, lse="finite", seed=3)
    case.prefix_lse.fill_(P)
    case.suffix_lse.fill_(S)
    x, y = case.prefix_output.double(), case.suffix_output.double()
    expected_out, expected_lse = _expected_merge(P, S, x, y)
    for view, buffer, name in case.outputs:
        poison_(buffer, finite=True)
    cupy_ops.merge_attn_states(*case.args())
    synchronize(device)
    assert_close(case.output, expected_out.float(), f"output for lse pair {pair}")
    assert_close(case.output_lse, torch.full((h, n), expected_lse, device=device), f"output_lse for {pair}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_fp8_quantisation(device, input_dtype):
    """fp8 output = value / output_scale, clamped to +-448 (e4m3fn's largest finite value); NaN becomes +448;
    on the merge path and on the copy path (tokens t >= p). Values are chosen so that value / scale is exactly
    representable or out of range, so the expectations need no rounding model."""
    scale = 0.25
    targets = [0.0, 0.5, -1.125, 2.0**-9, 448.0, -448.0, 1000.0, -1e30, INF, -INF, NAN]
    expected = [0.0, 0.5, -1.125, 2.0**-9, 448.0, -448.0, 448.0, -448.0, 448.0, -448.0, 448.0]
    n, h, d, p = 4, 2, len(targets), 2
    values = (torch.tensor(targets, dtype=torch.float64) * scale).to(input_dtype).to(device).expand(n, h, d)
    prefix = values.contiguous()
    # Merged tokens: prefix lse 0, suffix empty, so a = 1 and b = 0 on a zero suffix (an inf suffix would give
    # inf * 0 = NaN); copied tokens: the suffix holds the values.
    suffix = torch.zeros_like(prefix)
    suffix[p:] = values[p:]
    prefix_lse = torch.zeros(h, n, device=device)
    suffix_lse = torch.full((h, n), -INF, device=device)
    out = poison_(torch.empty(n, h, d, dtype=FP8, device=device))
    output_scale = torch.tensor([scale], device=device)
    cupy_ops.merge_attn_states(out, None, prefix, prefix_lse, suffix, suffix_lse, p, output_scale)
    synchronize(device)
    want = torch.tensor(expected, device=device).to(FP8).expand(n, h, d)
    assert_bitwise_equal(out, want, "fp8 output (tokens 0-1 merged, 2-3 copied)")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["float16", "bfloat16-to-fp8"])
@pytest.mark.parametrize("p_kind", ["none", "zero", "half", "all"])
@pytest.mark.parametrize("with_output_lse", [True, False], ids=["lse", "no-lse"])
def test_prefill_tokens_and_output_lse(device, kind, p_kind, with_output_lse):
    """p in {None, 0, n // 2, n}, with and without output_lse. Tokens t >= p copy the suffix bit for bit and
    output_lse there is suffix_lse bit for bit, +inf included (random lse: ~20% of suffix values are +-inf)."""
    dtype, fp8 = KINDS[kind]
    n = 21
    p = {"none": None, "zero": 0, "half": n // 2, "all": n}[p_kind]
    case = make_case(n, 4, 64, dtype, device, fp8=fp8, p=p, with_output_lse=with_output_lse, seed=21)
    run_and_check(case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target", ["prefix_output", "suffix_output"])
@pytest.mark.parametrize("layout", ["contiguous", "head_major"])
def test_output_may_be_an_input(device, target, layout):
    """output given as exactly prefix_output (or suffix_output), same pointer and strides: allowed, and correct,
    since each element is read before it is written."""
    case = make_case(13, 4, 48, torch.bfloat16, device, p=9, layout=layout, seed=4)
    original = case.prefix_output.clone() if target == "prefix_output" else case.suffix_output.clone()
    expected_out, expected_lse = case.reference()
    case.output = getattr(case, target)
    poison_(case.output_lse)
    cupy_ops.merge_attn_states(*case.args())
    synchronize(device)
    if target == "suffix_output":
        case.suffix_output = original  # the copy path's expectation is the suffix as it was
    check_outputs(case, expected_out, expected_lse)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["float16", "bfloat16-to-fp8"])
def test_registered_op_matches_the_public_function(device, kind):
    """torch.ops.cupy_ops.merge_attn_states (the dispatcher path that torch.compile uses) gives the same result."""
    dtype, fp8 = KINDS[kind]
    case = make_case(17, 5, 72, dtype, device, fp8=fp8, p=11, layout="head_major", seed=8)
    run_and_check(case, entry=torch.ops.cupy_ops.merge_attn_states)


@pytest.mark.parametrize("device", DEVICES)
def test_head_size_one_ignores_last_stride(device):
    """With d = 1 the last-dim stride is never stepped, so a strided last dim is accepted and read correctly."""
    n, h = 7, 3
    case = make_case(n, h, 1, torch.float16, device, p=5, seed=2)
    wide, buffer = strided((n, h, 2), (2 * h, 2, 1), 0, torch.float16, device)
    case.output = wide[:, :, 1:]  # strides (2h, 2, 1) but a size-1 last dim: pointer at odd element offset
    assert case.output.stride() == (2 * h, 2, 1)
    case.outputs[0] = (case.output, buffer, "output")
    run_and_check(case)
