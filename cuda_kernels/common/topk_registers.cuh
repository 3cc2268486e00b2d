// topk_row_registers: the top k of one row (common/topk.cuh has the contract) with the row's chunk held in
// registers, for top_k_per_row_prefill, top_k_per_row_decode (top_k_per_row.cu) and persistent_topk
// (persistent_topk.cu), where a CTA's chunk is at most 4 x SLOTS x THREADS scores.
//
// topk_row (topk_row.cuh) streams a chunk through a copy ring into a buffer of keys in shared memory, then each
// radix round re-reads the buffer, and the emission reads it twice more (counts by thread run, then the writes):
// at 64 x 20000 (k 512, one 1024-thread CTA a row) ncu counted ~1570 instructions a warp, a quarter of them in
// those two emission passes, and ~20% in the stream. Here thread t holds a run of n <= SLOTS consecutive slots of
// its CTA's chunk, t x n .. t x n + n - 1 (16 bytes, 4 scores each; slot s holds elements 4s - a .. 4s - a + 3,
// a = the row start's offset in 4-byte units, as in topk_row), as keys in registers, so:
// 1. one read of global memory (the SLOTS loads of a thread in flight together) and the 11-bit histogram;
// 2. the select (topk.cuh) with rounds over registers;
// 3. index order is thread order: one block scan of each thread's counts above / equal to the pivot places its
//    outputs (in a cluster, cluster_emission continues the slots from the lower-ranked CTAs); a thread visits
//    only its taken keys (bitmasks from the count) and stores them to its consecutive output slots.
// A warp's load spans 20 cache lines at 5 slots a thread. Warp-coalesced slots (lane l of warp w holding 32 n w +
// 32 u + l) read persistent 64 x 20000 in 3.2 us against 3.6 (H100, session 35), but the per-slot warp scans that
// put their outputs in column order cost more: 9.0 -> 10.0 us for the call (docs/performance-log.md).
// Elements outside the CTA's chunk [lo, hi) are key-0 fillers, below every real key (>= key(-inf) = 0x007fffff,
// whose bin, 3, no filler's bin matches): never counted, never selected.
#pragma once
#include "cluster.cuh"
#include "topk.cuh"

namespace cupy_ops {
namespace topk {

// Set bits and the lowest set bit's position of a thread's key bitmask (32 or 64 keys).
__device__ __forceinline__ uint32_t popcount(uint32_t bits) { return __popc(bits); }
__device__ __forceinline__ uint32_t popcount(uint64_t bits) { return __popcll(bits); }
__device__ __forceinline__ int lowest_bit(uint32_t bits) { return __ffs(bits) - 1; }
__device__ __forceinline__ int lowest_bit(uint64_t bits) { return __ffsll(bits) - 1; }

// No dynamic shared memory. The host guarantees len <= 2^31 - 8 and that CTA `rank`'s chunk
// of ceil(ceil((len + a) / 4) / CLUSTER) slots is at most SLOTS x THREADS (so counts fit 16 bits: SLOTS x THREADS
// x 4 < 65536).
template <int THREADS, int CLUSTER, int SLOTS>
__device__ void topk_row_registers(const float* base, int64_t stride, int len, int* out, int k) {
  static_assert(4 * SLOTS <= 64 && 4 * SLOTS * THREADS < 65536, "valid bits in 64, counts in 16 bits");
  using bits_t = typename pick_type<(4 * SLOTS > 32), uint64_t, uint32_t>::type;
  __shared__ Shared sh;
  const int rank = static_cast<int>(cluster_rank<CLUSTER>());
  if (len <= k) {
    write_short_row<THREADS, CLUSTER>(len, out, k, rank);
    return;
  }
  const bool contiguous = stride == 1;
  const CtaChunk chunk = cta_chunk<CLUSTER>(base, contiguous, len, rank);
  const int a = chunk.a, s_lo = chunk.s_lo, s_hi = chunk.s_hi, lo = chunk.lo, hi = chunk.hi;
  // Slots a thread: as few as the chunk needs (uniform over the CTA, so the unrolled loops below branch past the
  // unused ones), thread t's run starting at slot s_lo + t x per_thread.
  const int per_thread = (s_hi - s_lo + THREADS - 1) / THREADS;
  const int first_slot = s_lo + static_cast<int>(threadIdx.x) * per_thread;

  // Every load in flight before any is used; the barrier that orders clear_fine before the histogram waits for
  // none of them.
  float x[4 * SLOTS];
  bits_t valid = 0;  // bit j: element 4 first_slot - a + j lies in [lo, hi)
#pragma unroll
  for (int u = 0; u < SLOTS; ++u) {
    if (u >= per_thread) break;
    const int i0 = 4 * (first_slot + u) - a;
    if (contiguous && i0 >= lo && i0 + 4 <= hi) {
      put_slot(x, u, __ldg(reinterpret_cast<const float4*>(base + i0)));
      valid |= bits_t{0xf} << (4 * u);
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = i0 + e;
        x[4 * u + e] = 0.0f;
        if (i >= lo && i < hi) {
          x[4 * u + e] = __ldg(base + static_cast<int64_t>(i) * stride);
          valid |= bits_t{1} << (4 * u + e);
        }
      }
    }
  }
  clear_fine<THREADS>(sh);
  __syncthreads();
  // A whole slot's four counts without a branch each (the guarded atomic per key was ~25% of the instructions at
  // 64 x 20000, ncu); a cut slot's valid keys one by one.
  uint32_t key[4 * SLOTS];
#pragma unroll
  for (int u = 0; u < SLOTS; ++u) {
    const uint32_t v = u < per_thread ? static_cast<uint32_t>(valid >> (4 * u)) & 0xfu : 0u;
#pragma unroll
    for (int e = 0; e < 4; ++e) key[4 * u + e] = v >> e & 1u ? float_key(x[4 * u + e]) : 0u;
    if (v == 0xfu) {
#pragma unroll
      for (int e = 0; e < 4; ++e) atomicAdd(&sh.fine[key[4 * u + e] >> 21], 1u);
    } else if (v != 0u) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (v >> e & 1u) atomicAdd(&sh.fine[key[4 * u + e] >> 21], 1u);
      }
    }
  }
  __syncthreads();

  uint32_t pivot, mask, rem;
  select_round0<THREADS, CLUSTER>(static_cast<uint32_t>(k), true, sh);
  select_refine<THREADS, CLUSTER>([&](auto f) {
#pragma unroll
    for (int u = 0; u < SLOTS; ++u) {
      if (u >= per_thread) break;
      f.quad(make_uint4(key[4 * u], key[4 * u + 1], key[4 * u + 2], key[4 * u + 3]));
    }
  }, true, sh, pivot, mask, rem);

  // Fillers (key 0) are below every pivot (a real key's bin, >= 3): no valid-bit test needed. Bit j of
  // above_bits / equal_bits: key j is above / equal to the pivot, so the emission visits only the taken keys
  // (k of the row's L; at 64 x 20000, k 512, a loop over every key was ~15% of the instructions, ncu).
  // Two compares a key, no mask: key & mask > pivot <=> key > top, and key & mask >= pivot <=> key >= pivot (the
  // pivot's bits under the mask are zero). H100, A/B in one run (session 35): persistent 64 x 20000 9.3 -> 9.1 us,
  // decode 16 x 32768 11.3 -> 11.2, 1 x 8192 5.9 -> 5.8.
  const uint32_t top = pivot | ~mask;  // the largest key equal to the pivot under the mask
  bits_t above_bits = 0, at_least = 0;
#pragma unroll
  for (int j = 0; j < 4 * SLOTS; ++j) {
    if (j >= 4 * per_thread) break;
    above_bits |= static_cast<bits_t>(key[j] > top) << j;
    at_least |= static_cast<bits_t>(key[j] >= pivot) << j;
  }
  const bits_t equal_bits = at_least & ~above_bits;
  const uint32_t above = popcount(above_bits), equal = popcount(equal_bits);
  uint32_t parity = 0, total;
  const uint32_t before = block_exclusive_sum<THREADS>(above | equal << 16, total, sh, parity);
  int first, take;
  cluster_emission<CLUSTER>(rem, sh, first, take);
  // Ties go to the lowest indices: this thread takes the first take - tied of its pivot-equal keys, tied being
  // the CTA's pivot-equal keys before this thread's.
  const int tied = static_cast<int>(before >> 16);
  int ties_taken = min(max(take - tied, 0), static_cast<int>(equal));
  bits_t taken = above_bits;
  for (bits_t rest = equal_bits; ties_taken > 0; --ties_taken) {
    const bits_t lowest = rest & (~rest + 1);
    taken |= lowest;
    rest ^= lowest;
  }
  // Index order is bit order: the slot is the entries taken before this thread plus those of its lower bits. Stored
  // straight from here: a thread's outputs are consecutive slots, so a warp's stores cover a few sectors. H100, A/B
  // in one run (session 35) against staging them for coalesced stores (a barrier): persistent 64 x 20000 9.3 -> 9.1
  // us, 1 x 163840 10.9 -> 10.8, 4 x 163840 11.6 -> 11.5, decode 16 x 32768 11.3 -> 11.2; 8 x 4096 4.6 -> 4.7. (The
  // two-pass kernel keeps its staging: see there.)
  int slot = first + static_cast<int>(before & 0xffffu) + min(tied, take);
  for (; taken != 0; taken &= taken - 1) out[slot++] = 4 * first_slot - a + lowest_bit(taken);
  if constexpr (CLUSTER > 1) cluster_wait();  // arrived in cluster_emission; others read our shared memory until here
}

}  // namespace topk
}  // namespace cupy_ops
