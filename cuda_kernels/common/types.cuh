// Fixed-width integers and float constants. NVRTC has no <cstdint> or INFINITY without the CCCL headers,
// which cost ~1.5 s of compile time, so we name the few we need.
#pragma once

namespace cupy_ops {

using int64_t = long long;
using uint64_t = unsigned long long;
using uint32_t = unsigned int;
using uint16_t = unsigned short;

// std::conditional_t without <type_traits> (which needs the CCCL headers under NVRTC).
template <bool COND, typename A, typename B> struct pick_type { using type = A; };
template <typename A, typename B> struct pick_type<false, A, B> { using type = B; };

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

}  // namespace cupy_ops
