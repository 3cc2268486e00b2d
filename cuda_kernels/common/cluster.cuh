// Thread-block clusters (sm_90): the cluster barrier and loads from another CTA's shared memory, in inline PTX
// (no cooperative_groups, whose CCCL headers cost NVRTC ~1.5 s). The sm_80 build of a kernel that calls them
// traps: plans launch cluster instantiations only where launcher.device_arch() >= 90. Also stores at 32-bit shared
// addresses and add_from_lane_below, a predicated shfl.sync.up (any arch): inline PTX that topk.cuh uses lives in
// a header the CPU emulation (tests/topk_emulation.py) swaps for C++ stand-ins, as it does async_copy.cuh, since
// topk.cuh itself compiles there as is.
#pragma once
#include "types.cuh"

namespace cupy_ops {

// barrier.cluster with release/acquire: every thread of every CTA of the cluster arrives, and the shared-memory
// writes before it are visible to the whole cluster after it. All threads of the CTA must call it.
__device__ __forceinline__ void cluster_sync() {
#if __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#else
  __trap();
#endif
}

// The two halves of a cluster barrier with no memory ordering, for the end of a kernel whose CTAs read each other's
// shared memory: a CTA arrives once its own remote loads are done and used, and waits just before it exits, so
// its shared memory outlives every remote load of it. H200: at the end of the top-k rows, in place of cluster_sync
// (whose release costs a GPU-scope fence, MEMBAR.ALL.GPU, there after the output stores), 0.1-0.4 us a call
// (persistent 1 x 163840 12.3 -> 12.0 us, 4 x 65536 11.3 -> 11.0, 64 x 20000 11.5 -> 11.1). The other cluster
// barriers publish shared-memory writes and keep the release: a fence.acq_rel.cluster before a relaxed arrive,
// by every thread or by one after __syncthreads, cost the same.
__device__ __forceinline__ void cluster_arrive_relaxed() {
#if __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void cluster_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
#else
  __trap();
#endif
}

// This CTA's shared-memory address of `p` (a __shared__ object), for cluster_load and the stores below.
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Stores of 32-bit words at shared addresses, predicated on `p` rather than branched around. In a hot loop that
// stored through a pointer into dynamic shared memory, ptxas converted the generic address to a shared one at every
// store and put a BSSY/BSYNC pair around the guarded stores: the two-pass kernel's appends took 50 instructions a
// step with them, 37 without (sm_90 code, NVRTC 13.0; topk_two_pass.cuh).
__device__ __forceinline__ void store_shared_if(bool p, uint32_t address, uint32_t value) {
  asm volatile("{\n\t.reg .pred p;\n\tsetp.ne.u32 p, %0, 0;\n\t@p st.shared.u32 [%1], %2;\n\t}"
               ::"r"(static_cast<uint32_t>(p)), "r"(address), "r"(value) : "memory");
}
__device__ __forceinline__ void store_shared_pair_if(bool p, uint32_t address_a, uint32_t a, uint32_t address_b,
                                                     uint32_t b) {
  asm volatile("{\n\t.reg .pred p;\n\tsetp.ne.u32 p, %0, 0;\n\t@p st.shared.u32 [%1], %2;\n\t"
               "@p st.shared.u32 [%3], %4;\n\t}"
               ::"r"(static_cast<uint32_t>(p)), "r"(address_a), "r"(a), "r"(address_b), "r"(b) : "memory");
}
// The same with a 16-bit second word (the two-pass kernel's short list columns).
__device__ __forceinline__ void store_shared_pair_if(bool p, uint32_t address_a, uint32_t a, uint32_t address_b,
                                                     uint16_t b) {
  asm volatile("{\n\t.reg .pred p;\n\tsetp.ne.u32 p, %0, 0;\n\t@p st.shared.u32 [%1], %2;\n\t"
               "@p st.shared.u16 [%3], %4;\n\t}"
               ::"r"(static_cast<uint32_t>(p)), "r"(address_a), "r"(a), "r"(address_b), "h"(b) : "memory");
}

// v plus v of the lane `d` below this one where there is one (lane >= d), for warp scans: shfl.sync.up's in-range
// predicate guards the add, 2 instructions a step (SHFL, predicated IADD) where __shfl_up_sync and a lane test take 4
// (SHFL, SEL, ISETP, IADD; sm_90 code, NVRTC 13.5). Every lane of the warp calls it. In warp_inclusive_sum (the
// block scans, topk_row's compaction; H100, A/B in one run, session 48, two rounds, us): prefill 8192 x 32768 k 2048
// 285.6 / 285.6 -> 284.1 / 284.2 (the sampled read's place scan then: its own atomics since), 2048 x 16384 k 512
// 45.4 / 45.3 -> 44.8 / 44.8, 4096 x 8192 60.5 / 60.7 -> 60.2 / 60.3, persistent 128 x 131072 30.2 -> 30.1 / 30.0,
// 8 x 4096 4.66 -> 4.63.
__device__ __forceinline__ uint32_t add_from_lane_below(uint32_t v, int d) {
  asm("{\n\t.reg .pred p;\n\t.reg .b32 t;\n\tshfl.sync.up.b32 t|p, %0, %1, 0, -1;\n\t@p add.u32 %0, %0, t;\n\t}"
      : "+r"(v) : "r"(d));
  return v;
}

// The 32-bit word at shared address `address` in the shared memory of cluster CTA `rank` (the same variable in
// that CTA). The owner must not have exited: callers end with a cluster barrier (cluster_sync, or the owner's
// cluster_wait after the readers' cluster_arrive_relaxed).
__device__ __forceinline__ uint32_t cluster_load(uint32_t address, uint32_t rank) {
#if __CUDA_ARCH__ >= 900
  uint32_t remote, value;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(address), "r"(rank));
  asm volatile("ld.shared::cluster.u32 %0, [%1];" : "=r"(value) : "r"(remote) : "memory");
  return value;
#else
  __trap();
  return 0;
#endif
}

}  // namespace cupy_ops
