// Merge two partial attention results over disjoint key sets using their log-sum-exp values
// (FlashInfer paper, arXiv 2501.01005, section 2.2). Spec: ../shared/specs/merge_attn_states.md.
//
// One row = one (token, head) pair of head_size elements. A block is blockDim.y rows by blockDim.x
// threads; each thread moves VEC elements (16 bytes on the fast path) of each tensor per step.
#include "common/dtypes.cuh"
#include "common/fast_divmod.cuh"
#include "common/vec.cuh"

namespace cupy_ops {

// Every field is 8 bytes so the host packs it as a flat array of int64 (cupy_ops/ops/merge_attn_states.py).
struct MergeAttnStatesParams {
  void* output;                // [n, h, d] scalar_t, or fp8 e4m3 when output_scale is set
  float* output_lse;           // [h, n] or nullptr
  const void* prefix_output;   // [n, h, d]
  const float* prefix_lse;     // [h, n]
  const void* suffix_output;   // [n, h, d]
  const float* suffix_lse;     // [h, n]
  const float* output_scale;   // [1] or nullptr
  int64_t num_rows;            // n * h
  int64_t num_heads;
  int64_t head_size;
  int64_t prefill_tokens;      // tokens [0, p) have a prefix; the rest copy the suffix
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

// Weights of the two sides: out = a * prefix + b * suffix. Returns the merged lse.
__device__ __forceinline__ float merge_weights(float prefix_lse, float suffix_lse, float& a, float& b,
                                               bool& copy_prefix) {
  // +inf is as meaningless as -inf here: either way that side saw no keys.
  prefix_lse = isinf(prefix_lse) ? neg_inf() : prefix_lse;
  suffix_lse = isinf(suffix_lse) ? neg_inf() : suffix_lse;
  const float max_lse = fmaxf(prefix_lse, suffix_lse);
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

template <typename scalar_t, typename out_t, int VEC>
__global__ void __launch_bounds__(256, 4) merge_attn_states_kernel(const MergeAttnStatesParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= p.num_rows) return;
  int64_t token, head;
  if (p.num_rows < (int64_t(1) << 31)) {
    uint32_t q, r;
    p.row_to_token.divmod(static_cast<uint32_t>(row), q, r);
    token = q;
    head = r;
  } else {
    token = row / p.num_heads;
    head = row - token * p.num_heads;
  }

  const bool has_prefix = token < p.prefill_tokens;
  const float suffix_lse =
      p.suffix_lse[head * p.suffix_lse_stride[0] + token * p.suffix_lse_stride[1]];
  float a = 0.0f, b = 1.0f, out_lse = suffix_lse;
  bool copy_prefix = false;
  if (has_prefix) {
    const float prefix_lse =
        p.prefix_lse[head * p.prefix_lse_stride[0] + token * p.prefix_lse_stride[1]];
    out_lse = merge_weights(prefix_lse, suffix_lse, a, b, copy_prefix);
  }
  const bool copy_suffix = !has_prefix;
  if (threadIdx.x == 0 && p.output_lse != nullptr) {
    p.output_lse[head * p.output_lse_stride[0] + token * p.output_lse_stride[1]] = out_lse;
  }

  output_writer<out_t> write{1.0f};
  if constexpr (sizeof(out_t) == 1) write.inv_scale = 1.0f / __ldg(p.output_scale);

  const scalar_t* prefix = static_cast<const scalar_t*>(p.prefix_output) + token * p.prefix_stride[0] +
                           head * p.prefix_stride[1];
  const scalar_t* suffix = static_cast<const scalar_t*>(p.suffix_output) + token * p.suffix_stride[0] +
                           head * p.suffix_stride[1];
  out_t* out = static_cast<out_t*>(p.output) + token * p.output_stride[0] + head * p.output_stride[1];

  for (int64_t col = int64_t(threadIdx.x) * VEC; col < p.head_size; col += int64_t(blockDim.x) * VEC) {
    if (col + VEC <= p.head_size) {
      using in_vec = vec<scalar_t, VEC>;
      vec<out_t, VEC> o;
      if (copy_suffix || copy_prefix) {
        const in_vec x = in_vec::load((copy_suffix ? suffix : prefix) + col);
        if constexpr (sizeof(out_t) == sizeof(scalar_t)) {
          o = *reinterpret_cast<const vec<out_t, VEC>*>(&x);  // bit-exact copy
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) o.v[i] = write(to_float(x.v[i]));
        }
      } else {
        const in_vec x = in_vec::load(prefix + col);
        const in_vec y = in_vec::load(suffix + col);
#pragma unroll
        for (int i = 0; i < VEC; ++i) o.v[i] = write(to_float(x.v[i]) * a + to_float(y.v[i]) * b);
      }
      o.store(out + col);
    } else {
      // Tail of a head_size that is not a multiple of VEC: element by element.
      for (int64_t c = col; c < p.head_size; ++c) {
        const float x = to_float(prefix[c]);
        const float y = to_float(suffix[c]);
        const float v = copy_suffix ? y : (copy_prefix ? x : x * a + y * b);
        out[c] = write(v);
      }
    }
  }
}

}  // namespace cupy_ops
