// persistent_topk: for each row, the indices of the k largest of its first L = clamp(length, 0, max_len) scores
// (common/topk.cuh has the contract and the algorithm). The grid depends only on host scalars (rows, width, k,
// max_seq_len); a row's length is read here, so a CUDA graph replays correctly with new lengths.
#include "common/topk.cuh"

namespace cupy_ops {

struct PersistentTopKParams {
  int* output;           // [num_rows, k] int32, row stride out_stride
  const float* logits;   // [num_rows, W] fp32, row stride stride0, unit column stride
  const int* lengths;    // [num_rows] int32
  int64_t stride0;
  int64_t out_stride;
  int64_t max_len;       // min(max_seq_len, W), at least 0
  int k;                 // 1..4096
  int cap;               // buffer entries per CTA (common/topk.cuh: topk_row)
  int stage;             // staging entries per CTA: k, or 0 when no chunk can exceed cap
  int stages;            // groups of the copy ring (1..3)
};

template <int THREADS, int CLUSTER>
__global__ void __launch_bounds__(THREADS, topk::min_blocks<THREADS, CLUSTER>()) persistent_topk_kernel(const PersistentTopKParams p) {
  const int row = static_cast<int>(blockIdx.x / CLUSTER);
  const int64_t len = min(max(static_cast<int64_t>(p.lengths[row]), int64_t{0}), p.max_len);
  topk::topk_row<THREADS, CLUSTER>(p.logits + row * p.stride0, 1, static_cast<int>(len),
                                   p.output + row * p.out_stride, p.k, p.cap, p.stage, p.stages);
}

}  // namespace cupy_ops
