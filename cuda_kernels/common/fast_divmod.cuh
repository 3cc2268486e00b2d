// Division by a run-time constant without the ~20-instruction integer divide.
#pragma once
#include "types.cuh"

namespace cupy_ops {

// q = (n * multiplier) >> shift, exact for every 0 <= n < 2^31 (host: cupy_ops._runtime.launch.fast_divmod).
struct fast_divmod {
  uint64_t divisor;
  uint64_t multiplier;
  uint64_t shift;

  __device__ __forceinline__ void divmod(uint32_t n, uint32_t& q, uint32_t& r) const {
    q = static_cast<uint32_t>((static_cast<uint64_t>(n) * multiplier) >> shift);
    r = n - q * static_cast<uint32_t>(divisor);
  }
};

}  // namespace cupy_ops
