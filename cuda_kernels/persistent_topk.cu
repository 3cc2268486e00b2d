// persistent_topk: for each row, the indices of the k largest of its first L = clamp(length, 0, max_len) scores
// (common/topk.cuh has the contract, common/topk_row.cuh the algorithm). The grid depends only on host scalars
// (rows, width, k, max_seq_len); a row's length is read here, so a CUDA graph replays correctly with new lengths.
#include "common/grid_dependency.cuh"
#include "common/topk_registers.cuh"
#include "common/topk_row.cuh"
#include "common/topk_two_pass.cuh"

namespace cupy_ops {

struct PersistentTopKParams {
  int* output;           // [num_rows, k] int32, row stride out_stride
  const float* logits;   // [num_rows, W] fp32, row stride stride0, unit column stride
  const int* lengths;    // [num_rows] int32
  int64_t stride0;
  int64_t out_stride;
  int64_t max_len;       // min(max_seq_len, W), at least 0
  int k;                 // 1..4096
  int cap;               // buffer entries per CTA (common/topk_row.cuh: topk_row), or the two-pass kernel's list
  int stage;             // staging entries per CTA: k, or 0 when no chunk can exceed cap
  int stages;            // groups of the copy ring (1..3); the two-pass kernel's: 1 stages its sampled read
  int sample;            // survivors a sampled cutoff aims at (common/topk.cuh: sample_cutoff), 0: no sampling
  float sample_spread;   // the two-pass kernel's target a row (topk_two_pass.cuh: row_sample_target), 0: sample
  int sample_floor;      // and its floor
};

__device__ __forceinline__ int row_length(const PersistentTopKParams& p, int row) {
  return static_cast<int>(min(max(static_cast<int64_t>(p.lengths[row]), int64_t{0}), p.max_len));
}

// WHOLE: whole chunks only (top_k_per_row.cu's kernel says why).
template <int THREADS, int CLUSTER, bool WHOLE = false>
__global__ void __launch_bounds__(THREADS, topk::min_blocks<THREADS, CLUSTER, WHOLE>()) persistent_topk_kernel(const PersistentTopKParams p) {
  const int row = static_cast<int>(blockIdx.x / CLUSTER);
  begin_dependent_grid();  // before the first global read (common/grid_dependency.cuh)
  topk::topk_row<THREADS, CLUSTER, WHOLE>(p.logits + row * p.stride0, 1, row_length(p, row),
                                          p.output + row * p.out_stride, p.k, p.cap, p.stage, p.stages, p.sample);
}

// One CTA a row, one sampled read or two reads of it (common/topk_two_pass.cuh); cap is the list's entries, sample
// the sampled read's target (0: two reads), stages 1 where that read stages its next batch in shared memory.
template <int THREADS>
__global__ void __launch_bounds__(THREADS, topk::two_pass_min_blocks<THREADS>()) persistent_topk_two_pass_kernel(const PersistentTopKParams p) {
  const int row = static_cast<int>(blockIdx.x);
  begin_dependent_grid();  // before the first global read (common/grid_dependency.cuh)
  topk::topk_row_two_pass<THREADS>(p.logits + row * p.stride0, row_length(p, row),
                                   [&] { return p.output + static_cast<int>(blockIdx.x) * p.out_stride; },
                                   p.k, p.cap, topk::two_pass_words(p.max_len),
                                   p.sample, p.sample_spread, p.sample_floor, p.stages);
}

// The row in registers (common/topk_registers.cuh), SLOTS 16-byte slots a thread: plans launch it where a CTA's
// chunk fits them and the grid fits the SMs (one CTA an SM: all the registers it wants; cap, stage, stages and
// sample are unused).
template <int THREADS, int CLUSTER, int SLOTS>
__global__ void __launch_bounds__(THREADS, 1) persistent_topk_registers_kernel(const PersistentTopKParams p) {
  const int row = static_cast<int>(blockIdx.x / CLUSTER);
  begin_dependent_grid();  // before the first global read (common/grid_dependency.cuh)
  topk::topk_row_registers<THREADS, CLUSTER, SLOTS>(p.logits + row * p.stride0, 1, row_length(p, row),
                                                    p.output + row * p.out_stride, p.k);
}

}  // namespace cupy_ops
