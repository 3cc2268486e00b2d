// Top-k over rows of fp32 scores: the device core of top_k_per_row_prefill, top_k_per_row_decode
// (top_k_per_row.cu) and persistent_topk (persistent_topk.cu). Specs: ../shared/specs/sampler_ops.md section 2,
// ../shared/specs/persistent_topk.md.
//
// One row is `len` elements at base[i * stride], 0 <= i < len; its result is k int32 slots:
// - len <= k: 0, 1, ..., len - 1, then -1.
// - len > k: the indices of the k largest values, in ascending index order. Values are ranked by an
//   order-preserving uint32 key (float_key) in which -0 == +0 and every NaN is one value above +inf (torch.topk's
//   order); among values equal to the k-th largest, the lowest indices win. The result depends on the data only.
//
// Algorithm: one read of global memory (plus a 2048-score sample of a long chunk, and a second read only when
// that sample misleads), everything else in shared memory.
// 1. The row is cut into CLUSTER contiguous chunks, one per CTA of a thread-block cluster (sm_90; CLUSTER = 1
//    elsewhere). A CTA streams its chunk in groups of 2 x THREADS aligned float4 slots (cp.async into a ring,
//    groups ahead) and appends their keys to a shared buffer in index order (16-byte stores by slot position
//    while nothing is filtered, then a block scan), keeping a histogram of the top 11 key bits.
// 2. When the buffer (cap entries) is full, the CTA keeps only the top k of its buffer (the select and emission
//    below, on this CTA alone) and from then on appends only keys above the k-th kept one: a later element of the
//    chunk has a higher index, so one not above that key loses to the k kept ones. A long chunk of a streaming CTA
//    starts filtered instead, at a cutoff sampled from it (sample_cutoff). Any cutoff is exact as long as k entries
//    reach it (each element it rejects then has k of its chunk above it); when fewer do, the CTA reads its chunk a
//    second time without one.
// 3. Select: radix rounds of 11, 8, 8 and 8 bits (the last overlapping 3 bits already fixed) give `pivot`, the k-th
//    largest key, and `rem`, the number of pivot-equal entries to take. Round 0 needs no pass over the buffer (it
//    reads the 11-bit histogram kept while streaming); the others histogram the entries still tied; in a cluster,
//    histograms are summed through distributed shared memory, one cluster barrier per round.
// 4. Emit: every entry above pivot and the first rem pivot-equal ones (the cluster's prefix of per-CTA counts
//    orders them across CTAs) goes to its rank in index order: staged in shared memory, then copied out with
//    coalesced stores (a thread's contiguous run of entries would otherwise store one 4-byte word per lane and
//    L2 transaction: 2048 of them per row).
// While a CTA's whole chunk fits its buffer (stage = 0: no shrink can happen) an entry's column is implicit, its
// buffer position plus the chunk's first column, so the buffer holds keys only (4 bytes per element, not 8).
#pragma once
#include "async_copy.cuh"
#include "cluster.cuh"
#include "types.cuh"

namespace cupy_ops {
namespace topk {

// CTAs per SM the register budget must allow: 64 registers a thread (a 256-thread CTA in a cluster, one per SM,
// may take 128: at 64 it spilled 4-8 bytes).
template <int THREADS, int CLUSTER>
constexpr int min_blocks() { return THREADS == 256 && CLUSTER > 1 ? 2 : 1024 / THREADS; }

// float_key(NaN): one above key(+inf) = 0xff800000, so NaN ranks above +inf and every NaN ties with every other.
constexpr uint32_t kNanKey = 0xff800001u;
constexpr uint32_t kFullMask = 0xffffffffu;

// Larger value <=> larger key. Keys of real values lie in [key(-inf) = 0x007fffff, kNanKey]; -0 maps to +0's key.
__device__ __forceinline__ uint32_t float_key(float x) {
  const uint32_t u = x == 0.0f ? 0u : __float_as_uint(x);
  const uint32_t key = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return x != x ? kNanKey : key;
}

// Shared state besides the dynamic buffers (about 11.5 KB).
struct alignas(16) Shared {
  // Histogram of key >> 21 of the buffer, kept while streaming: round 0 of the select finds the k-th largest's
  // 11-bit bin in it without a pass over the buffer. 2048 bins also spread the atomics: typical scores share 2-3
  // values of the top 8 key bits (sign and 7 exponent bits), so 8-bit bins would serialize ~10 lanes of a warp on
  // one address. In a cluster the other CTAs read it in round 0 of the final select, after which nothing writes
  // it (keep_top_k, sample_cutoff and topk_row's re-read do so only before; topk_row ends with a cluster barrier).
  uint32_t fine[2048];
  uint32_t hist[2][256];  // radix histograms, double-buffered by round: other CTAs of the cluster read them
  uint32_t total[256];    // a round's histogram summed over the cluster
  uint32_t scan[2][32];   // block scan: warp totals, double-buffered by call
  uint32_t counts[2];     // this CTA's entries above / equal to the pivot, read by the cluster
  uint32_t found[3];      // select: the round's bin, the rank left inside it, its count
  int emit[2];            // emission: this CTA's first output slot, pivot-equal entries it may take
  uint32_t appended;      // topk_row_two_pass: entries of the k-th largest's bin met in the second read
};

// ---- warp and block scans (shuffles; no CUB) ----

__device__ __forceinline__ uint32_t warp_inclusive_sum(uint32_t v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const uint32_t y = __shfl_up_sync(kFullMask, v, d);
    if (lane >= d) v += y;
  }
  return v;
}

// Exclusive prefix of v over the block in thread order, and the block total. Fields packed in v add without
// carries as long as each field's block total fits. One __syncthreads: the warp totals alternate between two
// buffers (`parity`, uniform over the block), and a buffer is written again only after the next call's barrier,
// which every thread reaches after reading it.
template <int THREADS>
__device__ __forceinline__ uint32_t block_exclusive_sum(uint32_t v, uint32_t& total, Shared& sh, uint32_t& parity) {
  constexpr int kWarps = THREADS / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t inclusive = warp_inclusive_sum(v);
  uint32_t* warp_totals = sh.scan[parity];
  parity ^= 1u;
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  const uint32_t w = lane < kWarps ? warp_totals[lane] : 0u;
  const uint32_t w_inclusive = warp_inclusive_sum(w);
  total = __shfl_sync(kFullMask, w_inclusive, 31);
  return __shfl_sync(kFullMask, w_inclusive - w, warp) + inclusive - v;
}

// ---- select ----

// Of the 8 bins counted in c (bins first + 7 .. first, highest first, `above` entries in bins above them): the one
// holding the rem-th largest entry, if any, as found = (bin, rem - the entries above it, its count).
__device__ __forceinline__ bool find_in_8(const uint32_t (&c)[8], uint32_t above, uint32_t rem, uint32_t first,
                                          uint32_t* found) {
  bool hit = false;
#pragma unroll
  for (int j = 7; j >= 0; --j) {
    if (above < rem && rem <= above + c[j]) {
      hit = true;
      found[0] = first + j;
      found[1] = rem - above;
      found[2] = c[j];
    }
    above += c[j];
  }
  return hit;
}

// Warp 0: the bin B of counts[256] holding the rem-th largest entry, i.e. above(B) < rem <= above(B) + counts[B]
// with above(B) = the entries of bins > B; found = (B, rem - above(B), counts[B]), written by the one lane that
// returns true (lane B / 8). Needs sum(counts) >= rem >= 1.
__device__ __forceinline__ bool find_bin(const uint32_t* counts, uint32_t rem, uint32_t* found) {
  const int lane = threadIdx.x & 31;
  const uint4 lo = reinterpret_cast<const uint4*>(counts)[2 * lane];
  const uint4 hi = reinterpret_cast<const uint4*>(counts)[2 * lane + 1];
  const uint32_t c[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
  uint32_t sum = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) sum += c[j];
  uint32_t suffix = sum;  // entries in the bins of lanes >= this lane
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const uint32_t y = __shfl_down_sync(kFullMask, suffix, d);
    if (lane + d < 32) suffix += y;
  }
  return find_in_8(c, suffix - sum, rem, 8 * lane, found);
}

// A round's complete 256-bin histogram: this CTA's, or in a cluster the sum over its CTAs.
template <int CLUSTER>
__device__ __forceinline__ const uint32_t* round_counts(const uint32_t* hist, bool in_cluster, Shared& sh) {
  if (CLUSTER == 1 || !in_cluster) return hist;
  cluster_sync();  // every CTA's histogram of this round is complete (release/acquire)
  if (threadIdx.x < 256) {
    const uint32_t address = shared_address(&hist[threadIdx.x]);
    uint32_t sum = 0;
#pragma unroll
    for (int c = 0; c < CLUSTER; ++c) sum += cluster_load(address, c);
    sh.total[threadIdx.x] = sum;
  }
  return sh.total;
}

// Warps 1.. clear the next round's buffer while warp 0 finds the bin. In a cluster, other CTAs read it last in
// the previous round, before arriving at this round's cluster barrier, which this CTA has passed (round 1's
// buffer: in no round yet; a CTA selects on the cluster once). (No loop: with one, CUDA 12.9's ptxas spilled
// 12-20 bytes at 64 registers.)
template <int THREADS>
__device__ __forceinline__ void clear_next(uint32_t* next) {
  if constexpr (THREADS >= 512) {
    if (threadIdx.x >= 256 && threadIdx.x < 512) next[threadIdx.x - 256] = 0u;
  } else {  // warps 1.. of 256-511 threads: one entry each, the first 256 - (THREADS - 32) of them a second
    const int i = static_cast<int>(threadIdx.x) - 32;
    next[i] = 0u;
    if (i < 256 - (THREADS - 32)) next[THREADS - 32 + i] = 0u;
  }
}

// The select finds the top k of a set of keys (over the whole cluster when `cluster`) as (pivot, mask, rem): the
// entries whose key & mask is above pivot, and the first rem >= 1 (by index) of those whose key & mask equals it.
// Rounds fix key bits 31-21, 20-13, 12-5 and 7-0 (the last one's 256 bins: only the 32 of the fixed bits 7-5 can
// count). Round 0 (select_round0) reads sh.fine, which must hold the histogram of key >> 21 of the set; each later
// round (select_refine) costs a pass over the keys, a find_bin and 2 barriers (and a cluster barrier in a cluster).
// Rounds stop as soon as the bin of the k-th largest is taken whole (then rem is its count): for N(0, 1) scores,
// 8192 a row and k = 2048, the k-th largest's 11-bit bin holds ~320 entries and its 19-bit one ~2.3, taken whole in
// 55% of rows: 1.45 passes a select on average (simulated, 2000 rows), against 1.92 with 8-bit rounds 0 and 1
// (~2300 and ~11 entries). Otherwise mask is ~0 and pivot is the k-th largest key. Every thread of the block (and
// of the cluster when `cluster`) calls them.

// Round 0: sh.found = (the 11-bit bin B of the k-th largest key, the rank left inside B, B's count).
template <int THREADS, int CLUSTER>
__device__ void select_round0(uint32_t k, bool cluster, Shared& sh) {
  static_assert(THREADS >= 256, "round 0 folds the fine histogram with 256 threads");
  const bool in_cluster = CLUSTER > 1 && cluster;
  // Round 0, 11 bits, no pass over the buffer: find_bin on sh.fine folded to 256 bins gives B = key >> 24, then
  // B's 8 bins of sh.fine give key >> 21. (A find over the 2048 bins would take a block scan and, in a cluster,
  // 2048 remote loads per CTA, not 256 + 8.) Other CTAs read this CTA's sh.fine here: see Shared::fine.
  if (threadIdx.x < 256) {
    const uint4 lo = reinterpret_cast<const uint4*>(sh.fine)[2 * threadIdx.x];
    const uint4 hi = reinterpret_cast<const uint4*>(sh.fine)[2 * threadIdx.x + 1];
    sh.hist[0][threadIdx.x] = lo.x + lo.y + lo.z + lo.w + hi.x + hi.y + hi.z + hi.w;
  }
  const uint32_t* counts = round_counts<CLUSTER>(sh.hist[0], in_cluster, sh);
  __syncthreads();
  if (threadIdx.x < 32) {
    uint32_t coarse[3];  // (B, rank left, count) in registers: one lane writes sh.found, once (no warp barrier)
    const bool hit = find_bin(counts, k, coarse);
    if (!in_cluster) {
      if (hit) {
        const uint4 lo = reinterpret_cast<const uint4*>(sh.fine)[2 * coarse[0]];
        const uint4 hi = reinterpret_cast<const uint4*>(sh.fine)[2 * coarse[0] + 1];
        const uint32_t f[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
        find_in_8(f, 0u, coarse[1], 8 * coarse[0], sh.found);  // a hit: the 8 bins sum to B's count
      }
    } else {
      // The whole warp (one lane loading the 8 x CLUSTER words spilled 8-16 bytes at 64 registers with 8 and 16
      // CTAs, NVRTC 13.5): B and the rank left go to every lane; lane l sums fine bin 8B + l % 8 of CTAs l / 8,
      // l / 8 + 4, ..., then with the other 3 lanes of that bin; lanes 0..7 find the bin as find_bin does.
      const int lane = threadIdx.x;
      uint32_t packed = hit ? coarse[1] << 8 | coarse[0] : 0u;  // rank left <= k < 2^24
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) packed |= __shfl_sync(kFullMask, packed, lane ^ d);
      const uint32_t bin = 8 * (packed & 255u) + (lane & 7), left = packed >> 8;
      const uint32_t address = shared_address(&sh.fine[bin]);
      uint32_t count = 0;
#pragma unroll
      for (int i = 0; i < (CLUSTER + 3) / 4; ++i) {
        const int c = 4 * i + (lane >> 3);
        if (c < CLUSTER) count += cluster_load(address, c);
      }
      count += __shfl_sync(kFullMask, count, lane ^ 8);
      count += __shfl_sync(kFullMask, count, lane ^ 16);
      uint32_t suffix = count;  // entries in bins >= this lane's, within B
#pragma unroll
      for (int d = 1; d < 8; d <<= 1) {
        const uint32_t y = __shfl_down_sync(kFullMask, suffix, d);
        if ((lane & 7) + d < 8) suffix += y;
      }
      if (lane < 8 && suffix - count < left && left <= suffix) {
        sh.found[0] = bin;
        sh.found[1] = left - (suffix - count);
        sh.found[2] = count;
      }
    }
  } else {
    clear_next<THREADS>(sh.hist[1]);
  }
  __syncthreads();
}

// Rounds 1-3 after select_round0, over the keys each_key(f) passes to f(key) (each thread its share; keys outside
// B may be passed too: they match no round's prefix).
template <int THREADS, int CLUSTER, typename EachKey>
__device__ void select_refine(EachKey each_key, bool cluster, Shared& sh, uint32_t& pivot, uint32_t& mask,
                              uint32_t& rem) {
  const bool in_cluster = CLUSTER > 1 && cluster;
  uint32_t prefix = sh.found[0] << 21;
  mask = 0xffe00000u;
  rem = sh.found[1];
  if (rem != sh.found[2]) {  // else every entry of the bin is in: the lower bits cannot matter (uniform)
    // Rounds 1-3: 8 bits each, shifts 13, 5 and 0, over the entries that match the bits fixed so far.
#pragma unroll 1
    for (int round = 1; round < 4; ++round) {
      const int shift = max(0, 21 - 8 * round);
      uint32_t* hist = sh.hist[round & 1];
      each_key([&](uint32_t key) {
        if (((key ^ prefix) & mask) == 0) atomicAdd(&hist[(key >> shift) & 255u], 1u);
      });
      const uint32_t* counts = round_counts<CLUSTER>(hist, in_cluster, sh);
      __syncthreads();
      if (threadIdx.x < 32) {
        find_bin(counts, rem, sh.found);
      } else {
        clear_next<THREADS>(sh.hist[(round + 1) & 1]);
      }
      __syncthreads();
      prefix |= sh.found[0] << shift;
      mask |= 0xffu << shift;
      rem = sh.found[1];
      if (rem == sh.found[2]) break;  // the bin taken whole, as above
    }
  }
  pivot = prefix;
}

// The top k of the n keys in shared memory (sh.fine: their histogram).
template <int THREADS, int CLUSTER>
__device__ __forceinline__ void select_pivot(const uint32_t* keys, int n, uint32_t k, bool cluster, Shared& sh,
                                             uint32_t& pivot, uint32_t& mask, uint32_t& rem) {
  select_round0<THREADS, CLUSTER>(k, cluster, sh);
  select_refine<THREADS, CLUSTER>([&](auto f) {
    for (int i = threadIdx.x; i < n; i += THREADS) f(keys[i]);
  }, cluster, sh, pivot, mask, rem);
}

// ---- emission: a stable compaction of the selected entries, in index order ----

// Each thread owns a contiguous run of the buffer; an odd run length puts a warp's 32 reads in 32 banks.
__device__ __forceinline__ void thread_run(int n, int threads, int& begin, int& end) {
  const int length = ((n + threads - 1) / threads) | 1;
  begin = min(n, static_cast<int>(threadIdx.x) * length);
  end = min(n, begin + length);
}

// Entries above / equal to the pivot (key & mask against pivot) before this thread's run (packed: above |
// equal << 16, as is `total`, the block's counts); n < 65536.
template <int THREADS>
__device__ __forceinline__ uint32_t count_split(const uint32_t* keys, int n, uint32_t pivot, uint32_t mask,
                                                uint32_t& total, Shared& sh, uint32_t& parity) {
  int begin, end;
  thread_run(n, THREADS, begin, end);
  uint32_t above = 0, equal = 0;
  for (int i = begin; i < end; ++i) {
    const uint32_t key = keys[i] & mask;
    above += key > pivot;
    equal += key == pivot;
  }
  return block_exclusive_sum<THREADS>(above | equal << 16, total, sh, parity);
}

// sink(slot, i) for every selected entry i: above the pivot, or equal to it and among the first `take` equal
// ones; slots count from `first` in index order. `before` is count_split's result for this thread.
template <int THREADS, typename Sink>
__device__ __forceinline__ void write_selected(const uint32_t* keys, int n, uint32_t pivot, uint32_t mask,
                                               uint32_t before, int first, int take, Sink sink) {
  int begin, end;
  thread_run(n, THREADS, begin, end);
  int above = before & 0xffffu, equal = before >> 16;
  for (int i = begin; i < end; ++i) {
    const uint32_t key = keys[i] & mask;
    if (key > pivot) {
      sink(first + above + min(equal, take), i);
      ++above;
    } else if (key == pivot) {
      if (equal < take) sink(first + above + equal, i);
      ++equal;
    }
  }
}

// Shrink this CTA's buffer to its own top k (exactly k entries, index order kept) through the staging buffer;
// later elements must then be above the returned min_key. Only __syncthreads: the cluster is not involved.
template <int THREADS, int CLUSTER>
__device__ void keep_top_k(uint32_t* keys, int* idx, int& n, int k, uint32_t* stage_keys, int* stage_idx,
                           Shared& sh, uint32_t& parity, uint32_t& min_key) {
  __syncthreads();  // the last group's entries are in the buffer
  uint32_t pivot, mask, rem, total;
  select_pivot<THREADS, CLUSTER>(keys, n, k, false, sh, pivot, mask, rem);
  const uint32_t before = count_split<THREADS>(keys, n, pivot, mask, total, sh, parity);
  write_selected<THREADS>(keys, n, pivot, mask, before, 0, static_cast<int>(rem), [&](int slot, int i) {
    stage_keys[slot] = keys[i];
    stage_idx[slot] = idx[i];
  });
  for (int i = threadIdx.x; i < 2048; i += THREADS) sh.fine[i] = 0u;  // select_pivot read it before a barrier
  __syncthreads();
  for (int i = threadIdx.x; i < k; i += THREADS) {
    const uint32_t key = stage_keys[i];
    keys[i] = key;
    idx[i] = stage_idx[i];
    atomicAdd(&sh.fine[key >> 21], 1u);
  }
  __syncthreads();
  n = k;
  // Every kept key is >= pivot, so a later key <= pivot loses to all k of them. (pivot <= kNanKey: no overflow; and
  // min_key > 0 from now on.)
  min_key = pivot + 1;
}

// ---- a sampled cutoff ----

constexpr int kSample = 2048;  // keys a CTA samples from its chunk (2-8 a thread)

// A key that about `target` of the chunk [lo, hi) reach: the rank-R key of kSample keys sampled at even steps,
// R = ceil(target x kSample / (hi - lo)), found by the select's rounds on the sample. The stream then appends only
// keys >= it from the start, so a long chunk costs neither a full buffer's select nor the appends of its early
// groups (128 x 131072, k 2048: ~2 shrinks a row without it). The cutoff may let fewer than k through (an unlucky
// sample, or data periodic in the fixed sampling step): topk_row then reads the chunk again with none. Needs
// hi - lo >= kSample (a step of at least 1: every position in [lo, hi)) and sh.fine zero; leaves sh.fine zero.
template <int THREADS>
__device__ uint32_t sample_cutoff(const float* base, int64_t stride, int lo, int hi, int target, Shared& sh) {
  constexpr int kPer = kSample / THREADS;
  const int len = hi - lo, step = len / kSample;
  uint32_t key[kPer];
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int i = lo + (u * THREADS + static_cast<int>(threadIdx.x)) * step + step / 2;
    key[u] = float_key(__ldg(base + i * stride));
    atomicAdd(&sh.fine[key[u] >> 21], 1u);
  }
  __syncthreads();
  const int64_t wanted = (static_cast<int64_t>(target) * kSample + len - 1) / len;
  const uint32_t rank = static_cast<uint32_t>(min(max(wanted, int64_t{1}), int64_t{kSample}));
  uint32_t pivot, mask, rem;
  select_round0<THREADS, 1>(rank, false, sh);
  select_refine<THREADS, 1>([&](auto f) {
#pragma unroll
    for (int u = 0; u < kPer; ++u) f(key[u]);
  }, false, sh, pivot, mask, rem);
  // select_round0 read sh.fine before its last barrier, select_refine does not read it
  for (int i = threadIdx.x; i < 2048; i += THREADS) sh.fine[i] = 0u;
  return pivot;  // the rank-R key, or the lowest key of its bin when the select took that bin whole
}

// ---- loading ----

// The 4 elements of slot s (elements i0 = 4s - a .. i0 + 3) that lie in [lo, hi), as values: from the ring when the
// slot is whole and the row contiguous (it was copied there, 16-byte aligned), else element by element from global
// memory (0 outside). Returns the valid-lane bits.
__device__ __forceinline__ uint32_t slot_values(const float* base, int64_t stride, bool whole, const float4* copied,
                                                int i0, int lo, int hi, float* x) {
  if (whole) {
    const float4 v = *copied;
    x[0] = v.x;
    x[1] = v.y;
    x[2] = v.z;
    x[3] = v.w;
    return 0xfu;
  }
  uint32_t valid = 0;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int i = i0 + e;
    x[e] = 0.0f;
    if (i >= lo && i < hi) {
      x[e] = __ldg(base + i * stride);
      valid |= 1u << e;
    }
  }
  return valid;
}

constexpr uint32_t kInfKey = 0xff800000u;  // float_key(+inf)

// The smallest value whose key is >= min_key, for 0 < min_key <= kInfKey: then key(x) >= min_key <=> !(x < it)
// (one compare, not a key: NaN passes, as its key is above min_key; -0 >= +0 as their keys are equal).
__device__ __forceinline__ float key_floor(uint32_t min_key) {
  if (min_key <= 0x007fffffu) return -__int_as_float(0x7f800000);  // at most key(-inf): every value
  return __uint_as_float((min_key & 0x80000000u) ? (min_key & 0x7fffffffu) : ~min_key);
}

// v[e] for a run-time e without local memory (a dynamic index into a register array spills it).
__device__ __forceinline__ float pick8(const float (&v)[8], int e) {
  const float a = e & 1 ? v[1] : v[0], b = e & 1 ? v[3] : v[2], c = e & 1 ? v[5] : v[4], d = e & 1 ? v[7] : v[6];
  const float ab = e & 2 ? b : a, cd = e & 2 ? d : c;
  return e & 4 ? cd : ab;
}

// ---- one row ----

// Dynamic shared memory, in this order: the copy ring (stages x 2 x THREADS float4), keys[cap], then, when a
// chunk can exceed cap (stage = k), idx[cap] and the staging keys[stage] and idx[stage]; when stage == 0 columns
// are implicit (nothing after keys). The host guarantees: cap >= k + 8 * THREADS when stage > 0 (a group fits
// after a shrink), cap >= every chunk when stage == 0, cap < 65536 (packed counts), 1 <= stages <= 3,
// len <= 2^31 - 8, and 0 <= sample <= 2^26 (so 4 * sample fits; any value is exact, it only tunes). The ring
// (>= 16 KB) also stages the output (<= k <= 4096 entries).
template <int THREADS, int CLUSTER>
__device__ void topk_row(const float* base, int64_t stride, int len, int* out, int k, int cap, int stage,
                         int stages, int sample) {
  __shared__ Shared sh;
  extern __shared__ uint4 topk_dynamic_smem[];
  const int rank = CLUSTER > 1 ? static_cast<int>(blockIdx.x % CLUSTER) : 0;

  if (len <= k) {  // every index, then -1; each CTA of the cluster writes its share of the k slots
    const int per_cta = (k + CLUSTER - 1) / CLUSTER;
    const int end = min(k, (rank + 1) * per_cta);
    for (int j = rank * per_cta + threadIdx.x; j < end; j += THREADS) out[j] = j < len ? j : -1;
    return;
  }

  float4* ring = reinterpret_cast<float4*>(topk_dynamic_smem);
  uint32_t* keys = reinterpret_cast<uint32_t*>(ring + stages * 2 * THREADS);
  int* idx = reinterpret_cast<int*>(keys + cap);
  uint32_t* stage_keys = reinterpret_cast<uint32_t*>(idx + cap);
  int* stage_idx = reinterpret_cast<int*>(stage_keys + stage);

  // Slot s holds elements 4s - a .. 4s - a + 3, where a (the row start's offset in 16-byte units) aligns every
  // whole slot; CTA `rank` streams slots [s_lo, s_hi), i.e. elements [lo, hi), in groups of 2 x THREADS slots:
  // thread t takes slots t and THREADS + t of a group. Group j's whole slots are copied to ring stage j % stages
  // (`read_stage`, `write_stage`) `stages - 1` groups ahead; each thread reads back only its own copies.
  const bool contiguous = stride == 1;
  const int a = contiguous ? static_cast<int>((reinterpret_cast<uint64_t>(base) >> 2) & 3u) : 0;
  const int slots = (len + a + 3) >> 2;
  const int per_cta = (slots + CLUSTER - 1) / CLUSTER;
  const int s_lo = min(slots, rank * per_cta), s_hi = min(slots, s_lo + per_cta);
  const int lo = max(0, 4 * s_lo - a), hi = min(len, 4 * s_hi - a);
  const int groups = (s_hi - s_lo + 2 * THREADS - 1) / (2 * THREADS);
  const int ahead = min(stages - 1, groups);  // batches in flight beyond the one being read
  // Whole slots: [w_lo, w_hi) (only the first and the last slot can be cut by the row's ends). Ring stages are
  // counted with wrap-around, not j % stages (an integer division per use, ~20 instructions).
  const int w_lo = s_lo + (4 * s_lo - a < lo), w_hi = s_hi - (4 * s_hi - a > hi);
  auto whole = [&](int s) { return contiguous && s >= w_lo && s < w_hi; };
  auto next_stage = [&](int st) { return st + 1 == stages ? 0 : st + 1; };
  auto copy_group = [&](int j, int st) {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int s = s_lo + (2 * j + u) * THREADS + static_cast<int>(threadIdx.x);
      if (whole(s)) async_copy16(&ring[(st * 2 + u) * THREADS + threadIdx.x], base + (4 * s - a));
    }
    async_commit();
  };
  for (int j = 0; j < ahead; ++j) copy_group(j, j);  // ahead < stages
  int read_stage = 0, write_stage = ahead;  // group j is read from, and written to, stage j % stages

  for (int i = threadIdx.x; i < 2048; i += THREADS) sh.fine[i] = 0u;
  __syncthreads();
  // A chunk long against `sample` (the survivors the host wants; 0: none) is filtered from its first group on by a
  // sampled cutoff (the ring's first copies are in flight meanwhile). Only with idx (stage > 0): filtered entries
  // need their columns. cutoff != 0 marks a sampled start: a cutoff is at least 0x00600000 (key(-inf)'s bin).
  uint32_t cutoff = 0;
  if (sample > 0 && stage > 0 && hi - lo >= max(4 * sample, 4 * kSample)) {
    cutoff = sample_cutoff<THREADS>(base, stride, lo, hi, sample, sh);
    __syncthreads();
  }
  uint32_t parity = 0, min_key = cutoff;
  int n = 0;
#pragma unroll 1
  for (int j = 0; j < groups; ++j) {
    if (j + ahead < groups) {
      copy_group(j + ahead, write_stage);
      write_stage = next_stage(write_stage);
    } else {
      async_commit();  // empty: the count of batches after group j stays `ahead`
    }
    async_wait(ahead);
    const int first_slot = s_lo + 2 * j * THREADS;
    float x[8];
    uint32_t valid = 0;
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int s = first_slot + u * THREADS + static_cast<int>(threadIdx.x);
      x[4 * u] = x[4 * u + 1] = x[4 * u + 2] = x[4 * u + 3] = 0.0f;
      if (s < s_hi) {
        valid |= slot_values(base, stride, whole(s), &ring[(read_stage * 2 + u) * THREADS + threadIdx.x],
                             4 * s - a, lo, hi, x + 4 * u) << (4 * u);
      }
    }
    read_stage = next_stage(read_stage);
    if (min_key == 0) {
      // Nothing filtered yet: slot s fills entries 4 (s - s_lo) .. + 3 with two 16-byte stores, no scan. Lanes
      // outside [lo, hi) (a partial first or last slot) become key-0 fillers, below every real key (>= key(-inf)
      // = 0x007fffff): they are never selected while the row has more than k real elements. The slots that do
      // not fit (from fit_end on) wait for the first shrink, so its pivot comes from a full buffer.
      const int end_slot = min(s_hi, first_slot + 2 * THREADS), fit_end = s_lo + cap / 4;
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int s = first_slot + u * THREADS + static_cast<int>(threadIdx.x);
        if (s < s_hi && s < fit_end) {
          const int p = 4 * (s - s_lo), i0 = 4 * s - a;
          const uint32_t v = valid >> (4 * u);
          uint32_t q[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) q[e] = v >> e & 1u ? float_key(x[4 * u + e]) : 0u;
          *reinterpret_cast<uint4*>(keys + p) = make_uint4(q[0], q[1], q[2], q[3]);
          if (stage > 0) *reinterpret_cast<int4*>(idx + p) = make_int4(i0, i0 + 1, i0 + 2, i0 + 3);
#pragma unroll
          for (int e = 0; e < 4; ++e) atomicAdd(&sh.fine[q[e] >> 21], 1u);
          valid &= ~(0xfu << (4 * u));  // stored: not for the filtering below
        }
      }
      if (end_slot <= fit_end) {
        n = 4 * (end_slot - s_lo);
        continue;
      }
      n = cap;  // = 4 * (fit_end - s_lo): cap is a multiple of 4
      keep_top_k<THREADS, CLUSTER>(keys, idx, n, k, stage_keys, stage_idx, sh, parity, min_key);
    }
    // Filtering: the passing elements of the group go after the buffer's n entries, in index order. The test is
    // one float compare, keys are made for appended elements only, and the append loops over the passing bits:
    // with a key per element and an append unrolled over all 8 (entered by 65% of warps at ~3% passing), ncu counted
    // ~370 warp instructions a group at 128 x 131072, ~100 of them for those two; 47.5 -> 42.2 us (H200, both with
    // the 2 k sampled cutoff).
    uint32_t pass, before, total;
#pragma unroll 1
    for (;;) {
      pass = 0;
      if (min_key <= kInfKey) {  // uniform
        const float floor_value = key_floor(min_key);
#pragma unroll
        for (int e = 0; e < 8; ++e) pass |= static_cast<uint32_t>(!(x[e] < floor_value)) << e;
      } else {  // the k-th kept key is +inf or NaN: only NaN, or nothing, may pass
#pragma unroll
        for (int e = 0; e < 8; ++e) pass |= static_cast<uint32_t>(float_key(x[e]) >= min_key) << e;
      }
      pass &= valid;
      before = block_exclusive_sum<THREADS>(__popc(pass & 0xfu) | __popc(pass >> 4) << 16, total, sh, parity);
      if (n + static_cast<int>((total & 0xffffu) + (total >> 16)) <= cap) break;
      keep_top_k<THREADS, CLUSTER>(keys, idx, n, k, stage_keys, stage_idx, sh, parity, min_key);
    }
    int slot_lo = n + static_cast<int>(before & 0xffffu);
    int slot_hi = n + static_cast<int>((total & 0xffffu) + (before >> 16));
#pragma unroll 1
    for (uint32_t left = pass; left != 0u; left &= left - 1u) {  // a thread passes ~0.2 of its 8 at 3%
      const int e = __ffs(left) - 1;
      const uint32_t key = float_key(pick8(x, e));
      const int p = e < 4 ? slot_lo++ : slot_hi++;
      keys[p] = key;
      idx[p] = 4 * (first_slot + (e >> 2) * THREADS + static_cast<int>(threadIdx.x)) - a + (e & 3);
      atomicAdd(&sh.fine[key >> 21], 1u);
    }
    n += static_cast<int>((total & 0xffffu) + (total >> 16));
    if (j + 1 == groups && cutoff != 0 && n < k) {
      // The sampled cutoff let fewer than k through (no shrink happened: n < k < cap): read the chunk again
      // without it. Uniform over the CTA (n, cutoff are); each thread rewrites only its own ring entries.
      cutoff = min_key = 0u;
      n = 0;
      j = -1;
      __syncthreads();  // the buffer's entries and sh.fine are rewritten from scratch
      for (int i = threadIdx.x; i < 2048; i += THREADS) sh.fine[i] = 0u;
      for (int g = 0; g < ahead; ++g) copy_group(g, g);
      read_stage = 0;
      write_stage = ahead;
      __syncthreads();
    }
  }
  __syncthreads();

  uint32_t pivot, mask, rem, total;
  select_pivot<THREADS, CLUSTER>(keys, n, k, true, sh, pivot, mask, rem);
  const uint32_t before = count_split<THREADS>(keys, n, pivot, mask, total, sh, parity);
  int first = 0, take = static_cast<int>(rem);
  if constexpr (CLUSTER > 1) {
    // Output slots and pivot-equal ranks continue from the lower-ranked CTAs, whose chunks come first.
    if (threadIdx.x == 0) {
      sh.counts[0] = total & 0xffffu;
      sh.counts[1] = total >> 16;
    }
    cluster_sync();
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x;
      uint32_t above = 0, equal = 0;
      if (lane < CLUSTER) {
        above = cluster_load(shared_address(&sh.counts[0]), lane);
        equal = cluster_load(shared_address(&sh.counts[1]), lane);
      }
      const uint32_t equal_before = warp_inclusive_sum(equal) - equal;
      const int may_take = max(0, static_cast<int>(rem) - static_cast<int>(equal_before));
      const uint32_t taken = above + min(static_cast<uint32_t>(may_take), equal);
      const uint32_t taken_before = warp_inclusive_sum(taken) - taken;
      if (lane == rank) {
        sh.emit[0] = static_cast<int>(taken_before);
        sh.emit[1] = may_take;
      }
    }
    __syncthreads();
    first = sh.emit[0];
    take = sh.emit[1];
  }
  // This CTA's output run out[first .. first + count), staged in the ring (every copy has landed and been read).
  const int count = static_cast<int>(total & 0xffffu) + min(max(take, 0), static_cast<int>(total >> 16));
  int* staged = reinterpret_cast<int*>(ring);
  const int column0 = 4 * s_lo - a;  // the column of buffer entry 0 while columns are implicit
  write_selected<THREADS>(keys, n, pivot, mask, before, first, take, [&](int slot, int i) {
    staged[slot - first] = stage > 0 ? idx[i] : column0 + i;
  });
  __syncthreads();
  for (int j = threadIdx.x; j < count; j += THREADS) out[first + j] = staged[j];
  if constexpr (CLUSTER > 1) cluster_sync();  // the others read this CTA's shared memory until here
}

}  // namespace topk
}  // namespace cupy_ops
