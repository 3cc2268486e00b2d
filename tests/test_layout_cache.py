"""The runtime's eager CUDA path remembers layouts that passed validation (`Op._layouts`, the recent one in
`Op._recent`), tested on merge_attn_states, the op with the most optional and aliasing arguments. A repeated layout
must still read each call's own pointers, and still reject what depends on the call alone: an output_lse or
output that overlaps an input. Without a GPU every test here skips."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from merge_utils import check_outputs, gpu, make_case, poison_, requires_cuda, run_and_check

import cupy_ops
from cupy_ops.ops.merge_attn_states import OP
from cupy_ops.testing import mismatch

pytestmark = [gpu, requires_cuda]


@pytest.fixture(autouse=True)
def empty_layout_cache():
    OP.forget_layouts()
    yield
    OP.forget_layouts()


@pytest.mark.parametrize("fp8", [False, True], ids=["bfloat16", "fp8"])
@pytest.mark.parametrize("layout", ["contiguous", "head_slice", "offset1"])
def test_repeated_layout_uses_each_calls_tensors_and_count(layout, fp8):
    """Three calls with one layout and fresh tensors (poisoned outputs, float64 reference): the first fills the
    cache, the second hits it, the third has another prefill count: a scalar argument, part of the layout."""
    n, h, d = 37, 8, 128
    run_and_check(make_case(n, h, d, torch.bfloat16, "cuda", fp8=fp8, layout=layout, seed=1))
    assert len(OP._layouts) == 1
    run_and_check(make_case(n, h, d, torch.bfloat16, "cuda", fp8=fp8, layout=layout, seed=2))
    run_and_check(make_case(n, h, d, torch.bfloat16, "cuda", fp8=fp8, layout=layout, seed=3, p=n // 3))
    assert len(OP._layouts) == 2


@pytest.mark.parametrize("p, exception", [(38, ValueError), (-1, ValueError), (True, TypeError),
                                          (5.0, TypeError)], ids=["above-n", "negative", "bool", "float"])
def test_cached_layout_still_checks_the_count(p, exception):
    case = make_case(37, 8, 128, torch.float16, "cuda")
    cupy_ops.merge_attn_states(*case.args())
    assert len(OP._layouts) == 1
    with pytest.raises(exception, match="merge_attn_states: prefill_tokens_with_context"):
        cupy_ops.merge_attn_states(*dataclasses.replace(case, p=p).args())


def test_cached_layout_still_rejects_output_lse_on_an_input():
    """output_lse = prefix_lse has the metadata of a valid output_lse: only the pointers tell them apart."""
    case = make_case(37, 8, 128, torch.float16, "cuda")
    cupy_ops.merge_attn_states(*case.args())
    same_layout = dataclasses.replace(case, output_lse=case.prefix_lse)
    with pytest.raises(ValueError, match="output_lse overlaps prefix_lse"):
        cupy_ops.merge_attn_states(*same_layout.args())


def test_cached_layout_still_rejects_a_partially_overlapping_output():
    """An output one token further into the prefix's buffer: same shape, strides, dtype and alignment."""
    n, h, d = 37, 8, 128
    buffer = torch.randn(n + 1, h, d, device="cuda", dtype=torch.float16)
    first = make_case(n, h, d, torch.float16, "cuda")
    first = dataclasses.replace(first, prefix_output=buffer[:n], outputs=first.outputs)
    cupy_ops.merge_attn_states(*first.args())
    overlapping = dataclasses.replace(first, output=buffer[1:])
    with pytest.raises(ValueError, match="output partially overlaps prefix_output"):
        cupy_ops.merge_attn_states(*overlapping.args())


def test_cached_layout_allows_the_output_to_be_the_suffix():
    """In place (output is suffix_output, same view) is valid: it leaves the cached path and is still correct."""
    case = make_case(37, 8, 128, torch.bfloat16, "cuda")
    cupy_ops.merge_attn_states(*case.args())
    expected_out, expected_lse = case.reference()
    cupy_ops.merge_attn_states(*dataclasses.replace(case, output=case.suffix_output).args())
    torch.cuda.synchronize()
    assert mismatch(case.suffix_output, expected_out, torch.bfloat16) is None
    assert mismatch(case.output_lse, expected_lse, torch.float32) is None


def test_contiguous_tensors_with_odd_size_one_strides_share_a_layout():
    """One token: torch calls [1, h, d] contiguous whatever its token stride, so both calls share one cached
    layout; the odd token stride (only ever multiplied by token 0) must not change the result."""
    h, d = 8, 128
    run_and_check(make_case(1, h, d, torch.bfloat16, "cuda", seed=1))
    case = make_case(1, h, d, torch.bfloat16, "cuda", seed=2)
    odd = {}
    for name in ("output", "prefix_output", "suffix_output"):
        tensor = getattr(case, name)
        odd[name] = torch.empty_strided((1, h, d), (h * d + 8008, d, 1), dtype=tensor.dtype, device="cuda")
        odd[name].copy_(tensor)
        assert odd[name].is_contiguous()
    case = dataclasses.replace(case, **odd, outputs=[(odd["output"], odd["output"], "output"),
                                                     *case.outputs[1:]])
    run_and_check(case)
    assert len(OP._layouts) == 1


def test_threads_launching_one_layout_at_once_keep_their_own_pointers():
    """8 fresh threads (no CUDA context current yet) launch one cached layout at once, 20 times each, on their
    own tensors: the params buffer is per thread, so every output gets its own result and none stays poisoned."""
    n, h, d = 37, 8, 128
    cases = [make_case(n, h, d, torch.bfloat16, "cuda", seed=seed) for seed in range(8)]
    cupy_ops.merge_attn_states(*cases[0].args())  # fill the layout cache
    expected = [case.reference() for case in cases]
    for case in cases:
        for _, buffer, _ in case.outputs:
            poison_(buffer)
    torch.cuda.synchronize()
    barrier = threading.Barrier(len(cases))

    def merge_many(case) -> None:
        barrier.wait()
        for _ in range(20):
            cupy_ops.merge_attn_states(*case.args())

    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        for future in [pool.submit(merge_many, case) for case in cases]:
            future.result(timeout=120)  # re-raises a thread's exception
    torch.cuda.synchronize()
    for case, (expected_out, expected_lse) in zip(cases, expected):
        check_outputs(case, expected_out, expected_lse)


class _CountingDict(dict):
    def __init__(self):
        super().__init__()
        self.lookups = 0

    def get(self, key, default=None):
        self.lookups += 1
        return super().get(key, default)


def _bfloat16_case(seed: int, **changes):
    return make_case(37, 8, 128, torch.bfloat16, "cuda", seed=seed, **changes)


# A call that differs from the recent layout in one respect (and so must not launch its kernel): a different
# pointer alignment only, strides, no output_lse, dtype, fp8 output, CPU tensors. Expected layouts remembered
# after it: the CPU call runs the reference and remembers nothing.
UNLIKE_THE_RECENT = {
    "offset1": (lambda seed: _bfloat16_case(seed, layout="offset1"), 2),
    "head_slice": (lambda seed: _bfloat16_case(seed, layout="head_slice"), 2),
    "no-output-lse": (lambda seed: _bfloat16_case(seed, with_output_lse=False), 2),
    "float16": (lambda seed: make_case(37, 8, 128, torch.float16, "cuda", seed=seed), 2),
    "fp8": (lambda seed: _bfloat16_case(seed, fp8=True), 2),
    "cpu": (lambda seed: make_case(37, 8, 128, torch.bfloat16, "cpu", seed=seed), 1),
}


@pytest.mark.parametrize("fp8", [False, True], ids=["bfloat16", "fp8"])
@pytest.mark.parametrize("with_output_lse", [True, False], ids=["lse", "no-lse"])
def test_a_repeated_layout_is_decided_by_its_guard_alone(monkeypatch, with_output_lse, fp8):
    """A layout just validated is the recent one: later calls like it launch without a dict lookup, whichever
    optional tensors are given."""
    layouts = _CountingDict()
    monkeypatch.setattr(OP, "_layouts", layouts)
    run_and_check(_bfloat16_case(1, with_output_lse=with_output_lse, fp8=fp8))  # validated, remembered, recent
    run_and_check(_bfloat16_case(2, with_output_lse=with_output_lse, fp8=fp8))
    assert OP._recent is layouts[next(iter(layouts))]
    lookups = layouts.lookups
    for seed in (3, 4):
        run_and_check(_bfloat16_case(seed, with_output_lse=with_output_lse, fp8=fp8))
    assert layouts.lookups == lookups


@pytest.mark.parametrize("unlike", UNLIKE_THE_RECENT)
def test_a_call_unlike_the_recent_layout_takes_its_own(monkeypatch, unlike):
    """A call unlike the recent layout is validated on its own (the layout count shows it); then calls alternating
    the two layouts run the two most recent layouts' straight-line calls, with no dict lookup (CPU calls run the
    reference, never cached). Poisoned outputs and the float64 reference around each call."""
    make_unlike, layouts_after = UNLIKE_THE_RECENT[unlike]
    layouts = _CountingDict()
    monkeypatch.setattr(OP, "_layouts", layouts)
    run_and_check(_bfloat16_case(1))
    run_and_check(make_unlike(2))
    assert len(OP._layouts) == layouts_after
    lookups = layouts.lookups
    for seed in range(3, 9):
        run_and_check(_bfloat16_case(seed) if seed % 2 else make_unlike(seed))
    assert layouts.lookups == lookups or unlike == "cpu"


def test_one_tensor_given_twice_keeps_a_guard(monkeypatch):
    """A tensor passed as both prefix_output and suffix_output (one object in two places): the recent layout's
    guard still decides repeated calls (dynamo's guard alone never passes one object given twice)."""
    layouts = _CountingDict()
    monkeypatch.setattr(OP, "_layouts", layouts)
    case = _bfloat16_case(1)
    same = dataclasses.replace(case, suffix_output=case.prefix_output)
    run_and_check(same)
    lookups = layouts.lookups
    for seed in (2, 3):
        case = _bfloat16_case(seed)
        run_and_check(dataclasses.replace(case, suffix_output=case.prefix_output))
    assert layouts.lookups == lookups
    run_and_check(_bfloat16_case(4))  # two objects again: not the twice-given layout's guard, still correct
