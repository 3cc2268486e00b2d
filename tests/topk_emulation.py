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
REGISTER_INSTANTIATIONS and the two-pass kernel at R.TWO_PASS_THREADS.
The tests are test_topk_emulated.py's; this module builds the library (build_emulator) and runs an op's plan
through it (`emulate`, `Geometry`)."""

from __future__ import annotations

import ctypes
import re
from typing import NamedTuple

from cuda_emulation import build, check_status
from topk_utils import PERSISTENT

from cupy_ops._runtime import LaunchConfig, compiler, launcher
from cupy_ops.ops import persistent_topk as PT
from cupy_ops.ops import top_k_per_row as T
from cupy_ops.ops import topk_rows as R

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
inline void store_shared_pair_if(bool p, uint32_t address_a, uint32_t a, uint32_t address_b, uint16_t b) {
  store_shared_if(p, address_a, a);
  if (p) *reinterpret_cast<uint16_t*>(emu::cur->smem + address_b) = b;
}
inline uint32_t add_from_lane_below(uint32_t v, int d) {
  const uint32_t below = __shfl_up_sync(0xffffffffu, v, d);
  return static_cast<int>(threadIdx.x & 31) >= d ? v + below : v;
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


def build_emulator(folder):
    """The emulation library, built in `folder` from the current sources (about 3 s)."""
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
    return build(folder, files, DRIVER)


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
            entry = R.two_pass_entry_bytes(threads)
            shared = 8 * words + max(entry * list_cap, 4 * k)
            row = R.RowPlan(threads, 1, int(ring), list_cap, 0, shared, two_pass=True,
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

