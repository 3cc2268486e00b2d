// Repetition penalty in place (vLLM's apply_repetition_penalties_): wherever prompt_mask[s, t] or
// output_mask[s, t] is set, logits[s, t] = x > 0 ? x / p[s] : x * p[s], in float, rounded to the logits' type.
// Spec: ../shared/specs/sampler_ops.md section 1.
//
// Memory-bound and sparse: at 1% mask density the masks (2 bytes per token) are ~2/3 of the traffic and only
// ~15% of the 32-byte logit sectors hold a penalised token. So the masks move in W-byte vector loads (W = 16
// when both masks' rows start at the same address mod 16; the host picks the widest W that holds, at most 4 for
// small SPECULATE calls) and a logit is read and written only where a mask is set.
//
// Work unit: a chunk of 32 * W consecutive tokens of one row, taken by one warp. Lane l loads the chunk's mask
// bytes [l * W, l * W + W) of both masks (one aligned vector each; byte loads only in the vectors cut by the
// row's ends) and stores their OR to the warp's slice of shared memory; then lane l takes tokens l, l + 32,
// l + 64, ..., so each logit load or store of the warp touches consecutive addresses (128 bytes of fp32 when
// every mask is set, only the set sectors otherwise). Warps stride over the chunks of all rows, and a warp's
// next chunk's masks are loaded before this chunk's logits, so mask loads stay in flight during the logit
// round trip. SPECULATE (small calls, where latency and not bytes sets the time): a lane also loads all of its
// chunk's logits together with the masks, so one memory round trip precedes the stores instead of two.
#include "common/dtypes.cuh"
#include "common/fast_divmod.cuh"
#include "common/vec.cuh"

namespace cupy_ops {

struct RepetitionPenaltiesParams {
  void* logits;                   // [num_seqs, vocab], T
  const void* prompt_mask;        // [num_seqs, vocab], bool, last stride 1
  const void* output_mask;        // [num_seqs, vocab], bool, last stride 1
  const void* penalties;          // [num_seqs], T or float
  int64_t num_seqs;
  int64_t vocab;
  int64_t logits_stride[2];       // in elements
  int64_t prompt_stride;          // mask row strides, in elements (= bytes)
  int64_t output_stride;
  int64_t penalties_stride;
  int64_t num_chunks;             // num_seqs * chunks_per_row, < 2^31 (fast_divmod's range)
  fast_divmod chunks_per_row;     // chunk -> (row, chunk of the row)
  int penalties_fp32;             // penalties are float, else T
};

constexpr int kRepetitionPenaltyThreads = 128;  // 4 independent warps: small grids still spread over SMs
constexpr int kWarps = kRepetitionPenaltyThreads / 32;

__device__ __forceinline__ unsigned char bits_or(unsigned char a, unsigned char b) { return a | b; }
__device__ __forceinline__ unsigned short bits_or(unsigned short a, unsigned short b) { return a | b; }
__device__ __forceinline__ unsigned int bits_or(unsigned int a, unsigned int b) { return a | b; }
__device__ __forceinline__ uint2 bits_or(uint2 a, uint2 b) { return make_uint2(a.x | b.x, a.y | b.y); }
__device__ __forceinline__ uint4 bits_or(uint4 a, uint4 b) {
  return make_uint4(a.x | b.x, a.y | b.y, a.z | b.z, a.w | b.w);
}

// Where a chunk starts: its row, and its token 0 (negative when the row's first vector starts before the row).
struct ChunkStart {
  int64_t row;
  int64_t first_token;
};

template <int W>
__device__ __forceinline__ ChunkStart chunk_start(const RepetitionPenaltiesParams& p, int64_t chunk) {
  uint32_t row, in_row;
  p.chunks_per_row.divmod(static_cast<uint32_t>(chunk), row, in_row);
  // Vectors are aligned to W bytes of the prompt row (the host made the output row congruent to it mod W), so
  // the row's first vector starts `skew` tokens before the row.
  const uint64_t prompt_row = reinterpret_cast<uint64_t>(p.prompt_mask) + static_cast<int64_t>(row) * p.prompt_stride;
  const int64_t skew = static_cast<int64_t>(prompt_row & (W - 1));
  return {row, static_cast<int64_t>(in_row) * (32 * W) - skew};
}

// One lane's W mask bytes of a chunk, both masks ORed: one aligned vector load per mask, byte loads only in the
// vectors cut by the row's ends (zeros outside the row).
template <int W>
__device__ __forceinline__ typename raw_bits<W>::type load_lane_masks(const RepetitionPenaltiesParams& p,
                                                                      ChunkStart at, int lane) {
  using bits_t = typename raw_bits<W>::type;
  const unsigned char* prompt = static_cast<const unsigned char*>(p.prompt_mask) + at.row * p.prompt_stride;
  const unsigned char* output = static_cast<const unsigned char*>(p.output_mask) + at.row * p.output_stride;
  const int64_t first = at.first_token + static_cast<int64_t>(lane) * W;
  if (first >= 0 && first + W <= p.vocab) {
    bits_t bits = __ldg(reinterpret_cast<const bits_t*>(prompt + first));
    if (prompt != output) bits = bits_or(bits, __ldg(reinterpret_cast<const bits_t*>(output + first)));
    return bits;  // (callers pass one tensor as both masks: it is read once)
  }
  union {
    bits_t bits;
    unsigned char bytes[W];
  } cut;
#pragma unroll
  for (int i = 0; i < W; ++i) {
    const int64_t t = first + i;
    cut.bytes[i] = (t >= 0 && t < p.vocab) ? static_cast<unsigned char>(prompt[t] | output[t]) : 0;
  }
  return cut.bits;
}

template <typename T>
__device__ __forceinline__ float load_penalty(const RepetitionPenaltiesParams& p, int64_t row) {
  const int64_t i = row * p.penalties_stride;
  return p.penalties_fp32 ? static_cast<const float*>(p.penalties)[i] : to_float(static_cast<const T*>(p.penalties)[i]);
}

// vLLM's math: strict > 0, so 0, negatives, -inf and NaN take the multiply; IEEE division (no fast math).
template <typename T>
__device__ __forceinline__ T penalize(T value, float penalty) {
  const float x = to_float(value);
  return from_float<T>(x > 0.0f ? x / penalty : x * penalty);
}

// UNIT_STRIDE: the logits' last stride is 1, so a lane's W logits are one pointer plus constant offsets
// (a run-time stride costs W 64-bit addresses: 86 registers at W = 16 instead of 48-55).
template <typename T, int W, bool UNIT_STRIDE, bool SPECULATE>
__global__ void __launch_bounds__(kRepetitionPenaltyThreads)
repetition_penalties_kernel(const RepetitionPenaltiesParams p) {
  using bits_t = typename raw_bits<W>::type;
  __shared__ alignas(16) unsigned char staged[kWarps][32 * W];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  unsigned char* mine = staged[warp];
  const int64_t column_stride = UNIT_STRIDE ? 1 : p.logits_stride[1];
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;
  int64_t chunk = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (chunk >= p.num_chunks) return;
  bits_t next = load_lane_masks<W>(p, chunk_start<W>(p, chunk), lane);
  for (; chunk < p.num_chunks; chunk += step) {
    const ChunkStart at = chunk_start<W>(p, chunk);
    T* logits = static_cast<T*>(p.logits) + at.row * p.logits_stride[0];
    logits += (at.first_token + lane) * column_stride;  // this lane's token 0 (only set tokens are touched)
    T x[W];
    if constexpr (SPECULATE) {  // issued before the masks are waited for (the store to shared memory below)
#pragma unroll
      for (int j = 0; j < W; ++j) {
        const int64_t t = at.first_token + lane + 32 * j;
        if (t >= 0 && t < p.vocab) x[j] = logits[32 * j * column_stride];
      }
    }
    *reinterpret_cast<bits_t*>(mine + lane * W) = next;
    if (chunk + step < p.num_chunks) next = load_lane_masks<W>(p, chunk_start<W>(p, chunk + step), lane);
    __syncwarp();
    unsigned int set = 0;  // bit j: token lane + 32 j of the chunk is penalised (and inside the row)
#pragma unroll
    for (int j = 0; j < W; ++j) set |= (mine[lane + 32 * j] != 0 ? 1u : 0u) << j;
    __syncwarp();  // every lane has read the slice before the next chunk overwrites it
    if (set == 0) continue;  // 1% density per mask: 72% of lanes have none of their 16 tokens set
    const float penalty = load_penalty<T>(p, at.row);  // in flight with the logit loads below
    // All loads first, then all stores: up to W logit loads of this lane in flight at once.
    if constexpr (!SPECULATE) {
#pragma unroll
      for (int j = 0; j < W; ++j) {
        if (set >> j & 1u) x[j] = logits[32 * j * column_stride];
      }
    }
#pragma unroll
    for (int j = 0; j < W; ++j) {
      if (set >> j & 1u) logits[32 * j * column_stride] = penalize(x[j], penalty);
    }
  }
}

}  // namespace cupy_ops
