// Merge two partial attention results over disjoint key sets using their log-sum-exp values
// (FlashInfer paper, arXiv 2501.01005, section 2.2). Spec: ../shared/specs/merge_attn_states.md.
//
// One row = one (token, head) pair of head_size elements. A block is blockDim.y rows by blockDim.x
// threads; each thread moves VEC elements (16 bytes on the fast path) of each tensor per step.
#include "common/dtypes.cuh"
#include "common/fast_divmod.cuh"
#include "common/vec.cuh"

namespace cupy_ops {

// Every field is 8 bytes, so the host packs it as a flat array of 8-byte words in this order
// (_PARAMS in cupy_ops/ops/merge_attn_states.py).
struct MergeAttnStatesParams {
  void* output;                // [n, h, d] scalar_t, or fp8 e4m3 when output_scale is set
  float* output_lse;           // [h, n] or nullptr
  const void* prefix_output;   // [n, h, d]
  const float* prefix_lse;     // [h, n]
  const void* suffix_output;   // [n, h, d]
  const float* suffix_lse;     // [h, n]
  const float* output_scale;   // [1] or nullptr
  int64_t prefill_tokens;      // tokens [0, p) have a prefix; the rest copy the suffix
  int64_t num_rows;            // n * h
  int64_t num_heads;
  int64_t head_size;
  fast_divmod row_to_token;    // row -> (token, head); valid when num_rows < 2^31
  // strides in elements: (token, head) for [n, h, d] tensors, (head, token) for [h, n] lse tensors
  int64_t output_stride[2];
  int64_t prefix_stride[2];
  int64_t suffix_stride[2];
  int64_t output_lse_stride[2];
  int64_t prefix_lse_stride[2];
  int64_t suffix_lse_stride[2];
};

template <typename out_t>
struct output_writer {
  float inv_scale;
  __device__ __forceinline__ out_t operator()(float x) const { return from_float<out_t>(x); }
};
template <>
struct output_writer<fp8_e4m3> {
  float inv_scale;
  __device__ __forceinline__ fp8_e4m3 operator()(float x) const { return to_fp8_e4m3(x, inv_scale); }
};

// The writer for a scale read earlier: 1 / scale is an IEEE division (a branch to a slow path), so the blend builds
// the writer only after its first data loads are issued; built first, the loads waited for the scale's load and
// the division (H200, bf16 -> fp8 at 1024 x 128 x 128: 0.96x vLLM's kernel in every run before, 1.005x and 0.98x in
// two runs after). The suffix-only copy builds it first: reordered there too, ptxas spilled 2 bytes in the bf16
// 64-bit-offset kernel.
template <typename out_t>
__device__ __forceinline__ output_writer<out_t> make_writer(float scale) {
  return {sizeof(out_t) == 1 ? 1.0f / scale : 1.0f};
}

// Weights of the two sides: out = a * prefix + b * suffix. Returns the merged lse.
__device__ __forceinline__ float merge_weights(float prefix_lse, float suffix_lse, float& a, float& b,
                                               bool& copy_prefix) {
  // +inf is as meaningless as -inf here: either way that side saw no keys.
  prefix_lse = isinf(prefix_lse) ? neg_inf() : prefix_lse;
  suffix_lse = isinf(suffix_lse) ? neg_inf() : suffix_lse;
  float max_lse = fmaxf(prefix_lse, suffix_lse);
  // fmaxf drops a NaN, so (NaN, -inf) would pass for "both sides empty" and hide the NaN (vLLM does this);
  // the sum is NaN exactly when one lse is (infinities are all -inf by now), and NaN then propagates.
  if (isnan(prefix_lse + suffix_lse)) max_lse = prefix_lse + suffix_lse;
  copy_prefix = (max_lse == neg_inf());
  if (copy_prefix) {
    a = 1.0f;
    b = 0.0f;
    return neg_inf();
  }
  const float prefix_se = expf(prefix_lse - max_lse);
  const float suffix_se = expf(suffix_lse - max_lse);
  const float sum_se = prefix_se + suffix_se;
  a = prefix_se / sum_se;
  b = suffix_se / sum_se;
  return logf(sum_se) + max_lse;
}

// Element offset of (i, j) in a tensor with strides (stride[0], stride[1]), in index_t arithmetic.
template <typename index_t>
__device__ __forceinline__ index_t offset2(index_t i, index_t j, const int64_t (&stride)[2]) {
  return i * static_cast<index_t>(stride[0]) + j * static_cast<index_t>(stride[1]);
}

// VEC floats rounded into the output type; fp8 two at a time (VEC is even whenever it is above 1).
template <typename out_t, int VEC>
__device__ __forceinline__ vec<out_t, VEC> convert(const float (&f)[VEC], const output_writer<out_t>& write) {
  vec<out_t, VEC> o;
  if constexpr (sizeof(out_t) == 1 && VEC % 2 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 2) {
      const unsigned short pair = to_fp8x2_e4m3(f[i], f[i + 1], write.inv_scale);
      o.v[i].bits = static_cast<unsigned char>(pair & 0xFF);
      o.v[i + 1].bits = static_cast<unsigned char>(pair >> 8);
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = write(f[i]);
  }
  return o;
}

// One vector of the merged row: the blend, or a plain copy of one side (bit-exact unless converting to fp8).
template <typename scalar_t, typename out_t, int VEC>
__device__ __forceinline__ vec<out_t, VEC> blend(const vec<scalar_t, VEC>& x, const vec<scalar_t, VEC>& y,
                                                float a, float b, bool copy_prefix,
                                                const output_writer<out_t>& write) {
  float f[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const float xf = to_float(x.v[i]);
    // a = 1, b = 0 would still turn an inf or NaN suffix into NaN, so the empty-both case selects.
    f[i] = copy_prefix ? xf : xf * a + to_float(y.v[i]) * b;
  }
  return convert<out_t, VEC>(f, write);
}

template <typename scalar_t, typename out_t, int VEC>
__device__ __forceinline__ void copy_vector(const scalar_t* src, out_t* dst, const output_writer<out_t>& write) {
  const vec<scalar_t, VEC> x = vec<scalar_t, VEC>::load(src);
  if constexpr (sizeof(out_t) == sizeof(scalar_t)) {
    x.store(dst);
  } else {
    float f[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) f[i] = to_float(x.v[i]);
    convert<out_t, VEC>(f, write).store(dst);
  }
}

// WIDE: 64-bit offsets, for tensors whose element offsets or row count can pass 2^31 (vLLM's 32-bit indices
// overflow near 1M tokens, vllm#45500); otherwise 32-bit math, which needs fewer registers and instructions.
template <typename scalar_t, typename out_t, int VEC, bool WIDE>
__global__ void __launch_bounds__(256, 4) merge_attn_states_kernel(const MergeAttnStatesParams p) {
  using in_vec = vec<scalar_t, VEC>;
  using index_t = typename pick_type<WIDE, int64_t, int>::type;
  index_t token, head;
  if constexpr (WIDE) {
    const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
    if (row >= p.num_rows) return;
    token = row / p.num_heads;
    head = row - token * p.num_heads;
  } else {
    const uint32_t row = blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= p.num_rows) return;
    uint32_t q, r;
    p.row_to_token.divmod(row, q, r);
    token = q;
    head = r;
  }

  const scalar_t* prefix = static_cast<const scalar_t*>(p.prefix_output) + offset2(token, head, p.prefix_stride);
  const scalar_t* suffix = static_cast<const scalar_t*>(p.suffix_output) + offset2(token, head, p.suffix_stride);
  out_t* out = static_cast<out_t*>(p.output) + offset2(token, head, p.output_stride);
  float* out_lse = p.output_lse == nullptr
                       ? nullptr
                       : p.output_lse + offset2(head, token, p.output_lse_stride);
  const float suffix_lse = __ldg(p.suffix_lse + offset2(head, token, p.suffix_lse_stride));
  const float scale = sizeof(out_t) == 1 ? __ldg(p.output_scale) : 1.0f;

  const index_t head_size = static_cast<index_t>(p.head_size);
  const index_t step = index_t(blockDim.x) * VEC;
  index_t col = index_t(threadIdx.x) * VEC;

  if (token >= p.prefill_tokens) {  // no context: the suffix as it is, lse included (+inf stays +inf)
    if (threadIdx.x == 0 && out_lse != nullptr) *out_lse = suffix_lse;
    const output_writer<out_t> write = make_writer<out_t>(scale);
    for (; col + VEC <= head_size; col += step) copy_vector<scalar_t, out_t, VEC>(suffix + col, out + col, write);
    for (; col < head_size; ++col) out[col] = write(to_float(suffix[col]));  // tail of a ragged head
    return;
  }

  const float prefix_lse = __ldg(p.prefix_lse + offset2(head, token, p.prefix_lse_stride));
  // The first vectors' loads go out before the exp/log math, so their latency overlaps the lse loads'.
  const bool first_full = col + VEC <= head_size;
  in_vec x, y;
  if (first_full) {
    x = in_vec::load(prefix + col);
    y = in_vec::load(suffix + col);
  }
  const output_writer<out_t> write = make_writer<out_t>(scale);
  float a, b;
  bool copy_prefix;
  const float merged_lse = merge_weights(prefix_lse, suffix_lse, a, b, copy_prefix);
  if (threadIdx.x == 0 && out_lse != nullptr) *out_lse = merged_lse;

  if (first_full) {
    blend<scalar_t, out_t, VEC>(x, y, a, b, copy_prefix, write).store(out + col);
    for (col += step; col + VEC <= head_size; col += step) {
      x = in_vec::load(prefix + col);
      y = in_vec::load(suffix + col);
      blend<scalar_t, out_t, VEC>(x, y, a, b, copy_prefix, write).store(out + col);
    }
  }
  for (; col < head_size; ++col) {  // tail of a ragged head, element by element
    const float xf = to_float(prefix[col]);
    out[col] = write(copy_prefix ? xf : xf * a + to_float(suffix[col]) * b);
  }
}

}  // namespace cupy_ops
