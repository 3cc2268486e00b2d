// Element types the kernels accept, and their conversions to and from float.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

namespace cupy_ops {

// FP8 e4m3fn output is stored as raw bytes; the kernels never do arithmetic on it.
struct fp8_e4m3 {
  unsigned char bits;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// e4m3fn has no infinities; 448 is its largest finite value.
constexpr float kFp8E4m3Max = 448.0f;

// Scales, clamps to +-448 and rounds to nearest. The clamp order (min first) sends NaN to +448, as vLLM does.
__device__ __forceinline__ float fp8_e4m3_clamped(float x, float inv_scale) {
  return fmaxf(fminf(x * inv_scale, kFp8E4m3Max), -kFp8E4m3Max);
}
__device__ __forceinline__ fp8_e4m3 to_fp8_e4m3(float x, float inv_scale) {
  return fp8_e4m3{static_cast<unsigned char>(
      __nv_cvt_float_to_fp8(fp8_e4m3_clamped(x, inv_scale), __NV_SATFINITE, __NV_E4M3))};
}
// Two at once: one cvt.rn.satfinite.e4m3x2.f32 on sm_89+ (the one-value form converts a pair with a zero).
// Returns the two bytes in memory order: lo = a, hi = b.
__device__ __forceinline__ unsigned short to_fp8x2_e4m3(float a, float b, float inv_scale) {
  return __nv_cvt_float2_to_fp8x2(make_float2(fp8_e4m3_clamped(a, inv_scale), fp8_e4m3_clamped(b, inv_scale)),
                                  __NV_SATFINITE, __NV_E4M3);
}

}  // namespace cupy_ops
