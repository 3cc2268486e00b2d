"""selective_scan.cu run on the CPU: g++ compiles the real kernel source (float and bf16 instantiations of the chunk,
carry and short kernels) against tests/cuda_emulation.py, one OS thread per CUDA thread, and the op's own plan and
params drive it. So CI, which has no GPU, executes the windows (fast two states at a time, light, general), the
8-lane scans, the chunked passes and the state cache, and compares every output with the float64 reference.

Swapped for the emulation: the MUFU instructions (ex2/lg2.approx.ftz: exp2f/log2f with subnormals flushed), the L1
prefetch (nothing), the dynamic shared memory declaration, and the CUDA fp16/bf16/fp8 headers
(cuda_emulation.CUDA_FP_HEADERS). Timing and the hardware's approximation errors are not modelled."""

from __future__ import annotations


import pytest
import torch
from cuda_emulation import CUDA_FP_HEADERS, build, dispatch_driver, requires_gxx, run_plan, swap
from selective_scan_utils import (bad_slots_call, check_bad_slots, check_padded_tokens, check_strided_metadata,
                                  large_bias_call, padded_varlen_call, run_and_check)

from cupy_ops._runtime import Launch, compiler
from cupy_ops.ops import selective_scan_fwd as S
from cupy_ops.ops.selective_scan_ref import random_call

pytestmark = requires_gxx

EMULATED = (torch.float32, torch.bfloat16)

# The hardware's approximate exp2 and log2 with subnormals flushed to zero (inputs and results), as .ftz does.
MUFU = r"""
inline float emu_ftz(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.f, x) : x; }
inline float emu_ex2(float x) { return emu_ftz(std::exp2(emu_ftz(x))); }
inline float emu_lg2(float x) { return std::log2(emu_ftz(x)); }
"""


def _emulated_kernels() -> list:
    return [k for key, k in S.KERNELS.items() if key == "carry" or key[1] in EMULATED]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The emulation library, built from the current sources (about 10 s)."""
    source = compiler.kernel_dir()
    packed = swap((source / "common" / "packed.cuh").read_text(),
                   r'asm\("ex2\.approx\.ftz\.f32 %0, %1;" : "=f"\(y\) : "f"\(x\)\);', "y = emu_ex2(x);",
                   "packed.cuh's ex2")
    scan = (source / "selective_scan.cu").read_text()
    scan = swap(scan, r'asm\("lg2\.approx\.ftz\.f32 %0, %1;" : "=f"\(y\) : "f"\(x\)\);', "y = emu_lg2(x);",
                 "lg2")
    scan = swap(scan, r'asm volatile\("prefetch\.L1 \[%0\];" ::"l"\(p\)\);', "(void)p;", "prefetch_l1")
    scan = swap(scan, r"extern __shared__ __align__\(16\) float smem\[\];",
                 "float* smem = reinterpret_cast<float*>(emu::cur->smem);", "the shared memory declaration")
    files = {"common/types.cuh": None, "common/dtypes.cuh": None, **CUDA_FP_HEADERS,
             "common/packed.cuh": MUFU + packed,
             "selective_scan.cu": scan, "selective_scan_seq.cuh": None, "selective_scan_windows.cuh": None}
    return build(tmp_path_factory.mktemp("scan_emulator"), files,
                 dispatch_driver("selective_scan.cu", "SelectiveScanParams", _emulated_kernels()), optimize="-O1")


@pytest.fixture
def on_the_h200(monkeypatch):
    """Plans as for the H200 (132 SMs) on this CPU-only machine."""
    monkeypatch.setattr(S.launcher, "device_attribute", lambda device, name: {"sm_count": 132}[name])


def entry(library):
    """The op's plan run through the emulated kernels, called as the op is."""
    return lambda *a: run_plan(library, S.OP, a)


def check(library, args, what):
    run_and_check(args, entry=entry(library), what=what)


def chunked(args) -> bool:
    """Whether the plan (for the H200) cuts rows into chunks: pass 1, the carry kernel, pass 2."""
    return any(", true," in s.kernel.name_expression for s in S.OP.plan(S.OP.validate(args)[0])
               if isinstance(s, Launch))


# Odd n leaves fast windows a state alone after their pairs (n = 1: only that one); L = 300 leaves a partial last
# window (light); chunked: pass 1, the carry kernel and pass 2 (the plan chunks small calls: few warps). Small A
# (a_scale) keeps states alive over hundreds of tokens, so what crosses a window or chunk shows in the outputs.
# d = 20 (groups of 10 channels): each lane loads its B and C; d = 32 (groups of 16: every block's channels share
# one) fast windows stage them in shared memory, 16 states at a time (n = 20: a full round and one of 4 states;
# n = 17: a full round and one state alone).
@pytest.mark.parametrize("dtype", EMULATED, ids=["fp32", "bf16"])
@pytest.mark.parametrize("d, n", [(20, 1), (20, 2), (20, 5), (32, 17), (32, 20)])
@pytest.mark.parametrize("chunked", [False, True], ids=["one-pass", "chunked"])
def test_batched(emulator, on_the_h200, monkeypatch, dtype, d, n, chunked):
    if not chunked:
        monkeypatch.setattr(S, "MIN_WARPS_PER_SM", 0)
    args = random_call("cpu", dtype, b=2, d=d, n=n, g=2, L=300, a_scale=0.02, seed=40 + n)
    launches = [s for s in S.OP.plan(S.OP.validate(args)[0]) if isinstance(s, Launch)]
    assert any(", true," in s.kernel.name_expression for s in launches) == chunked
    assert all(s.values["stage_bc"] == (d == 32) for s in launches)
    check(emulator, args, f"batched d={d} n={n}")


# A varlen batch whose fast windows stage B and C (d / g = 16) between light and general windows and padding: the
# staging's barriers need every window's kind to be the same for the whole block.
def test_varlen_staged(emulator, on_the_h200):
    args = random_call("cpu", torch.bfloat16, d=32, n=17, g=2, lengths=[1, 70, 0, 300, 150, 9], pad=2, a_scale=0.02,
                       seed=90)
    steps = S.OP.plan(S.OP.validate(args)[0])
    assert all(s.values["stage_bc"] for s in steps if isinstance(s, Launch))
    check(emulator, args, "varlen staged")


# Sequences shorter than a lane's tokens (general windows), single starts (light), padding and a null slot.
@pytest.mark.parametrize("dtype", EMULATED, ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [3, 4])
def test_varlen(emulator, on_the_h200, dtype, n):
    check(emulator, random_call("cpu", dtype, d=20, n=n, lengths=[1, 70, 0, 3, 200, 9], pad=2,
                                         a_scale=0.02, seed=50 + n),
          f"varlen n={n}")


@pytest.mark.parametrize("cu_chunks", [False, True], ids=["blocks", "cu_chunk_seqlen"])
def test_prefix_cache(emulator, on_the_h200, cu_chunks):
    check(emulator, random_call("cpu", torch.float32, d=16, n=3, lengths=[90, 5, 64], block_size=32, cache=True,
                                cu_chunks=cu_chunks, seed=60), "prefix-cache")


# cu_chunk_seqlen chunks of 24 tokens in 64-token blocks: several chunk ends store to one block's slot, and the
# last store of each sequence (the final state) may share it. vLLM stores chunk by chunk in order; the chunked plan
# scans a sequence's chunks in different CUDA blocks, so the slots must not depend on the order blocks run in
# (the emulation runs them first-first or last-first).
@pytest.mark.parametrize("reverse", [False, True], ids=["first-first", "last-first"])
def test_prefix_cache_stores_do_not_depend_on_block_order(emulator, on_the_h200, reverse):
    args = random_call("cpu", torch.float32, d=16, n=3, lengths=[300, 40, 250], block_size=64, cache=True,
                       cu_chunks=True, max_chunk=24, a_scale=0.02, seed=61)
    assert chunked(args)
    run_and_check(args, entry=lambda *a: run_plan(emulator, S.OP, a, reverse_blocks=reverse),
                  what=f"prefix-cache, short chunks, blocks {'last' if reverse else 'first'}-first")


def test_short(emulator, on_the_h200):
    check(emulator, random_call("cpu", torch.bfloat16, b=3, d=20, n=5, L=3, seed=70), "short")


# The docstring's promises, on the calls the CPU and GPU tests make (selective_scan_utils). Slots outside ssm_states
# and not null_block_id: never read (zero initial state), never written, in the short kernel (batched, L = 3), the
# chunked varlen scan (pass 1 snapshots initial states) and prefix-cache mode (columns outside the row too).
@pytest.mark.parametrize("null", [-1, 0])
@pytest.mark.parametrize("mode", ["short", "varlen", "cache"])
def test_slots_outside_ssm_states(emulator, on_the_h200, mode, null):
    args, bad = bad_slots_call("cpu", torch.float32, mode, null, seed=32)
    assert chunked(args) == (mode != "short")
    check_bad_slots(args, bad, entry(emulator), f"{mode} null={null}")


# A CUDA-graph-padded varlen batch: tokens before query_start_loc[0] and after query_start_loc[b] (NaN inputs) are
# left alone and reach no sequence: inside one window, and over whole chunks of pass 1 and pass 2.
@pytest.mark.parametrize("dtype, lengths, start, total, is_chunked", [
    (torch.bfloat16, [7, 9], 2, 20, False),
    (torch.bfloat16, [70, 150], 30, 300, True),
], ids=["one-window", "chunked"])
def test_varlen_tokens_outside_query_start_loc(emulator, on_the_h200, dtype, lengths, start, total, is_chunked):
    args = padded_varlen_call("cpu", dtype, lengths, start, total, seed=33)
    assert chunked(args) == is_chunked
    check_padded_tokens(args, entry(emulator), f"padded varlen {lengths}")


# dt past 20 kept as is with delta_softplus: the chunk kernel's load_inputs and the short kernel's own softplus.
@pytest.mark.parametrize("kw", [dict(b=2, L=150), dict(b=3, L=5)], ids=["chunk", "short"])
def test_softplus_threshold(emulator, on_the_h200, kw):
    check(emulator, large_bias_call("cpu", torch.bfloat16, seed=34, d=20, n=4, **kw), "softplus threshold")


# Every stride the plan forwards (metadata as x[::2], A transposed, D and delta_bias strided, ssm_states with last
# stride 2): prefix-cache mode with cu_chunk_seqlen, chunked plain varlen (its last sequence spans whole 64-token
# chunks, whose carries the carry kernel decays with A), short.
@pytest.mark.parametrize("kw", [dict(lengths=[40, 50, 70, 9], cache=True, cu_chunks=True, block_size=16, pad=3),
                                dict(lengths=[40, 1, 0, 400], pad=1), dict(b=3, L=3, pad=1)],
                         ids=["prefix-cache", "varlen", "short"])
def test_strided_metadata_and_parameters(emulator, on_the_h200, kw):
    check_strided_metadata(random_call("cpu", torch.float32, d=20, n=4, a_scale=0.05, seed=35, **kw),
                           entry(emulator), "strided metadata")
