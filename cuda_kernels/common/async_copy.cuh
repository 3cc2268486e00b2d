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

}  // namespace cupy_ops
