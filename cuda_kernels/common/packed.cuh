// Runs of I elements of a kernel's input type held packed in 32-bit registers (two 16-bit values a word), loaded
// and stored with 16-byte vectors where the caller knows every row is aligned, element by element under a mask
// otherwise; and a one-instruction exp2.
#pragma once
#include "dtypes.cuh"
#include "types.cuh"

namespace cupy_ops {

// One MUFU.EX2; results below 2^-126 flush to 0 (a decay that small is 0 to every output).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <typename T>
__device__ __forceinline__ unsigned short bits16(T x) { return *reinterpret_cast<unsigned short*>(&x); }

// Element `high` (0: low half, 1: high half) of a word of two 16-bit values, as float.
__device__ __forceinline__ float half_word_to_float(__nv_bfloat16, uint32_t word, int high) {
  return __uint_as_float(high ? (word & 0xffff0000u) : (word << 16));
}
__device__ __forceinline__ float half_word_to_float(__half, uint32_t word, int high) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(high ? (word >> 16) : word)));
}
__device__ __forceinline__ float half_word_to_float(float, uint32_t word, int) { return __uint_as_float(word); }

// I items of T packed in 32-bit words (16-bit types: two per word), converted to float on use.
template <typename T, int I>
struct Raw {
  static constexpr int kWords = I * int(sizeof(T)) / 4;
  uint32_t w[kWords];

  __device__ __forceinline__ float get(int i) const {
    if constexpr (sizeof(T) == 4) return __uint_as_float(w[i]);
    return half_word_to_float(T(), w[i >> 1], i & 1);
  }

  // Items whose bit is set in `mask` (others read as 0): 16-byte loads when `vector` (all set, aligned).
  __device__ __forceinline__ void load(const T* ptr, bool vector, uint32_t mask) {
    if (vector) {
#pragma unroll
      for (int v = 0; v < kWords / 4; ++v) {
        const uint4 x = __ldg(reinterpret_cast<const uint4*>(ptr) + v);
        w[4 * v] = x.x, w[4 * v + 1] = x.y, w[4 * v + 2] = x.z, w[4 * v + 3] = x.w;
      }
      return;
    }
#pragma unroll
    for (int k = 0; k < kWords; ++k) w[k] = 0;
#pragma unroll
    for (int i = 0; i < I; ++i) {
      if (!(mask >> i & 1)) continue;
      if constexpr (sizeof(T) == 4) {
        w[i] = __float_as_uint(__ldg(reinterpret_cast<const float*>(ptr) + i));
      } else {
        const uint32_t bits = __ldg(reinterpret_cast<const unsigned short*>(ptr) + i);
        w[i >> 1] |= bits << (16 * (i & 1));
      }
    }
  }
};

// Stores the items whose bit is set in `mask`: 16-byte stores when `vector` (all set, aligned).
template <typename T, int I>
__device__ __forceinline__ void store_items(T* ptr, const float (&v)[I], bool vector, uint32_t mask) {
  if (vector) {
    constexpr int kWords = I * int(sizeof(T)) / 4;
    uint32_t w[kWords];
#pragma unroll
    for (int i = 0; i < I; ++i) {
      if constexpr (sizeof(T) == 4) {
        w[i] = __float_as_uint(v[i]);
      } else {
        const uint32_t bits = bits16(from_float<T>(v[i]));
        w[i >> 1] = (i & 1) ? (w[i >> 1] | (bits << 16)) : bits;
      }
    }
#pragma unroll
    for (int k = 0; k < kWords / 4; ++k)
      reinterpret_cast<uint4*>(ptr)[k] = make_uint4(w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]);
    return;
  }
#pragma unroll
  for (int i = 0; i < I; ++i)
    if (mask >> i & 1) ptr[i] = from_float<T>(v[i]);
}

}  // namespace cupy_ops
