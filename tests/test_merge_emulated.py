"""merge_attn_states.cu run on the CPU: g++ compiles the real kernel (every instantiation the op has: input dtype, fp8
output or not, vector width, 32- or 64-bit offsets) against tests/cuda_emulation.py, one OS thread per CUDA thread,
and the op's own plan and params drive it. So CI, which has no GPU, executes each vector width's body (and the widest
ones' ragged tail), the suffix-only copy of tokens without context, the lse special cases, the fp8 conversion and the
64-bit-offset kernels (which no GPU test reaches: they need tensors past 2^31 elements; here the plan is made to pick
them), against the float64 reference, with NaN around every input view and guard elements around every output.

Swapped for the emulation: the CUDA fp16/bf16/fp8 headers (cuda_emulation.CUDA_FP_HEADERS: conversions as the GPU
rounds them) and vec.cuh's store (checked for alignment). expf and logf are the C library's, not the GPU's (both
within the tolerance table's reach). Not modelled: timing, and reads outside the tensors (compute-sanitizer's
memcheck covers those on the GPU)."""

from __future__ import annotations

import ctypes

import pytest
import torch
from cuda_emulation import CUDA_FP_HEADERS, build, checked_vec_cuh, dispatch_driver, requires_gxx, run_plan
from merge_utils import make_case, run_and_check

from cupy_ops.ops import merge_attn_states as module
from cupy_ops.ops.merge_attn_states import KERNELS, OP

pytestmark = requires_gxx

@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The emulation library of every instantiation in KERNELS, built from the current sources (about 30 s)."""
    files = {"common/types.cuh": None, "common/vec.cuh": checked_vec_cuh(), "common/fast_divmod.cuh": None,
             "common/dtypes.cuh": None, **CUDA_FP_HEADERS, "merge_attn_states.cu": None}
    driver = dispatch_driver("merge_attn_states.cu", "MergeAttnStatesParams", KERNELS.values())
    driver += ('extern "C" void to_fp8(const float* x, unsigned char* out, long n) {\n'
               "  for (long i = 0; i < n; ++i) out[i] = to_fp8_e4m3(x[i], 1.0f).bits;\n}\n")
    return build(tmp_path_factory.mktemp("merge_emulator"), files, driver)


def _layout_for(dtype: torch.dtype, vec: int) -> tuple[str, int]:
    """(layout, head size) in which the plan picks `vec` elements a vector: the widest in the padded layout (head
    strides multiples of 8, head size 102: a vector body and a ragged tail of 6 or 2 elements, blended and copied
    one by one), the narrower ones with every tensor at that element offset (merge_utils.LAYOUTS) and head size 96
    (no tail: the tail loop is the same code at every width)."""
    return ("padded", 102) if vec == max(module._vector_widths(dtype)) else (f"offset{vec}", 96)


def _lse_cases(case) -> dict[str, int]:
    """How many (head, token) pairs with context fall in each case merge_weights tells apart."""
    prefix, suffix = case.prefix_lse[:, :case.p_value], case.suffix_lse[:, :case.p_value]
    return {"both finite": int((prefix.isfinite() & suffix.isfinite()).sum()),
            "empty prefix": int((prefix.isinf() & suffix.isfinite()).sum()),
            "empty suffix": int((prefix.isfinite() & suffix.isinf()).sum()),
            "both empty": int((prefix.isinf() & suffix.isinf()).sum()),
            "equal lse": int((prefix.isfinite() & (prefix == suffix)).sum())}


# Every instantiation: (input dtype, fp8 output, elements a vector, 64-bit offsets). 40 tokens x 3 heads, the
# first 30 with context (the rest copy the suffix), lse with +-inf on both sides and ties (merge_utils.random_lse
# "mixed"; every case of merge_weights present, asserted).
@pytest.mark.parametrize("key", list(KERNELS), ids=lambda k: f"{str(k[0])[6:]}{'-to-fp8' if k[1] else ''}-vec{k[2]}"
                         f"{'-wide' if k[3] else ''}")
def test_every_kernel(emulator, monkeypatch, key):
    dtype, fp8, vec, wide = key
    if wide:  # every call takes the 64-bit-offset kernels
        monkeypatch.setattr(module, "_INT32_LIMIT", 1)
    layout, d = _layout_for(dtype, vec)
    case = make_case(40, 3, d, dtype, "cpu", fp8=fp8, p=30, layout=layout, seed=vec)
    assert min(_lse_cases(case).values()) > 0, f"the data lacks an lse case: {_lse_cases(case)}"
    run_and_check(case, entry=lambda *a: run_plan(emulator, OP, a, expect=[KERNELS[key]]))


def test_emulated_fp8_conversion_matches_torch(emulator):
    """The emulation's e4m3 conversion (dtypes.cuh's clamp, then the emulated __nv_cvt_float_to_fp8) bit for bit
    against torch's round to nearest even: every e4m3 value, the midpoints between neighbours (ties go to the even
    one), points just beside them, subnormals, +-0 and values past +-448 (clamped); NaN -> +448 as in vLLM."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = codes[codes.isfinite()].unique()
    middles = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, middles, middles.nextafter(torch.tensor(float("inf"))),
                   middles.nextafter(torch.tensor(float("-inf"))), torch.tensor([-0.0, 500.0, -1e30, float("inf")])])
    got = torch.empty(x.numel(), dtype=torch.uint8)
    emulator.to_fp8(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(got.data_ptr()), ctypes.c_long(x.numel()))
    expected = x.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(got, expected), f"first mismatch at {x[(got != expected).nonzero()[0]]}"
    nan = torch.tensor([float("nan")])
    emulator.to_fp8(ctypes.c_void_p(nan.data_ptr()), ctypes.c_void_p(got.data_ptr()), ctypes.c_long(1))
    assert got[0] == 0x7E, "NaN must become +448"
