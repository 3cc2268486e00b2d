"""repetition_penalties.cu run on the CPU: g++ compiles the real kernel (every instantiation the op has) against
tests/cuda_emulation.py, one OS thread per CUDA thread, and the op's own plan and params drive it. So CI, which has
no GPU, executes the mask vectors cut by a row's ends, the skew of rows that start inside a vector, the one-mask
read, the warps' striding and next-chunk prefetch, the speculative reads and the strided-logits kernel, and
compares every element bit for bit with the float32 reference. The emulation also fails a vector load through a
pointer not aligned to its size: the plan's mask vector width is checked against the real addresses.

Swapped for the emulation: the __shared__ staging declaration (per-block storage), vec.cuh's store (checked for
alignment) and the CUDA fp16/bf16/fp8 headers (cuda_emulation.CUDA_FP_HEADERS). Not modelled: timing, and reads
outside the tensors (compute-sanitizer's memcheck covers those on the GPU); writes outside the logits' view land in
guard elements and fail the case."""

from __future__ import annotations


import pytest
import torch
from cuda_emulation import CUDA_FP_HEADERS, build, checked_vec_cuh, dispatch_driver, requires_gxx, run_plan, swap
from helpers import assert_untouched
from penalties_utils import (
    DTYPES,
    LOGITS_LAYOUTS,
    call_and_check,
    penalty_args,
    special_value_args,
    with_mask_layout,
)

from cupy_ops._runtime import compiler
from cupy_ops.ops import apply_repetition_penalties_ as module
from cupy_ops.ops.apply_repetition_penalties_ import KERNELS, OP

pytestmark = requires_gxx

STAGED_BYTES = module.THREADS * max(module.MASK_VECTOR_BYTES)  # the kernel's staging: kWarps x 32 x W bytes
CHUNK_GUARD = 32 * 16       # elements after the logits: a warp's chunk, so a write past the last row lands there
# A mask layout (penalties_utils.MASK_LAYOUTS) in which the plan picks each mask vector width.
LAYOUT_FOR_WIDTH = {16: "both-start-3", 8: "start-8-apart", 4: "start-4-apart", 2: "start-2-apart",
                    1: "start-1-apart"}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The emulation library of every instantiation in KERNELS, built from the current sources (about 20 s)."""
    source = (compiler.kernel_dir() / "repetition_penalties.cu").read_text()
    source = swap(source, r"__shared__ alignas\(16\) unsigned char staged\[kWarps\]\[32 \* W\];",
                  f"static_assert(kWarps * 32 * W <= {STAGED_BYTES}, \"the staging outgrew STAGED_BYTES\"); "
                  "auto& staged = *reinterpret_cast<unsigned char (*)[kWarps][32 * W]>(emu::cur->smem);",
                  "the staging declaration")
    files = {"common/types.cuh": None, "common/vec.cuh": checked_vec_cuh(), "common/fast_divmod.cuh": None,
             "common/dtypes.cuh": None, **CUDA_FP_HEADERS, "repetition_penalties.cu": source}
    driver = dispatch_driver("repetition_penalties.cu", "RepetitionPenaltiesParams", KERNELS.values(),
                             static_bytes=STAGED_BYTES)
    return build(tmp_path_factory.mktemp("penalties_emulator"), files, driver)


@pytest.fixture(params=["one-block", "a-chunk-a-warp"])
def grid(request, monkeypatch):
    """The plan's grid: one resident block (1 SM, 1 block an SM), so its 4 warps stride over every chunk and load
    each next chunk's masks ahead; or one chunk a warp (1000 SMs: more than the chunks), the last block's spare
    warps taking none."""
    monkeypatch.setattr(module.launcher, "device_attribute",
                        lambda device, name: {"sm_count": 1 if request.param == "one-block" else 1000}[name])
    monkeypatch.setattr(module.launcher, "occupancy", lambda kernel, device, threads, shared=0: 1)
    return request.param


def emulate(library, args: tuple, kernel_key: tuple) -> None:
    """The op on CPU tensors `args` through the emulated kernels of its plan, which must pick KERNELS[kernel_key]."""
    run_plan(library, OP, args, expect=[KERNELS[kernel_key]])


def _set_speculation(monkeypatch, speculate: bool) -> None:
    monkeypatch.setattr(module, "SPECULATE_MAX_BYTES", 1 << 62 if speculate else 0)


# Every instantiation: (dtype, mask vector bytes W, unit last stride, speculate). 5 x 1019 tokens, 20% dense, in
# the mask layout of W (rows starting inside a vector, odd vocab: both ends of a row cut vectors); W = 16 also
# with one tensor as both masks. The logits are a view with guard elements around it (rows 1027 apart, or every
# other column for the strided kernels, and a chunk's tokens after the last row): a write outside the view fails
# the case instead of corrupting the heap.
# Penalties alternate between the logits' dtype and float32.
@pytest.mark.parametrize("key", list(KERNELS), ids=lambda k: f"{str(k[0])[6:]}-w{k[1]}"
                         f"{'' if k[2] else '-strided'}{'-speculate' if k[3] else ''}")
def test_every_kernel(emulator, grid, monkeypatch, key):
    dtype, width, unit, speculate = key
    _set_speculation(monkeypatch, speculate)
    penalty_dtype = torch.float32 if width in (8, 2) or not unit else dtype
    values = penalty_args("cpu", dtype, 5, 1019, density=0.2, penalty_dtype=penalty_dtype, seed=width)
    strides, offset = LOGITS_LAYOUTS["row-padded" if unit else "every-other-column"]
    buffer = torch.randn(offset + 4 * strides[0] + 1019 * strides[1] + CHUNK_GUARD).to(dtype)
    logits = buffer.as_strided((5, 1019), strides, offset)
    calls = [with_mask_layout((logits, *values[1:]), LAYOUT_FOR_WIDTH[width])]
    if width == 16:
        calls.append((logits, calls[0][1], calls[0][1], calls[0][3]))
    for args, masks in zip(calls, ["two masks", "one tensor as both masks"]):
        logits.copy_(values[0])
        snapshot = buffer.clone()
        call_and_check(args, f"logits, {masks} ({grid})", entry=lambda *a: emulate(emulator, a, key))
        assert_untouched(logits, buffer, snapshot, f"logits, {masks} ({grid})")


# The special values (penalties_utils.special_value_args), float32 penalties, through each dtype's W = 16
# masked-read and W = 4 speculative kernels.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("speculate", [False, True], ids=["masked-reads", "speculative-reads"])
def test_special_values(emulator, grid, monkeypatch, dtype, speculate):
    _set_speculation(monkeypatch, speculate)
    args = special_value_args("cpu", dtype, torch.float32)
    call_and_check(args, "special values", entry=lambda *a: emulate(emulator, a, (dtype, 4 if speculate else 16,
                                                                                   True, speculate)))
