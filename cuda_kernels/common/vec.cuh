// Vectors of N elements moved with one memory instruction of N * sizeof(T) bytes (up to 16).
#pragma once
#include "types.cuh"

namespace cupy_ops {

template <int BYTES> struct raw_bits;
template <> struct raw_bits<1> { using type = unsigned char; };
template <> struct raw_bits<2> { using type = unsigned short; };
template <> struct raw_bits<4> { using type = unsigned int; };
template <> struct raw_bits<8> { using type = uint2; };
template <> struct raw_bits<16> { using type = uint4; };

template <typename T, int N>
struct alignas(sizeof(T) * N) vec {
  static_assert(sizeof(T) * N <= 16 && (sizeof(T) * N & (sizeof(T) * N - 1)) == 0,
                "a vector is 1, 2, 4, 8 or 16 bytes");
  using bits_t = typename raw_bits<sizeof(T) * N>::type;
  T v[N];

  // ptr must be aligned to sizeof(vec); the host only picks N where every row start is.
  static __device__ __forceinline__ vec load(const T* ptr) {
    vec out;
    *reinterpret_cast<bits_t*>(out.v) = __ldg(reinterpret_cast<const bits_t*>(ptr));
    return out;
  }
  __device__ __forceinline__ void store(T* ptr) const {
    *reinterpret_cast<bits_t*>(ptr) = *reinterpret_cast<const bits_t*>(v);
  }
};

}  // namespace cupy_ops
