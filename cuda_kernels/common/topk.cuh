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
// This file holds what both row kernels use: the key, the shared state, block scans, the radix select and the
// emission helpers. The row kernels: topk_row (topk_row.cuh: one read, a buffer of candidates),
// topk_row_two_pass (topk_two_pass.cuh: one sampled read or two reads, bitmaps) and topk_row_registers
// (topk_registers.cuh: one read into registers).
#pragma once
#include "cluster.cuh"
#include "types.cuh"

namespace cupy_ops {
namespace topk {

// CTAs per SM the register budget must allow: 64 registers a thread (a 256-thread CTA in a cluster, one per SM,
// may take 128: at 64 it spilled 4-8 bytes). But fewer where the host plans more 256-thread CTAs an SM
// (CTA_SHAPES, TWO_PASS_CTAS): five (48 registers) of topk_row compiled for whole chunks only (WHOLE: 40 registers,
// its streaming path left out), six (40, no spill with NVRTC 12.9 and 13.0) of the two-pass kernel (whose 16-bit
// list columns leave six lists room in the SM: topk_two_pass.cuh, ListColumn).
constexpr int kWholeCtas256 = 5;
constexpr int kTwoPassCtas256 = 6;
template <int THREADS, int CLUSTER, bool WHOLE = false>
constexpr int min_blocks() {
  return THREADS == 256 && CLUSTER > 1 ? 2 : THREADS == 256 && WHOLE ? kWholeCtas256 : 1024 / THREADS;
}
template <int THREADS>
constexpr int two_pass_min_blocks() { return THREADS == 256 ? kTwoPassCtas256 : 1024 / THREADS; }

// float_key(NaN): one above key(+inf) = 0xff800000, so NaN ranks above +inf and every NaN ties with every other.
constexpr uint32_t kNanKey = 0xff800001u;
constexpr uint32_t kFullMask = 0xffffffffu;

// Larger value <=> larger key. Keys of real values lie in [key(-inf) = 0x007fffff, kNanKey]; -0 maps to +0's key.
// x + 0 turns -0 into +0 (and nothing else changes: no flush-to-zero); then a negative value's bits are all
// flipped, a positive one's sign bit set (5 instructions with the NaN select, against 7 with a zero test).
__device__ __forceinline__ uint32_t float_key(float x) {
  const uint32_t u = __float_as_uint(x + 0.0f);
  const uint32_t key = u ^ (static_cast<uint32_t>(static_cast<int>(u) >> 31) | 0x80000000u);
  return x != x ? kNanKey : key;
}

// Slot u of a thread's register array x: the four elements of v at x[4u .. 4u + 3].
template <int N>
__device__ __forceinline__ void put_slot(float (&x)[N], int u, const float4& v) {
  x[4 * u] = v.x;
  x[4 * u + 1] = v.y;
  x[4 * u + 2] = v.z;
  x[4 * u + 3] = v.w;
}

// Shared state besides the dynamic buffers (about 11.6 KB).
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
  uint32_t lower[2];      // a cluster select: the lower-ranked CTAs' entries above / equal to the pivot
  uint32_t found[3];      // select: the round's bin, the rank left inside it, its count
  uint32_t appended;      // topk_row_two_pass: entries listed (by the sampled read, or of the k-th largest's bin)
  uint32_t warp_count[32];  // topk_row's one-pass emission: each warp's taken entries
};

// Zeroes sh.fine, each thread its share (the caller places the barriers).
template <int THREADS>
__device__ __forceinline__ void clear_fine(Shared& sh) {
  for (int i = threadIdx.x; i < 2048; i += THREADS) sh.fine[i] = 0u;
}

// ---- warp and block scans (shuffles; no CUB) ----

__device__ __forceinline__ uint32_t warp_inclusive_sum(uint32_t v) {
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) v = add_from_lane_below(v, d);
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

// This CTA's rank in its cluster (the plans launch clusters of CLUSTER consecutive CTAs along x).
template <int CLUSTER>
__device__ __forceinline__ uint32_t cluster_rank() { return CLUSTER > 1 ? blockIdx.x % CLUSTER : 0u; }

// A round's complete 256-bin histogram: this CTA's, or in a cluster the sum over its CTAs; then thread i < 256
// also gets `lower`, bin i summed over the lower-ranked CTAs only (take_lower adds it up).
template <int CLUSTER>
__device__ __forceinline__ const uint32_t* round_counts(const uint32_t* hist, bool in_cluster, Shared& sh,
                                                       uint32_t& lower) {
  lower = 0u;
  if (CLUSTER == 1 || !in_cluster) return hist;
  cluster_sync();  // every CTA's histogram of this round is complete (release/acquire)
  if (threadIdx.x < 256) {
    const uint32_t address = shared_address(&hist[threadIdx.x]);
    const uint32_t rank = cluster_rank<CLUSTER>();
    uint32_t sum = 0;
#pragma unroll
    for (int c = 0; c < CLUSTER; ++c) {
      const uint32_t value = cluster_load(address, c);
      sum += value;
      lower += c < rank ? value : 0u;
    }
    sh.total[threadIdx.x] = sum;
  }
  return sh.total;
}

// After a cluster round found bin `bin` of its 256 (sh.found, past the round's last barrier): threads < 256 add
// the lower-ranked CTAs' entries of the bins above it (round_counts' `lower`) to sh.lower[0], and the thread of
// `bin` sets sh.lower[1] to theirs in it (a later round overwrites it). So the emission knows where this CTA's
// outputs start without a cluster exchange of its own (cluster_emission). The next barrier publishes both. Round 0
// passes its coarse bin (the 8 fine bins of B are the warp's: `equal` false).
__device__ __forceinline__ void take_lower(uint32_t lower, uint32_t bin, bool equal, Shared& sh) {
  if (threadIdx.x < 256) {
    uint32_t above = threadIdx.x > bin ? lower : 0u;
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) above += __shfl_xor_sync(kFullMask, above, d);
    if ((threadIdx.x & 31) == 0 && above != 0u) atomicAdd(&sh.lower[0], above);
    if (equal && threadIdx.x == bin) sh.lower[1] = lower;
  }
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
  if (in_cluster && threadIdx.x == 0) sh.lower[0] = 0u;  // before any round's take_lower (after barriers)
  uint32_t lower;
  const uint32_t* counts = round_counts<CLUSTER>(sh.hist[0], in_cluster, sh, lower);
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
      // l / 8 + 4, ..., then with the other 3 lanes of that bin; lanes 0..7 find the bin as find_bin does. The
      // same sums over the lower-ranked CTAs only (`low`) give the hit lane their entries in B's bins above the
      // one found (added to sh.lower[0]) and in it (sh.lower[1]), as take_lower does for the coarse bins.
      const int lane = threadIdx.x;
      uint32_t packed = hit ? coarse[1] << 8 | coarse[0] : 0u;  // rank left <= k < 2^24
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) packed |= __shfl_sync(kFullMask, packed, lane ^ d);
      const uint32_t bin = 8 * (packed & 255u) + (lane & 7), left = packed >> 8;
      const uint32_t address = shared_address(&sh.fine[bin]);
      const int rank = static_cast<int>(cluster_rank<CLUSTER>());
      uint32_t count = 0, low = 0;
#pragma unroll
      for (int i = 0; i < (CLUSTER + 3) / 4; ++i) {
        const int c = 4 * i + (lane >> 3);
        if (c < CLUSTER) {
          const uint32_t value = cluster_load(address, c);
          count += value;
          low += c < rank ? value : 0u;
        }
      }
      count += __shfl_sync(kFullMask, count, lane ^ 8);
      count += __shfl_sync(kFullMask, count, lane ^ 16);
      low += __shfl_sync(kFullMask, low, lane ^ 8);
      low += __shfl_sync(kFullMask, low, lane ^ 16);
      uint32_t suffix = count, low_suffix = low;  // entries in bins >= this lane's, within B
#pragma unroll
      for (int d = 1; d < 8; d <<= 1) {
        const uint32_t y = __shfl_down_sync(kFullMask, suffix, d);
        const uint32_t z = __shfl_down_sync(kFullMask, low_suffix, d);
        if ((lane & 7) + d < 8) {
          suffix += y;
          low_suffix += z;
        }
      }
      if (lane < 8 && suffix - count < left && left <= suffix) {
        sh.found[0] = bin;
        sh.found[1] = left - (suffix - count);
        sh.found[2] = count;
        if (low_suffix != low) atomicAdd(&sh.lower[0], low_suffix - low);
        sh.lower[1] = low;
      }
    }
  } else {
    clear_next<THREADS>(sh.hist[1]);
  }
  __syncthreads();
  if (in_cluster) take_lower(lower, sh.found[0] >> 3, false, sh);
}

// A refine round's pass: counts the keys matching the bits fixed so far in the round's 256 bins. One key at a
// time, or four (`quad`: one branch for the four, as ~3% of keys match in round 1; topk_row_registers). H200,
// 2026-12-03, with its other one-branch-a-slot changes (bench/tune.py, A/B in one run): persistent 64 x 20000
// 10.1 -> 9.8 us, 1 x 163840 11.2 -> 10.8, 4 x 163840 11.7 -> 11.3 (decode 4 x 163840 12.0 -> 11.45), but
// persistent 8 x 4096 4.6 -> 4.8. Keys in shared memory go four at a time too (count_keys: select_pivot, for
// topk_row and the two-pass list below 1024 threads); the others (the two reads' refine, the 1024-thread list, the
// sample cutoff) one at a time. (The same for topk_row's buffer passes, 16-byte loads and a predicated emission store
// made the 4096 x 8192 prefill slower, 91.8 -> 94.2 us: not kept.)
struct RoundCount {
  uint32_t prefix, mask;
  int shift;
  uint32_t* hist;

  // Zero where the key has the bits fixed so far.
  __device__ __forceinline__ uint32_t difference(uint32_t key) const { return (key ^ prefix) & mask; }
  __device__ __forceinline__ void add(uint32_t key) const { atomicAdd(&hist[(key >> shift) & 255u], 1u); }
  __device__ __forceinline__ void operator()(uint32_t key) const {
    if (difference(key) == 0u) add(key);
  }
  __device__ __forceinline__ void quad(const uint4& q) const {
    const uint32_t x = difference(q.x), y = difference(q.y), z = difference(q.z), w = difference(q.w);
    if (min(min(x, y), min(z, w)) == 0u) {
      if (x == 0u) add(q.x);
      if (y == 0u) add(q.y);
      if (z == 0u) add(q.z);
      if (w == 0u) add(q.w);
    }
  }
};

// Rounds 1 to LAST_ROUND (3: the exact key) after select_round0, over the keys each_key(f) passes to f(key) (each
// thread its share; keys outside B may be passed too: they match no round's prefix). Stopped earlier, the pivot is
// the lowest key of the last round's bin.
template <int THREADS, int CLUSTER, int LAST_ROUND = 3, typename EachKey>
__device__ void select_refine(EachKey each_key, bool cluster, Shared& sh, uint32_t& pivot, uint32_t& mask,
                              uint32_t& rem) {
  static_assert(LAST_ROUND >= 1 && LAST_ROUND <= 3, "refine rounds 1 to 3 fix key bits 20-0");
  const bool in_cluster = CLUSTER > 1 && cluster;
  uint32_t prefix = sh.found[0] << 21;
  mask = 0xffe00000u;
  rem = sh.found[1];
  if (rem != sh.found[2]) {  // else every entry of the bin is in: the lower bits cannot matter (uniform)
    // Rounds 1-3: 8 bits each, shifts 13, 5 and 0, over the entries that match the bits fixed so far. Unrolled, so
    // each round's shift and mask are constants: with the rounds in a loop NVRTC 12.9 and 13.0 spilled 28-32 bytes in
    // the two-pass kernels and the register kernels took 61-80 registers (now 56-64, no spills). H100, A/B in one
    // run (session 34, both with kTwoPassPrefetch and kSampleRounds 1): prefill 8192 x 32768 370.0 -> 340.4 us,
    // 4096 x 8192 67.3 -> 64.8, persistent 64 x 20000 9.7 -> 9.3, 8 x 4096 5.0 -> 4.6; slower only decode
    // 16 x 32768 k 1024, 11.2 -> 11.4, and 32 x 163840, 29.4 -> 29.7.
#pragma unroll
    for (int round = 1; round <= LAST_ROUND; ++round) {
      const int shift = max(0, 21 - 8 * round);
      uint32_t* hist = sh.hist[round & 1];
      each_key(RoundCount{prefix, mask, shift, hist});
      uint32_t lower;
      const uint32_t* counts = round_counts<CLUSTER>(hist, in_cluster, sh, lower);
      __syncthreads();
      if (threadIdx.x < 32) {
        find_bin(counts, rem, sh.found);
      } else {
        clear_next<THREADS>(sh.hist[(round + 1) & 1]);
      }
      __syncthreads();
      if (in_cluster) take_lower(lower, sh.found[0], true, sh);
      prefix |= sh.found[0] << shift;
      mask |= 0xffu << shift;
      rem = sh.found[1];
      if (rem == sh.found[2]) break;  // the bin taken whole, as above
    }
  }
  pivot = prefix;
}

// A refine round's pass over the n keys in shared memory (16-byte aligned): four at a time (one 16-byte load a lane,
// 512 contiguous bytes a warp: no bank conflict; one branch for the four, RoundCount::quad), the last n % 4 one at a
// time. H200: prefill 4096 x 8192 65.0 -> 64.3 us, 64 x 65536 k 512 17.7 -> 17.2, 256 x 16384 15.4 -> 15.0; 32 x
// 163840 0.3-0.6 us slower (28.7 -> 29.2).
template <int THREADS, typename F>
__device__ __forceinline__ void count_keys(const uint32_t* keys, int n, const F& f) {
  const int quads = n >> 2;
  for (int q = threadIdx.x; q < quads; q += THREADS) f.quad(reinterpret_cast<const uint4*>(keys)[q]);
  for (int i = 4 * quads + static_cast<int>(threadIdx.x); i < n; i += THREADS) f(keys[i]);
}

// The top k of the n keys in shared memory (sh.fine: their histogram; keys 16-byte aligned), count_keys' passes.
template <int THREADS, int CLUSTER>
__device__ __forceinline__ void select_pivot(const uint32_t* keys, int n, uint32_t k, bool cluster, Shared& sh,
                                             uint32_t& pivot, uint32_t& mask, uint32_t& rem) {
  select_round0<THREADS, CLUSTER>(k, cluster, sh);
  select_refine<THREADS, CLUSTER>([&](auto f) { count_keys<THREADS>(keys, n, f); }, cluster, sh, pivot, mask, rem);
}

// ---- a CTA's chunk of a row ----

// CTA `rank` of CLUSTER's share of a row of len elements at base[i x stride]: slot s (16 bytes) holds elements
// 4s - a .. 4s - a + 3, a = the row start's offset in 4-byte units when the row is contiguous (every whole slot is
// then aligned) and 0 otherwise; the row's slots are split evenly, and the CTA takes slots [s_lo, s_hi), elements
// [lo, hi).
struct CtaChunk {
  int a, s_lo, s_hi, lo, hi;
};

template <int CLUSTER>
__device__ __forceinline__ CtaChunk cta_chunk(const float* base, bool contiguous, int len, int rank) {
  const int a = contiguous ? static_cast<int>((reinterpret_cast<uint64_t>(base) >> 2) & 3u) : 0;
  const int slots = (len + a + 3) >> 2;
  const int per_cta = (slots + CLUSTER - 1) / CLUSTER;
  const int s_lo = min(slots, rank * per_cta), s_hi = min(slots, s_lo + per_cta);
  return {a, s_lo, s_hi, max(0, 4 * s_lo - a), min(len, 4 * s_hi - a)};
}

// ---- a sampled cutoff ----

// Refine rounds of the sampled cutoff's select: 1 stops at the lowest key of the rank-R sample's 19-bit bin, a
// cutoff a relative ~2^-10 below the rank-R key (any cutoff is exact; a lower one lists a few more keys). H100,
// session 34, before the unrolled rounds: 3 measured the same within 0.2 us on five cases, 1.1 us faster at prefill
// 8192 x 32768 and 1.2 at persistent 32 x 163840; with them (session 35, A/B in one run) 3 was equal or slower:
// 8192 x 32768 340.4 -> 341.2, 0.1-0.2 us at 128 x 131072, 256 x 32768, 32 x 163840 and 2048 x 16384.
constexpr int kSampleRounds = 1;
constexpr int kSample = 2048;  // keys a CTA samples from its chunk (2-8 a thread)
constexpr int kSampleRun = 64;  // in runs of consecutive scores: a warp's 32 loads share 128 bytes

// Loads the sample of the chunk [lo, hi): kSample / kSampleRun runs of kSampleRun consecutive scores, one in the
// middle of each of the chunk's kSample / kSampleRun equal parts (not at its start: the first scores of a decode
// row, an attention sink, can be the row's largest). Runs, not single scores at even steps: those took a 32-byte
// sector of DRAM each (64 KB a CTA, 8 MB at 128 rows), and waiting on them was 13% of the stall samples (ncu,
// persistent 128 x 131072 k 2048). Issued before the chunk's copies, so the sample's loads are not queued behind
// them. Scores that cluster by position make the runs' samples less independent than kSample single ones (a
// cutoff that misleads costs a second read, never a wrong result). Needs hi - lo >= kSample.
template <int THREADS>
__device__ __forceinline__ void load_sample(const float* base, int64_t stride, int lo, int hi,
                                            float (&values)[kSample / THREADS]) {
  static_assert(THREADS % kSampleRun == 0, "a thread's samples keep their place in a run");
  const int step = (hi - lo) / (kSample / kSampleRun), first = lo + (step - kSampleRun) / 2;
#pragma unroll
  for (int u = 0; u < kSample / THREADS; ++u) {
    const int j = u * THREADS + static_cast<int>(threadIdx.x);
    values[u] = __ldg(base + static_cast<int64_t>(first + (j / kSampleRun) * step + j % kSampleRun) * stride);
  }
}

// A key that about `target` of the chunk [lo, hi) reach: about the rank-R key of the kSample sampled values
// (load_sample), R = ceil(target x kSample / (hi - lo)): the lowest key of its bin after kSampleRounds of the select's
// refine rounds on the sample. topk_row's stream then
// appends only keys >= it from the start, so a long chunk costs neither a full buffer's select nor the appends of
// its early groups (128 x 131072, k 2048: ~2 shrinks a row without it); topk_row_two_pass lists only them. The
// cutoff may let fewer than k through (an unlucky sample, or data whose runs mislead it): the kernels then read the
// chunk again without one (topk_row_two_pass also when more than its list holds got through). Needs sh.fine zero;
// leaves it zero.
template <int THREADS>
__device__ uint32_t sample_cutoff(const float (&values)[kSample / THREADS], int lo, int hi, int target, Shared& sh) {
  constexpr int kPer = kSample / THREADS;
  const int len = hi - lo;
  uint32_t key[kPer];
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    key[u] = float_key(values[u]);
    atomicAdd(&sh.fine[key[u] >> 21], 1u);
  }
  __syncthreads();
  const int64_t wanted = (static_cast<int64_t>(target) * kSample + len - 1) / len;
  const uint32_t rank = static_cast<uint32_t>(min(max(wanted, int64_t{1}), int64_t{kSample}));
  uint32_t pivot, mask, rem;
  select_round0<THREADS, 1>(rank, false, sh);
  select_refine<THREADS, 1, kSampleRounds>([&](auto f) {
#pragma unroll
    for (int u = 0; u < kPer; ++u) f(key[u]);
  }, false, sh, pivot, mask, rem);
  // select_round0 read sh.fine before its last barrier, select_refine does not read it
  clear_fine<THREADS>(sh);
  return pivot;  // the rank-R key with the bits below the last round run cleared: the lowest key of its bin
}

// ---- a cutoff as a float compare ----

constexpr uint32_t kInfKey = 0xff800000u;  // float_key(+inf)

// The smallest value whose key is >= min_key, for 0 < min_key <= kInfKey: then key(x) >= min_key <=> !(x < it)
// (one compare, not a key: NaN passes, as its key is above min_key; -0 >= +0 as their keys are equal).
__device__ __forceinline__ float key_floor(uint32_t min_key) {
  if (min_key <= 0x007fffffu) return -__int_as_float(0x7f800000);  // at most key(-inf): every value
  return __uint_as_float((min_key & 0x80000000u) ? (min_key & 0x7fffffffu) : ~min_key);
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

// ---- a row's two ends ----

// A row of len <= k: every index, then -1; each CTA of the cluster writes its share of the k slots.
template <int THREADS, int CLUSTER>
__device__ __forceinline__ void write_short_row(int len, int* out, int k, int rank) {
  const int per_cta = (k + CLUSTER - 1) / CLUSTER;
  const int end = min(k, (rank + 1) * per_cta);
  for (int j = rank * per_cta + threadIdx.x; j < end; j += THREADS) out[j] = j < len ? j : -1;
}

// This CTA's first output slot and the pivot-equal entries it may take (at most rem over the row): output slots
// and pivot-equal ranks continue from the lower-ranked CTAs of the cluster, whose chunks come first. Their entries
// above / equal to the pivot came with the select's histograms (take_lower: sh.lower), so this is no exchange;
// the lower CTAs take min(rem, their equal ones). Every thread calls it, after a barrier that follows the select.
// In a cluster the select's remote reads were the last of the CTAs' shared memory: each thread arrives at the
// exit barrier here, and the CTA must cluster_wait() before it exits (others may still read its histograms until
// then).
template <int CLUSTER>
__device__ __forceinline__ void cluster_emission(uint32_t rem, Shared& sh, int& first, int& take) {
  first = 0;
  take = static_cast<int>(rem);
  if constexpr (CLUSTER > 1) {
    const uint32_t above = sh.lower[0], equal = sh.lower[1];
    first = static_cast<int>(above + min(rem, equal));
    take = max(0, static_cast<int>(rem) - static_cast<int>(equal));
    cluster_arrive_relaxed();
  }
}

}  // namespace topk
}  // namespace cupy_ops
