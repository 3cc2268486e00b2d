// cp.async (sm_80+): global -> shared copies that bypass registers, so a CTA can keep several groups of loads in
// flight while it works on an earlier one. Each thread waits for its own copies only: a thread that reads back
// just the bytes it copied needs no barrier.
#pragma once
#include "cluster.cuh"

namespace cupy_ops {

// 16 bytes from global `src` to shared `dst`, both 16-byte aligned; cached in L2 only (.cg: read once).
__device__ __forceinline__ void async_copy16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(shared_address(dst)), "l"(src) : "memory");
}

// Closes this thread's current batch of copies (an empty batch is fine: counts stay uniform).
__device__ __forceinline__ void async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

// Waits until at most `pending` (0, 1 or 2) of this thread's batches are still in flight; their bytes are then
// visible to this thread.
__device__ __forceinline__ void async_wait(int pending) {
  if (pending <= 0) {
    asm volatile("cp.async.wait_group 0;" ::: "memory");
  } else if (pending == 1) {
    asm volatile("cp.async.wait_group 1;" ::: "memory");
  } else {
    asm volatile("cp.async.wait_group 2;" ::: "memory");
  }
}

// Asks L2 to fetch the 16-byte-aligned part of [p, p + bytes) from global memory, each of the CTA's THREADS threads
// a share: a hint that nothing waits for (no register, no barrier) and that reads nothing outside the range. sm_90:
// bulk prefetches of kPrefetchPiece bytes (cp.async.bulk.prefetch.L2, one instruction a piece); sm_80: one
// prefetch.global.L2 a 32-byte sector.
constexpr int kPrefetchPiece = 4096;

template <int THREADS>
__device__ __forceinline__ void prefetch_l2(const void* p, int64_t bytes) {
  const uint64_t begin = (reinterpret_cast<uint64_t>(p) + 15u) & ~uint64_t{15};
  const uint64_t end = (reinterpret_cast<uint64_t>(p) + static_cast<uint64_t>(bytes)) & ~uint64_t{15};
#if __CUDA_ARCH__ >= 900
  constexpr uint64_t kPiece = kPrefetchPiece;
  for (uint64_t at = begin + kPiece * threadIdx.x; at < end; at += kPiece * THREADS) {
    const uint32_t size = static_cast<uint32_t>(min(kPiece, end - at));
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(at), "r"(size) : "memory");
  }
#else
  for (uint64_t at = begin + 32u * threadIdx.x; at < end; at += 32u * THREADS) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(at) : "memory");
  }
#endif
}

}  // namespace cupy_ops
