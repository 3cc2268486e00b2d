"""The top-k device code (common/topk*.cuh, top_k_per_row.cu, persistent_topk.cu) run on the CPU: g++ compiles the
real sources against an emulation of the CUDA features they use (cuda_emulation.py), one OS thread per CUDA
thread. So CI, which has no GPU, executes the streaming, shrink, radix select, cluster exchange and emission
logic and compares every slot with the reference. What it does not model: timing, warp-level hardware behaviour
beyond shuffles (a warp is 32 threads meeting at a barrier for each shuffle), memory-model subtleties. What it
checks besides results: every barrier is reached by every thread (a deadlock fails the case after a timeout),
cp.async data is read only after its wait (copies land at the wait, the slot holds garbage before) and a slot is
not copied into while still to be read (the ring cases again with copies landing when issued), 16-byte alignment of
vector copies.

Emulated: __syncthreads, warp shuffles, shared atomics, cp.async (common/async_copy.cuh) and cluster barriers and
distributed shared memory (common/cluster.cuh, swapped for emulated versions); the two __shared__ declarations of
topk_row are rewritten to per-block storage. Instantiations: INSTANTIATIONS (threads, CTAs per cluster), the
whole-chunk kernel at R.WHOLE_INSTANTIATIONS (whole chunks of those shapes run it, as the plans launch it),
REGISTER_INSTANTIATIONS and the two-pass kernel at R.TWO_PASS_THREADS."""

from __future__ import annotations

import ctypes
import math
import re
from typing import NamedTuple

import pytest
import torch
from cuda_emulation import build, check_status, requires_gxx
from topk_utils import (
    DECODE,
    PERSISTENT,
    PREFILL,
    PaddedOutput,
    assert_reference,
    decode_args,
    make_scores,
    persistent_args,
    prefill_args,
    replace_arg,
)

from cupy_ops._runtime import LaunchConfig, compiler, launcher
from cupy_ops.ops import persistent_topk as PT
from cupy_ops.ops import top_k_per_row as T
from cupy_ops.ops import topk_rows as R

pytestmark = requires_gxx

CLUSTER_CUH = r"""
#pragma once
#include "types.cuh"
namespace cupy_ops {
inline void cluster_sync() {
  if (emu::cluster_pending) emu::misuse = true;
  emu::cur->cluster->bar->wait();
}
inline thread_local long cluster_arrived = -1;
inline void cluster_arrive_relaxed() {
  if (emu::cluster_pending) emu::misuse = true;
  emu::cluster_pending = true;
  cluster_arrived = emu::cur->cluster->bar->arrive();
}
inline void cluster_wait() {
  if (!emu::cluster_pending) emu::misuse = true;
  emu::cluster_pending = false;
  emu::cur->cluster->bar->await(cluster_arrived);
}
inline uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - emu::cur->smem);
}
inline void store_shared_if(bool p, uint32_t address, uint32_t value) {
  if (p) *reinterpret_cast<uint32_t*>(emu::cur->smem + address) = value;
}
inline void store_shared_pair_if(bool p, uint32_t address_a, uint32_t a, uint32_t address_b, uint32_t b) {
  store_shared_if(p, address_a, a);
  store_shared_if(p, address_b, b);
}
inline uint32_t cluster_load(uint32_t address, uint32_t rank) {
  emu::Block* b = emu::cur->cluster->blocks.at(rank);
  if (b->ended) emu::misuse = true;  // its shared memory would be gone
  return std::atomic_ref<uint32_t>(*reinterpret_cast<uint32_t*>(b->smem + address)).load(std::memory_order_relaxed);
}
}  // namespace cupy_ops
"""

ASYNC_COPY_CUH = r"""
#pragma once
#include "cluster.cuh"
namespace cupy_ops {
struct EmuCopy { void* dst; const void* src; };
inline thread_local std::deque<std::vector<EmuCopy>> emu_batches;
inline thread_local std::vector<EmuCopy> emu_open;
inline bool emu_copies_land_at_issue = false;  // (set_copies_land_at_issue)
inline void async_copy16(void* dst, const void* src) {  // lands at the wait, garbage until then; or at once
  if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15) {
    std::fprintf(stderr, "misaligned cp.async\n");
    std::abort();
  }
  if (emu_copies_land_at_issue) {
    std::memcpy(dst, src, 16);
    return;
  }
  std::memset(dst, 0xCD, 16);
  emu_open.push_back({dst, src});
}
inline void async_commit() { emu_batches.push_back(std::move(emu_open)); emu_open.clear(); }
inline void async_wait(int pending) {
  while (static_cast<int>(emu_batches.size()) > pending) {
    for (auto& c : emu_batches.front()) std::memcpy(c.dst, c.src, 16);
    emu_batches.pop_front();
  }
}
template <int THREADS> inline void prefetch_l2(const void*, int64_t) {}  // a hint: nothing to emulate
}  // namespace cupy_ops
"""

INSTANTIATIONS = ((256, 1), (256, 2), (256, 8), (512, 1), (1024, 1), (512, 2), (512, 4), (1024, 2))
# (threads, cluster, slots): the plans' R.REGISTER_SLOTS, and 12 slots (48 keys a thread, above any plan's 24) so
# the kernel's 64-bit key bitmasks run too
WIDE_SLOTS = 12
REGISTER_INSTANTIATIONS = ((256, 1, R.REGISTER_SLOTS[256]), (256, 4, R.REGISTER_SLOTS[256]),
                           (512, 1, R.REGISTER_SLOTS[512]), (256, 1, WIDE_SLOTS))
DRIVER = r"""
#include "emu_cuda.h"
#include "top_k_per_row.cu"
#include "persistent_topk.cu"
using namespace cupy_ops;
template <int T, int C, typename P, typename K> static int go(K kernel, const P* p, int grid, long long dynamic) {
  const P copy = *p;
  return emu::launch([&] { kernel(copy); }, grid, T, C, sizeof(topk::Shared), dynamic);
}
#define DISPATCH(KERNEL) \
""" + "".join(f"  if (threads == {t} && cluster == {c}) return go<{t}, {c}>(KERNEL<{t}, {c}>, p, grid, dynamic); \\\n"
              for t, c in INSTANTIATIONS) + r"""  return 2;
extern "C" int run_top_k_per_row(int threads, int cluster, int grid, long long dynamic, const TopKPerRowParams* p) {
  DISPATCH(top_k_per_row_kernel)
}
extern "C" int run_persistent_topk(int threads, int cluster, int grid, long long dynamic,
                                   const PersistentTopKParams* p) {
  DISPATCH(persistent_topk_kernel)
}
#define DISPATCH_WHOLE(KERNEL) \
""" + "".join(f"  if (threads == {t} && cluster == {c}) return go<{t}, {c}>(KERNEL<{t}, {c}, true>, p, grid, "
              "dynamic); \\\n" for t, c in R.WHOLE_INSTANTIATIONS) + r"""  return 2;
extern "C" int run_top_k_per_row_whole(int threads, int cluster, int grid, long long dynamic,
                                       const TopKPerRowParams* p) {
  DISPATCH_WHOLE(top_k_per_row_kernel)
}
extern "C" int run_persistent_topk_whole(int threads, int cluster, int grid, long long dynamic,
                                         const PersistentTopKParams* p) {
  DISPATCH_WHOLE(persistent_topk_kernel)
}
#define DISPATCH_TWO_PASS(KERNEL) \
""" + "".join(f"  if (threads == {t}) return go<{t}, 1>(KERNEL<{t}>, p, grid, dynamic); \\\n"
              for t in R.TWO_PASS_THREADS) + r"""  return 2;
extern "C" int run_top_k_per_row_two_pass(int threads, int grid, long long dynamic, const TopKPerRowParams* p) {
  DISPATCH_TWO_PASS(top_k_per_row_two_pass_kernel)
}
extern "C" int run_persistent_topk_two_pass(int threads, int grid, long long dynamic, const PersistentTopKParams* p) {
  DISPATCH_TWO_PASS(persistent_topk_two_pass_kernel)
}
#define DISPATCH_REGISTERS(KERNEL) \
""" + "".join(f"  if (threads == {t} && cluster == {c} && slots == {n}) return go<{t}, {c}>(KERNEL<{t}, {c}, {n}>, p, "
              "grid, dynamic); \\\n" for t, c, n in REGISTER_INSTANTIATIONS) + r"""  return 2;
extern "C" int run_top_k_per_row_registers(int threads, int cluster, int slots, int grid, long long dynamic,
                                           const TopKPerRowParams* p) {
  DISPATCH_REGISTERS(top_k_per_row_registers_kernel)
}
extern "C" int run_persistent_topk_registers(int threads, int cluster, int slots, int grid, long long dynamic,
                                             const PersistentTopKParams* p) {
  DISPATCH_REGISTERS(persistent_topk_registers_kernel)
}
extern "C" long take_rereads() { return emu::rereads.exchange(0); }
extern "C" void set_copies_land_at_issue(int on) { emu_copies_land_at_issue = on != 0; }
extern "C" unsigned float_key(float x) { return topk::float_key(x); }
extern "C" float key_floor(unsigned min_key) { return topk::key_floor(min_key); }
extern "C" int row_sample_target(int sample, int len, int k, float spread, int least) {
  return topk::row_sample_target(sample, len, k, spread, least);
}
"""


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The emulation library, built from the current sources (about 3 s)."""
    source = compiler.kernel_dir()
    files = {"common/types.cuh": None, "common/cluster.cuh": CLUSTER_CUH, "common/async_copy.cuh": ASYNC_COPY_CUH,
             "common/grid_dependency.cuh": None, "common/topk.cuh": None, "top_k_per_row.cu": None,
             "persistent_topk.cu": None}
    for header in ("topk_row.cuh", "topk_two_pass.cuh", "topk_registers.cuh"):  # each row function's shared
        # declarations
        core = (source / "common" / header).read_text()
        # the two-pass emission's guard against more than k outputs: a failed case here, not a silent cut
        guard = "store_shared_if(slot < static_cast<uint32_t>(k),"
        assert header != "topk_two_pass.cuh" or guard in core, "the emission's guard changed: update the emulation"
        core = core.replace(guard, "if (slot >= static_cast<uint32_t>(k)) emu::overrun = true; "
                                   "else store_shared_if(true,")
        # a re-read after a sampled cutoff that let fewer than k through (or, two-pass, more than the list holds):
        # counted (topk_row: a thread each; topk_row_two_pass: one a CTA)
        core, rereads = re.subn(r"cutoff = min_key = 0u;", "++emu::rereads; cutoff = min_key = 0u;", core)
        core, restarts = re.subn(r"if \(threadIdx.x == 0\) sh.appended = 0u;  // the two reads start over",
                                 "if (threadIdx.x == 0) { ++emu::rereads; sh.appended = 0u; }", core)
        expected = {"topk_row.cuh": (1, 0), "topk_two_pass.cuh": (0, 1)}.get(header, (0, 0))
        assert (rereads, restarts) == expected, f"{header}: the re-read changed: update the emulation"
        core, shared = re.subn(r"__shared__ Shared sh;", "Shared& sh = *reinterpret_cast<Shared*>(emu::cur->smem);",
                               core)
        core, dynamic = re.subn(r"extern __shared__ uint4 topk_dynamic_smem\[\];",
                                "uint4* topk_dynamic_smem = reinterpret_cast<uint4*>(emu::cur->smem + "
                                "emu::cur->static_bytes);", core)
        # (the register kernel has no dynamic shared memory: its threads store their outputs themselves)
        expected = (1, 0 if header == "topk_registers.cuh" else 1)
        assert (shared, dynamic) == expected, f"{header}'s shared declarations changed: update the emulation"
        files[f"common/{header}"] = core
    return build(tmp_path_factory.mktemp("topk_emulator"), files, DRIVER)


EMULATED_SMS = 4


def emulate(library, monkeypatch, op, args, threads, cluster, *, shrink=False, list_cap=None, sample=None,
            ring=False, registers=False, slots=None):
    """Run `op` on CPU tensors `args` through the emulated kernel with this geometry: the op's own plan and params,
    its buffer plan for the H200 (whole chunks), or with shrink=True the smallest streaming buffer (k + 8 x threads
    entries), so rows of a few thousand elements shrink many times. list_cap: the two-pass kernel (cluster 1) with
    a list of that many entries (a small one overflows: the sampled read falls back to two reads, whose select reads
    the row again). sample: the sampled-cutoff target of the streaming buffer or the two-pass kernel instead of the
    plan's (1: a cutoff at the largest sample, which lets fewer than k through, so the chunk is read again; 0: none).
    ring: the two-pass kernel's sampled read stages its next batch in the list's last entries (stages = 1), so its
    list has R.two_pass_ring_entries(threads) fewer entries than list_cap. registers: the row-in-registers
    kernel (its plan must hold the chunks), with `slots` 16-byte slots a thread (default: the plans'
    R.REGISTER_SLOTS)."""
    module = T if op is not PERSISTENT else PT
    if registers:
        slots = R.REGISTER_SLOTS[threads] if slots is None else slots
        monkeypatch.setitem(R.REGISTER_SLOTS, threads, slots)

    def plan_rows(kernels, device, rows, width, k, contiguous=True):
        if registers:
            row = R.register_plan(width, k, threads, cluster)
            assert row is not None, "the chunks exceed the threads' slots"
            return None, LaunchConfig((rows * cluster, 1, 1), (threads, 1, 1), row.shared_bytes), row
        if list_cap is not None:
            assert contiguous, "the two-pass kernel reads contiguous rows only"
            words = R.two_pass_words(width)  # (the k outputs are staged over the list: a tiny one gets 4 k bytes)
            plan = R.two_pass_plan(rows, width, k, EMULATED_SMS, optin=232448, per_sm=233472)  # (its row targets)
            row = R.RowPlan(threads, 1, int(ring), list_cap, 0, 8 * words + max(8 * list_cap, 4 * k), two_pass=True,
                            sample=R.two_pass_sample_target(width, k) if sample is None else sample,
                            sample_spread=plan.sample_spread if plan and sample is None else 0.0,
                            sample_floor=plan.sample_floor if plan and sample is None else 0)
            return None, LaunchConfig((rows, 1, 1), (threads, 1, 1), row.shared_bytes), row
        row = R.buffer_plan(width, k, threads, cluster, 1, optin=232448, per_sm=233472, streaming=shrink)
        if shrink:
            cap = -(-(k + 8 * threads) // 4) * 4
            row = row._replace(cap=cap, stage=k, shared_bytes=32 * threads * row.stages + 8 * (cap + k),
                               sample=R.sample_target(R.chunk_bound(width, cluster), k) if sample is None else sample)
        return None, LaunchConfig((rows * cluster, 1, 1), (threads, 1, 1), row.shared_bytes), row

    monkeypatch.setattr(module, "plan_rows", plan_rows)
    # A GPU of EMULATED_SMS SMs for the plan's other questions: prefill grids larger than that run their rows
    # last-first (row_of), so most cases here take that order and the few-row ones launch order.
    monkeypatch.setattr(launcher, "device_attribute", lambda device, attr: {"sm_count": EMULATED_SMS}[attr])
    call, _ = op.validate(args)
    (launch,) = op.plan(call)
    pointers = [args[op.arguments.index(f.source)].data_ptr() for f in launch.params.pointers]
    params = ctypes.create_string_buffer(launch.params.size)
    launch.params.pack_into(params, 0, *pointers, launch.params.pack(launch.values))
    grid, dynamic = launch.config.grid[0], ctypes.c_longlong(launch.config.shared_bytes)
    if list_cap is not None:
        run = library.run_persistent_topk_two_pass if op is PERSISTENT else library.run_top_k_per_row_two_pass
        status = run(threads, grid, dynamic, params)
    elif registers:
        run = library.run_persistent_topk_registers if op is PERSISTENT else library.run_top_k_per_row_registers
        status = run(threads, cluster, slots, grid, dynamic, params)
    elif not shrink and (threads, cluster) in R.WHOLE_INSTANTIATIONS:  # as the plans: the whole-chunk kernel
        run = library.run_persistent_topk_whole if op is PERSISTENT else library.run_top_k_per_row_whole
        status = run(threads, cluster, grid, dynamic, params)
    else:
        run = library.run_persistent_topk if op is PERSISTENT else library.run_top_k_per_row
        status = run(threads, cluster, grid, dynamic, params)
    check_status(status, f"({threads}, {cluster})")


class Geometry(NamedTuple):
    """One emulated launch shape: `cluster` CTAs of `threads` per row (topk_row), its smallest streaming buffer when
    `shrink`; with list_cap the two-pass kernel (one CTA a row) with a list of that many entries; with `registers`
    the row-in-registers kernel."""

    threads: int
    cluster: int = 1
    shrink: bool = False
    list_cap: int | None = None
    sample: int | None = None
    registers: bool = False
    slots: int | None = None
    ring: bool = False  # two-pass: list_cap is the sampled read's list beside its ring

    def __str__(self):
        if self.list_cap is not None:
            sample = "" if self.sample is None else f"-sample{self.sample}"
            return f"two-pass-{self.threads}-list{self.list_cap}{sample}{'-ring' if self.ring else ''}"
        if self.registers:
            return f"registers-{self.threads}x{self.cluster}{'' if self.slots is None else f'-slots{self.slots}'}"
        sample = "" if self.sample is None else f"-sample{self.sample}"
        return f"{self.threads}x{self.cluster}{'-shrink' if self.shrink else ''}{sample}"

    def run(self, library, monkeypatch, op, args):
        assert not self.ring or self.threads >= R.TWO_PASS_RING_THREADS, "smaller CTAs compile no ring"
        list_cap = self.list_cap + R.two_pass_ring_entries(self.threads) if self.ring else self.list_cap
        emulate(library, monkeypatch, op, args, self.threads, self.cluster, shrink=self.shrink,
                list_cap=list_cap, sample=self.sample, ring=self.ring, registers=self.registers,
                slots=self.slots)


# A shrink needs a chunk above k + 8 x threads: widths ~9000 with small k give one to a dozen (ascending scores
# shrink at every group); clusters of 2 and 4 cover the exchange with empty, partial and full chunks, and one of 8
# the radix round that sums a bin over more than 4 CTAs. The two-pass kernel runs at the plans' 256 and 512 threads
# with a list of 2048-4096 entries (and at 1024 threads, the plans' for rows that fit the SMs, among the sampled
# cases below): rows of 8192 and more take its sampled read (the plan's target, ~280 survivors), the others (and
# sample=0) two reads, whose list holds the k-th largest's bin; and with one of 8 entries that none can fit (the
# sampled read overflows it, then the select and the marking read the row again); `ring`: the sampled read stages
# its next batch in shared memory beside a list of that many entries (as the plans do where the list
# has room; among the sampled cases: a list it overflows, whose two reads then have the ring's entries too, and 1024
# threads over ascending rows of 16500, whose top k lie past the first batch: 2048 slots at 1024 threads). Whole
# chunks of 256 threads run the kernel compiled without the streaming path (prefill and persistent `Geometry(256)`).
# Streaming buffers (shrink) of chunks >= 8192 filter by the plan's sampled cutoff; persistent rows also by one at
# the largest sample (sample=1), which lets fewer than k of randn and low-bits rows through, so the chunk is read
# again. (The emulation runs ~1-3 s per case on two cores: the matrix is kept small.)
PREFILL_GEOMETRIES = [Geometry(256), Geometry(256, shrink=True), Geometry(512, shrink=True),
                      Geometry(512, 2, shrink=True), Geometry(1024, 2), Geometry(256, list_cap=4096),
                      Geometry(512, list_cap=4096, sample=0), Geometry(256, list_cap=8),
                      Geometry(512, list_cap=2048, ring=True), Geometry(512, registers=True),
                      Geometry(256, 4, registers=True),
                      Geometry(256, registers=True, slots=WIDE_SLOTS)]


@pytest.mark.parametrize("geometry", PREFILL_GEOMETRIES, ids=str)
@pytest.mark.parametrize("kind", ["special", "ascending"])
def test_prefill_rows(emulator, monkeypatch, kind, geometry):
    """Unaligned starts, lengths k - 1 / k / k + 1, an inverted window, long rows; NaN past every window."""
    gen = torch.Generator().manual_seed(len(kind) + geometry.threads + geometry.cluster)
    width, k = 9001, 61
    logits = make_scores(kind, 5, width, gen)
    args = prefill_args(logits, [1, 0, 3, 10, 5], [width, k - 1, 3 + k, 10 + k + 1, 4], k)
    geometry.run(emulator, monkeypatch, PREFILL, args)
    assert_reference(PREFILL, args, what=f"prefill {kind} {geometry}")


DECODE_GEOMETRIES = [Geometry(512, shrink=True), Geometry(512, 4), Geometry(256, 2),  # (strided: no two-pass)
                     Geometry(512, registers=True), Geometry(256, 4, registers=True),
                     Geometry(256, registers=True, slots=WIDE_SLOTS)]


@pytest.mark.parametrize("geometry", DECODE_GEOMETRIES, ids=str)
def test_decode_strided_rows(emulator, monkeypatch, geometry):
    """Columns with stride 2 (element loads), next_n 2 with a sequence shorter than next_n, tied values; indices
    rows 301 apart (odd: every row's output at another alignment), padding untouched."""
    gen = torch.Generator().manual_seed(geometry.threads + geometry.cluster)
    buffer = make_scores("ties", 4, 2 * 9001, gen)
    output = PaddedOutput(4, 300, 301, "cpu")
    args = output.into(DECODE, decode_args(buffer[:, ::2], 2, [9001, 1], 300))
    geometry.run(emulator, monkeypatch, DECODE, args)
    assert_reference(DECODE, args, what=f"decode {geometry}")
    output.assert_padding_untouched(f"decode {geometry}")


PREFILL_STRIDED_GEOMETRIES = [Geometry(256), Geometry(512, shrink=True), Geometry(512, 4),
                              Geometry(512, registers=True)]


@pytest.mark.parametrize("geometry", PREFILL_STRIDED_GEOMETRIES, ids=str)
def test_prefill_strided_rows(emulator, monkeypatch, geometry):
    """Columns with stride 2 from an odd offset (element loads from each window's start x stride1; no two-pass:
    its plans want unit strides), unaligned starts, lengths W - 1, W - 1 (shrunk many times under the shrink
    geometry) and k + 1: equal to the reference of the contiguous copy (stride0 = W, stride1 = 1), which never
    sees the strides."""
    gen = torch.Generator().manual_seed(geometry.threads + geometry.cluster + 11)
    width, k = 9001, 61
    view = make_scores("randn", 3, 2 * width + 1, gen)[:, 1::2]
    args = prefill_args(view, [1, 0, 7], [width, width - 1, 7 + k + 1], k)
    geometry.run(emulator, monkeypatch, PREFILL, args)
    dense = replace_arg(replace_arg(replace_arg(args, 0, view.contiguous()), 5, width), 6, 1)
    assert_reference(PREFILL, dense, what=f"prefill stride1 = 2 {geometry}")


PERSISTENT_GEOMETRIES = [Geometry(256), Geometry(512), Geometry(1024, shrink=True), Geometry(512, 2), Geometry(512, 4),
                         Geometry(256, 2, shrink=True), Geometry(256, 8), Geometry(256, list_cap=2048),
                         Geometry(256, list_cap=8), Geometry(512, list_cap=2048, ring=True),
                         Geometry(1024, list_cap=2048, ring=True), Geometry(512, shrink=True, sample=1),
                         Geometry(512, registers=True), Geometry(256, 4, registers=True),
                         Geometry(256, registers=True, slots=WIDE_SLOTS)]


@pytest.mark.parametrize("geometry", PERSISTENT_GEOMETRIES, ids=str)
@pytest.mark.parametrize("kind", ["randn", "lowbits", "neginf"])
def test_persistent_rows(emulator, monkeypatch, kind, geometry):
    """An odd row pitch (each row misaligned differently), lengths -1 / k / W + 17 / k + 1; low-bits ties and
    -inf filling the last slots; output rows k + 3 apart (a row stride other than k), padding untouched."""
    gen = torch.Generator().manual_seed(geometry.threads * geometry.cluster)
    width, k = 9001, 64
    logits = make_scores(kind, 4, width + 2, gen)[:, :width]
    output = PaddedOutput(4, k, k + 3, "cpu")
    args = output.into(PERSISTENT, persistent_args(logits, [-1, k, width + 17, k + 1], k, max_seq_len=width - 3))
    geometry.run(emulator, monkeypatch, PERSISTENT, args)
    assert_reference(PERSISTENT, args, what=f"persistent {kind} {geometry}")
    output.assert_padding_untouched(f"persistent {kind} {geometry}")


# Calls whose windows need the clamping or the L <= k path, at each kind of kernel: one CTA, a cluster of 8 (CTAs
# with empty chunks), the row in registers and the two-pass kernel (plans give it such rows only under the GPU
# tests' each_row_kernel, but nothing in it assumes wide rows).
SMALL_GEOMETRIES = [Geometry(256), Geometry(256, 8), Geometry(256, registers=True), Geometry(256, list_cap=4096)]


@pytest.mark.parametrize("geometry", SMALL_GEOMETRIES, ids=str)
def test_rows_narrower_than_k(emulator, monkeypatch, geometry):
    """Width 40, k 61: every window is shorter than k, so each row is its window's indices then the -1 tail, all
    written over UNWRITTEN. Prefill [0, 40) (the whole row), [3, 20), [0, 0); decode with [1, 3] seq_lens, one per
    row (next_n 3): 40, 17, 0; persistent with max_seq_len 25 (< k and < W) capping 40, then 12 and -1."""
    gen = torch.Generator().manual_seed(geometry.threads + geometry.cluster + 13)
    width, k = 40, 61
    logits = make_scores("ties", 3, width, gen)
    calls = [(PREFILL, prefill_args(logits.clone(), [0, 3, 0], [40, 20, 0], k)),
             (DECODE, decode_args(logits.clone(), 3, [[40, 17, 0]], k)),
             (PERSISTENT, persistent_args(logits.clone(), [40, 12, -1], k, max_seq_len=25))]
    for op, args in calls:
        geometry.run(emulator, monkeypatch, op, args)
        assert_reference(op, args, what=f"{op.name} width {width} < k {k} {geometry}")


@pytest.mark.parametrize("geometry", SMALL_GEOMETRIES, ids=str)
def test_prefill_windows_outside_the_row(emulator, monkeypatch, geometry):
    """The documented clamping (start = clamp(rowStart, 0, W), end = clamp(rowEnd, start, W)), width 300, k 61:
    starts -4 (window [0, 30)), W + 5 (empty), -1 with end W (the whole row, L > k), -7 with end 200 (L > k from a
    clamped start); NaN outside each clamped window, so a read outside it would be selected."""
    gen = torch.Generator().manual_seed(geometry.threads + geometry.cluster + 17)
    width, k = 300, 61
    logits = make_scores("randn", 4, width, gen)
    args = prefill_args(logits, [-4, width + 5, -1, -7], [30, width + 9, width, 200], k)
    geometry.run(emulator, monkeypatch, PREFILL, args)
    assert_reference(PREFILL, args, what=f"prefill clamped windows {geometry}")


# The sampled cutoff (common/topk.cuh: sample_cutoff) is exact whatever it is: a cutoff that lets fewer than k
# through makes the CTA read its chunk again (the two-pass kernel: also one that lets more than its list holds;
# then it reads the row twice). These pin where that happens. Descending rows of 8998 (runs 281 apart,
# the first at index 108: load_sample) put the rank-R sample (R <= 64) at index 107 + R, so 108 + R scores reach it,
# with R = ceil(target x 2048 / 8998): a target of 276 survivors (R 63) lets 171 through, so exactly k = 171 (the
# boundary: no re-read) and one short of k = 172 (re-read); one of 277 (R 64) lets more than 172 through (the
# select takes that rank's 11-bit bin whole: 192, simulated); randn rows with NaN and +inf late in the row need NaN
# to pass a finite cutoff's float compare; rows of 16500 give each CTA of a pair a chunk over 8192, so both sample
# (sample=1: both read again); ~280 of the late-nan-inf rows pass the plan's cutoff, more than a list of 200; rows
# with NaN at every 20th column put 103 NaN among the 2048 samples, above the plan's rank 65, so the cutoff is NaN's
# key (above +inf's: the key compare instead of the float one) and the row's 450 NaN make the list.
class SampledCase(NamedTuple):
    scores: str
    k: int
    geometry: Geometry
    reread: bool  # the chunk is read again


SAMPLED_CASES = {
    "descending-sample1-reread": SampledCase("descending", 172, Geometry(512, shrink=True, sample=1), True),
    "descending-171-pass-reread": SampledCase("descending", 172, Geometry(512, shrink=True, sample=276), True),
    "descending-k-pass": SampledCase("descending", 172, Geometry(512, shrink=True, sample=277), False),
    "descending-exactly-k": SampledCase("descending", 171, Geometry(512, shrink=True, sample=276), False),
    "late-nan-inf-1024": SampledCase("late-nan-inf", 64, Geometry(1024, shrink=True), False),
    "late-nan-inf-512": SampledCase("late-nan-inf", 64, Geometry(512, shrink=True), False),
    "pair-sample1-reread": SampledCase("randn-16500", 64, Geometry(256, 2, shrink=True, sample=1), True),
    "two-pass-sample1-reread": SampledCase("descending", 172, Geometry(256, list_cap=2048, sample=1), True),
    "two-pass-171-pass-reread": SampledCase("descending", 172, Geometry(256, list_cap=2048, sample=276), True),
    "two-pass-k-pass": SampledCase("descending", 172, Geometry(256, list_cap=2048, sample=277), False),
    "two-pass-exactly-k": SampledCase("descending", 171, Geometry(256, list_cap=2048, sample=276), False),
    "two-pass-nan-cutoff-1024": SampledCase("nan-every-20", 64, Geometry(1024, list_cap=2048), False),
    "two-pass-late-nan-inf": SampledCase("late-nan-inf", 64, Geometry(512, list_cap=2048), False),
    "two-pass-list-overflow-reread": SampledCase("late-nan-inf", 64, Geometry(256, list_cap=200), True),
    "two-pass-ring-exactly-k": SampledCase("descending", 171, Geometry(512, list_cap=2048, sample=276, ring=True),
                                           False),
    "two-pass-ring-nan-cutoff-1024": SampledCase("nan-every-20", 64, Geometry(1024, list_cap=2048, ring=True), False),
    "two-pass-ring-overflow-reread": SampledCase("late-nan-inf", 64, Geometry(512, list_cap=200, ring=True), True),
    "two-pass-ring-1024-two-batches": SampledCase("ascending-16500", 64, Geometry(1024, list_cap=2048, ring=True),
                                                  False),
}


@pytest.mark.parametrize("case", SAMPLED_CASES)
def test_sampled_cutoff(emulator, monkeypatch, case):
    """Results equal the reference whether or not the sampled cutoff let k through; the chunk is read again
    exactly when it did not (the two-pass kernel: or when more than its list holds did; the plan's own target never
    re-reads randn rows)."""
    kind, k, geometry, reread = SAMPLED_CASES[case]
    gen = torch.Generator().manual_seed(7)
    width = 16500 if kind.endswith("-16500") else 9001
    logits = make_scores("randn" if "nan" in kind else kind.split("-")[0], 4, width + 2, gen)
    if kind == "nan-every-20":
        logits[:, ::20] = float("nan")
    if kind == "late-nan-inf":
        logits[:, [5001, 7003, 8501]] = float("nan")
        logits[:, [6001, 8003]] = float("inf")
    args = persistent_args(logits[:, :width], [-1, k, width + 17, k + 1], k, max_seq_len=width - 3)
    emulator.take_rereads()
    geometry.run(emulator, monkeypatch, PERSISTENT, args)
    rereads = emulator.take_rereads()
    assert_reference(PERSISTENT, args, what=f"sampled cutoff {case}")
    assert (rereads > 0) == reread, f"{case}: {rereads} thread re-reads; expected {'some' if reread else 'none'}"


@pytest.mark.parametrize("case", [name for name, case in SAMPLED_CASES.items() if case.geometry.ring])
def test_ring_copies_landing_when_issued(emulator, monkeypatch, case):
    """The ring cases with every cp.async landing as it is issued (hardware may land a copy any time before its
    wait): the next batch staged over ring slots the current batch still reads would overwrite them here."""
    emulator.set_copies_land_at_issue(1)
    try:
        test_sampled_cutoff(emulator, monkeypatch, case)
    finally:
        emulator.set_copies_land_at_issue(0)


@pytest.mark.parametrize("geometry", [Geometry(256, list_cap=2048), Geometry(512, list_cap=2048, ring=True),
                                      Geometry(1024, list_cap=2048, ring=True)], ids=str)
def test_two_pass_odd_bitmap_words(emulator, monkeypatch, geometry):
    """Rows 8200 wide: ceil(8200 / 32) = 257 bitmap words, rounded up to 258 (two_pass_words) so that the list's
    keys, which the select reads four at a time (under 1024 threads: also beside a ring), and the staged outputs,
    copied 16 bytes at a time (k = 64), are 16-byte aligned; starts 1 and 0 (the sampled read) and a row under 4 x
    the sample (the two reads)."""
    gen = torch.Generator().manual_seed(geometry.threads + 5)
    width, k = 8200, 64
    logits = make_scores("randn", 3, width, gen)
    args = prefill_args(logits, [1, 0, 8], [width, width, 3000], k)
    geometry.run(emulator, monkeypatch, PREFILL, args)
    assert_reference(PREFILL, args, what=f"odd bitmap words {geometry}")


@pytest.mark.parametrize("kind", ["randn", "ties"])
@pytest.mark.parametrize("width", [131072, 131104])
def test_two_pass_emission_words_a_thread(emulator, monkeypatch, width, kind):
    """The emission of 1024-thread CTAs, which take a thread's bitmap words four at a time: rows where a thread owns 4
    words (131072: 4096 words, each thread's four read as one 16-byte vector) or 5 (131104: 4097 words, of 4098
    (two_pass_words), so eq is only 8-byte aligned: vectors where a run of four is aligned, single words elsewhere,
    the last thread's run cut at the row's end); ties: 10 distinct values, the k taken among ~13000 equal to the
    largest, in the first threads' eq words. Windows from columns 0 and 3 (unaligned), and one of k + 1."""
    gen = torch.Generator().manual_seed(width + len(kind))
    k = 64
    logits = make_scores(kind, 3, width, gen)
    args = prefill_args(logits, [0, 3, 7], [width, width, 7 + k + 1], k)
    Geometry(1024, list_cap=16384, ring=True).run(emulator, monkeypatch, PREFILL, args)
    assert_reference(PREFILL, args, what=f"emission words {kind} {width}")


@pytest.mark.parametrize("geometry", [Geometry(256, list_cap=2048), Geometry(512, list_cap=2048, ring=True),
                                      Geometry(1024, list_cap=2048, ring=True)], ids=str)
def test_two_pass_list_select_to_the_last_bit(emulator, monkeypatch, geometry):
    """The select on the sampled read's list down to key bits 1-0: randn rows of 9001 with 96 scattered scores 8.0
    + j ulps (j = 0..7, 12 each) above them all; k = 64 puts the k-th largest at the 4th of j = 2 in column order, so
    every round but the last leaves a bin of several j values (the list also holds the ~200 randn scores above the
    sampled cutoff, near 2.0). Prefill windows from columns 0 and 3 (unaligned), persistent lengths W and W - 5."""
    gen = torch.Generator().manual_seed(geometry.threads + 29)
    width, k = 9001, 64
    logits = make_scores("randn", 2, width, gen)
    for r in range(2):
        columns = torch.randperm(width - 8, generator=gen)[:96] + 8
        levels = torch.arange(96) % 8 + torch.tensor(8.0).view(torch.int32).item()
        logits[r, columns] = levels.to(torch.int32).view(torch.float32)
    args = prefill_args(logits.clone(), [0, 3], [width, width], k)
    geometry.run(emulator, monkeypatch, PREFILL, args)
    assert_reference(PREFILL, args, what=f"prefill last bits {geometry}")
    args = persistent_args(logits.clone(), [width, width - 5], k)
    geometry.run(emulator, monkeypatch, PERSISTENT, args)
    assert_reference(PERSISTENT, args, what=f"persistent last bits {geometry}")


def test_the_filter_compare_equals_the_key_compare(emulator):
    """The filters (topk_row's, the two-pass kernel's sampled read) test key(x) >= min_key as !(x <
    key_floor(min_key)) for 0 < min_key <= key(+inf): equal for every value class (+-0, denormals, +-inf, NaN of
    either sign) against min_keys at, next to and between their keys, and at the ends of the range."""
    emulator.float_key.restype, emulator.float_key.argtypes = ctypes.c_uint32, [ctypes.c_float]
    emulator.key_floor.restype, emulator.key_floor.argtypes = ctypes.c_float, [ctypes.c_uint32]
    bits = [0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x007FFFFF, 0x807FFFFF, 0x00800000, 0x3F800000,
            0xBF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001]
    bits += torch.randint(0, 2**32, (48,), generator=torch.Generator().manual_seed(5), dtype=torch.int64).tolist()
    values = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32).tolist()
    keys = [emulator.float_key(x) for x in values]
    min_keys = {1, 0x007FFFFF, 0x00800000, 0x7FFFFFFF, 0x80000000, 0x80000001, R.NAN_KEY - 1}
    min_keys |= {m for key in keys for m in (key - 1, key, key + 1) if 0 < m <= R.NAN_KEY - 1}
    wrong = [(hex(m), x) for m in sorted(min_keys) for x, key in zip(values, keys)
             if (not x < emulator.key_floor(m)) != (key >= m)]
    assert not wrong, f"{len(wrong)} (min_key, value) pairs differ, e.g. {wrong[:4]}"


@pytest.mark.parametrize("k", [1, 512, 2048, 4096])
def test_row_targets_follow_the_plans_rule(emulator, k):
    """Each row of a two-pass call aims its sampled read at two_pass_sample_target's deviations rule for its own
    length (row_sample_target; the host sizes the list by the width's): the same target within one (float against
    double rounding), at least the floor it is given, at most the plan's, and with spread 0 the plan's for every
    row. Lengths from 2048 to 2^20, k 1 to 4096."""
    emulator.row_sample_target.restype = ctypes.c_int
    emulator.row_sample_target.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_int]
    spread = R.TWO_PASS_SAMPLE_SIGMAS / math.sqrt(R.SAMPLES)
    for length in [2048, 3000, 8191, 9212, 10215, 16384, 32768, 65537, 131072, 1 << 20]:
        host = R.two_pass_deviations_target(length, k)
        got = emulator.row_sample_target(1 << 26, length, k, spread, 1)
        assert abs(got - host) <= 1, (length, k, got, host)
        assert emulator.row_sample_target(1 << 26, length, k, spread, host + 9) == host + 9  # the floor
        assert emulator.row_sample_target(host - 7, length, k, spread, 1) == host - 7  # the plan's bound
        assert emulator.row_sample_target(host - 7, length, k, 0.0, 1) == host - 7
    if k == 2048:  # the 8192 x 32768 prefill's width
        assert emulator.row_sample_target(1 << 26, 32768, k, spread, 1024) in (2553, 2554, 2555)
