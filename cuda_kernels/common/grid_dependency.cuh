// Programmatic dependent launch (sm_90): a kernel launched with LaunchConfig.dependent may be scheduled while the
// stream's previous kernel still runs, so its CTAs are resident and past their prologue when that kernel ends,
// instead of being launched then. Such a kernel calls wait_for_previous_grids before it reads global memory, and
// may call allow_next_grid to let the next dependent launch be scheduled early in turn. Both are no-ops in a
// launch that is not dependent and in sm_80 builds (plans mark launches dependent only on sm_90).
#pragma once

namespace cupy_ops {

// Until every grid this one depends on has completed and its memory writes are visible.
__device__ __forceinline__ void wait_for_previous_grids() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// The stream's next kernel, if launched as dependent, may be scheduled once every CTA of this grid has called this
// or exited (it still waits for this grid to complete before it reads memory).
__device__ __forceinline__ void allow_next_grid() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// A dependent kernel's first step: let the next one be scheduled, then wait for the previous ones.
__device__ __forceinline__ void begin_dependent_grid() {
  allow_next_grid();
  wait_for_previous_grids();
}

}  // namespace cupy_ops
