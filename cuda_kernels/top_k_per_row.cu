// top_k_per_row_prefill and top_k_per_row_decode: for each row, the indices of the k largest scores of its window,
// relative to the window start (common/topk.cuh has the contract, common/topk_row.cuh the algorithm). One kernel
// for both ops: they differ only in how a row's window is found.
#include "common/grid_dependency.cuh"
#include "common/topk_registers.cuh"
#include "common/topk_row.cuh"
#include "common/topk_two_pass.cuh"

namespace cupy_ops {

struct TopKPerRowParams {
  int* indices;          // [num_rows, k] int32, row stride out_stride
  const float* logits;   // [num_rows, num_cols] fp32, strides (stride0, stride1) in elements
  const int* starts;     // prefill: rowStarts[num_rows]; decode: unused
  const int* ends;       // prefill: rowEnds[num_rows]; decode: seq_lens, flattened
  int64_t num_cols;
  int64_t stride0;
  int64_t stride1;
  int64_t out_stride;
  int k;                 // 1..4096
  int cap;               // buffer entries per CTA (common/topk_row.cuh: topk_row), or the two-pass kernel's list
  int stage;             // staging entries per CTA: k, or 0 when no chunk can exceed cap
  int stages;            // groups of the copy ring (1..3); the two-pass kernel's: 1 stages its sampled read
  int sample;            // survivors a sampled cutoff aims at (common/topk.cuh: sample_cutoff), 0: no sampling
  float sample_spread;   // the two-pass kernel's target a row (topk_two_pass.cuh: row_sample_target), 0: sample
  int sample_floor;      // and its floor
  int decode;            // 0: prefill windows [start, end); 1: decode windows [0, end)
  int next_n;            // decode: query tokens per sequence (>= 1)
  int per_row;           // decode: seq_lens holds one length per row (numel == num_rows)
  int reverse;           // rows run in reverse launch order (row_of)
};

// The row of CTA blockIdx.x (CLUSTER CTAs a row). The GPU starts CTAs roughly in launch order, so the last rows
// launched set the call's tail; causal prefill rows grow with the row index, and launching them last-first starts
// the longest ones first and ends on the shortest (longest-first scheduling), where first-first ends a call on a
// wave of the longest rows.
template <int CLUSTER>
__device__ __forceinline__ int row_of(const TopKPerRowParams& p) {
  const int launched = static_cast<int>(blockIdx.x / CLUSTER);
  return p.reverse ? static_cast<int>(gridDim.x / CLUSTER) - 1 - launched : launched;
}

// Prefill: [clamp(start, 0, W), clamp(end, start, W)). Decode: [0, clamp(end, 0, W)) with end = seq_lens[row] when
// per_row, else seq_lens[row / next_n] - next_n + row % next_n + 1 (query row % next_n of its sequence).
struct RowWindow {
  int64_t start, length;
};

__device__ __forceinline__ RowWindow row_window(const TopKPerRowParams& p, int row) {
  int64_t start = 0, end;
  if (p.decode) {
    end = p.per_row ? static_cast<int64_t>(p.ends[row])
                    : static_cast<int64_t>(p.ends[row / p.next_n]) - p.next_n + row % p.next_n + 1;
  } else {
    start = min(max(static_cast<int64_t>(p.starts[row]), int64_t{0}), p.num_cols);
    end = p.ends[row];
  }
  end = min(max(end, start), p.num_cols);
  return {start, end - start};
}

// WHOLE: plans give only whole chunks (stage = 0): the streaming path is left out (40 registers, not 64: five
// 256-thread CTAs an SM, kWholeCtas256).
template <int THREADS, int CLUSTER, bool WHOLE = false>
__global__ void __launch_bounds__(THREADS, topk::min_blocks<THREADS, CLUSTER, WHOLE>()) top_k_per_row_kernel(const TopKPerRowParams p) {
  const int row = row_of<CLUSTER>(p);
  begin_dependent_grid();  // before the first global read (common/grid_dependency.cuh)
  const RowWindow w = row_window(p, row);
  topk::topk_row<THREADS, CLUSTER, WHOLE>(p.logits + row * p.stride0 + w.start * p.stride1, p.stride1,
                                          static_cast<int>(w.length), p.indices + row * p.out_stride, p.k, p.cap,
                                          p.stage, p.stages, p.sample);
}

// One CTA a row, one sampled read or two reads of it (common/topk_two_pass.cuh); cap is the list's entries, sample
// the sampled read's target (0: two reads), stages 1 where that read stages its next batch in shared memory. Plans
// launch it only for unit column strides.
template <int THREADS>
__global__ void __launch_bounds__(THREADS, topk::two_pass_min_blocks<THREADS>()) top_k_per_row_two_pass_kernel(const TopKPerRowParams p) {
  const int row = row_of<1>(p);
  begin_dependent_grid();  // before the first global read (common/grid_dependency.cuh)
  const RowWindow w = row_window(p, row);
  topk::topk_row_two_pass<THREADS>(p.logits + row * p.stride0 + w.start, static_cast<int>(w.length),
                                   [&] { return p.indices + row_of<1>(p) * p.out_stride; }, p.k, p.cap,
                                   topk::two_pass_words(p.num_cols), p.sample, p.sample_spread, p.sample_floor,
                                   p.stages);
}

// The row in registers (common/topk_registers.cuh), SLOTS 16-byte slots a thread: plans launch it where a CTA's
// chunk fits them and the grid fits the SMs (one CTA an SM: all the registers it wants; cap, stage, stages and
// sample are unused).
template <int THREADS, int CLUSTER, int SLOTS>
__global__ void __launch_bounds__(THREADS, 1) top_k_per_row_registers_kernel(const TopKPerRowParams p) {
  const int row = static_cast<int>(blockIdx.x / CLUSTER);  // (every CTA is resident at once: no row_of)
  begin_dependent_grid();  // before the first global read (common/grid_dependency.cuh)
  const RowWindow w = row_window(p, row);
  topk::topk_row_registers<THREADS, CLUSTER, SLOTS>(p.logits + row * p.stride0 + w.start * p.stride1, p.stride1,
                                                    static_cast<int>(w.length), p.indices + row * p.out_stride, p.k);
}

}  // namespace cupy_ops
