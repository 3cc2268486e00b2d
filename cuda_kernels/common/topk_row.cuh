// topk_row: the top k of one row (common/topk.cuh has the contract) in one read of it, for
// top_k_per_row_prefill, top_k_per_row_decode (top_k_per_row.cu) and persistent_topk (persistent_topk.cu).
//
// Algorithm: one read of global memory (plus a 2048-score sample of a long chunk, and a second read only when
// that sample misleads), everything else in shared memory.
// 1. The row is cut into CLUSTER contiguous chunks, one per CTA of a thread-block cluster (sm_90; CLUSTER = 1
//    elsewhere). A CTA whose whole chunk fits its buffer copies every aligned float4 slot of it straight into the
//    buffer (cp.async, all at once) and turns them into keys in place. Otherwise it streams its chunk in groups of
//    2 x THREADS slots (cp.async into a ring, groups ahead) and appends their keys to the buffer in index order
//    (16-byte stores by slot position while nothing is filtered, then a block scan). Both keep a histogram of
//    the top 11 key bits.
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
// 4. Emit: every entry above pivot and the first rem pivot-equal ones (in a cluster, the lower-ranked CTAs'
//    counts, summed while the select reads their histograms, place a CTA's run) goes to its rank in index order:
//    compacted in place (a whole chunk) or staged in the ring (a streaming one), then copied out with coalesced
//    stores (a thread's contiguous run of entries would otherwise store one 4-byte word per lane and L2
//    transaction: 2048 of them per row).
// While a CTA's whole chunk fits its buffer (stage = 0: no shrink can happen) an entry's column is implicit, its
// buffer position plus the chunk's first column, so the buffer holds keys only (4 bytes per element, not 8).
#pragma once
#include "async_copy.cuh"
#include "cluster.cuh"
#include "topk.cuh"

namespace cupy_ops {
namespace topk {

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
  clear_fine<THREADS>(sh);  // select_pivot read it before a barrier
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

// v[e] for a run-time e without local memory (a dynamic index into a register array spills it).
__device__ __forceinline__ float pick8(const float (&v)[8], int e) {
  const float a = e & 1 ? v[1] : v[0], b = e & 1 ? v[3] : v[2], c = e & 1 ? v[5] : v[4], d = e & 1 ? v[7] : v[6];
  const float ab = e & 2 ? b : a, cd = e & 2 ? d : c;
  return e & 4 ? cd : ab;
}

// ---- one row ----

// Dynamic shared memory, in this order: the copy ring (stages x 2 x THREADS float4), keys[cap], then, when a
// chunk can exceed cap (stage = k), idx[cap] and the staging keys[stage] and idx[stage]; when stage == 0 columns
// are implicit (nothing after keys) and the ring is unused (stages may be 0: the chunk is copied straight into
// keys, and the emission compacts in place). The host guarantees: cap >= k + 8 * THREADS when stage > 0 (a group
// fits after a shrink), cap >= every chunk when stage == 0, cap < 65536 (packed counts), 1 <= stages <= 3 when
// stage > 0, len <= 2^31 - 8, and 0 <= sample <= 2^26 (so 4 * sample fits; any value is exact, it only tunes).
// With stage > 0 the ring (>= 16 KB) also stages the output (<= k <= 4096 entries). WHOLE: compiled for whole
// chunks only (the host gives stage = 0), without the streaming path.
template <int THREADS, int CLUSTER, bool WHOLE = false>
__device__ void topk_row(const float* base, int64_t stride, int len, int* out, int k, int cap, int stage,
                         int stages, int sample) {
  __shared__ Shared sh;
  extern __shared__ uint4 topk_dynamic_smem[];
  const int rank = static_cast<int>(cluster_rank<CLUSTER>());

  if (len <= k) {
    write_short_row<THREADS, CLUSTER>(len, out, k, rank);
    return;
  }

  float4* ring = reinterpret_cast<float4*>(topk_dynamic_smem);
  uint32_t* keys = reinterpret_cast<uint32_t*>(ring + stages * 2 * THREADS);
  int* idx = reinterpret_cast<int*>(keys + cap);
  uint32_t* stage_keys = reinterpret_cast<uint32_t*>(idx + cap);
  int* stage_idx = reinterpret_cast<int*>(stage_keys + stage);

  // Slot s holds elements 4s - a .. 4s - a + 3 (cta_chunk: a aligns every whole slot); CTA `rank` streams slots
  // [s_lo, s_hi), i.e. elements [lo, hi), in groups of 2 x THREADS slots: thread t takes slots t and THREADS + t of
  // a group. Group j's whole slots are copied to ring stage j % stages (`read_stage`, `write_stage`) `stages - 1`
  // groups ahead; each thread reads back only its own copies.
  const bool contiguous = stride == 1;
  const CtaChunk chunk = cta_chunk<CLUSTER>(base, contiguous, len, rank);
  const int a = chunk.a, s_lo = chunk.s_lo, s_hi = chunk.s_hi, lo = chunk.lo, hi = chunk.hi;
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
  int read_stage, write_stage;  // group j is read from, and written to, stage j % stages
  auto start_copies = [&] {  // groups 0 .. ahead - 1 in flight (ahead < stages)
    for (int j = 0; j < ahead; ++j) copy_group(j, j);
    read_stage = 0;
    write_stage = ahead;
  };
  uint32_t parity = 0;
  int n = 0;
  const bool whole_chunk = WHOLE || stage == 0;  // (WHOLE: the host plans only whole chunks, stage = 0)
  if (whole_chunk) {
    // The whole chunk fits the buffer (the host's cap >= 4 x the chunk's slots, chunk_bound: up to 3 elements of
    // misalignment included): every whole slot is copied straight to its entries 4 (s - s_lo) .. + 3, all of the
    // chunk's copies in flight at once (one wait, not one a group through the ring), then turned into keys in place by
    // the thread that copied it. The cut first and last slots and strided rows load element by element; their lanes
    // outside [lo, hi) become key-0 fillers, as in the streaming loop below. (H200, the 4096 x 8192 prefill's four
    // 256-thread CTAs an SM with a one-stage ring: 90.5 -> 77.4 us against copies through the ring.)
    if (contiguous) {
      for (int s = w_lo + static_cast<int>(threadIdx.x); s < w_hi; s += THREADS) {
        async_copy16(keys + 4 * (s - s_lo), base + (4 * s - a));
      }
    }
    async_commit();
    clear_fine<THREADS>(sh);
    __syncthreads();
    async_wait(0);
    auto append = [&](int s, const uint4& q) {
      *reinterpret_cast<uint4*>(keys + 4 * (s - s_lo)) = q;
      atomicAdd(&sh.fine[q.x >> 21], 1u);
      atomicAdd(&sh.fine[q.y >> 21], 1u);
      atomicAdd(&sh.fine[q.z >> 21], 1u);
      atomicAdd(&sh.fine[q.w >> 21], 1u);
    };
    auto append_loaded = [&](int s) {  // a slot not copied: element by element from global memory
      float x[4];
      const uint32_t valid = slot_values(base, stride, false, nullptr, 4 * s - a, lo, hi, x);
      uint32_t q[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) q[e] = valid >> e & 1u ? float_key(x[e]) : 0u;
      append(s, make_uint4(q[0], q[1], q[2], q[3]));
    };
    if (contiguous) {
#pragma unroll 2
      for (int s = w_lo + static_cast<int>(threadIdx.x); s < w_hi; s += THREADS) {
        const float4 v = *reinterpret_cast<const float4*>(keys + 4 * (s - s_lo));
        append(s, make_uint4(float_key(v.x), float_key(v.y), float_key(v.z), float_key(v.w)));
      }
      // Thread 0 takes the first slot and thread 1 the last when the chunk's ends cut them (one slot cut at both
      // ends: thread 0's).
      const int s = threadIdx.x == 0 ? s_lo : s_hi - 1;
      if (threadIdx.x < 2 && s >= s_lo && s < s_hi && (s < w_lo || s >= w_hi) && (threadIdx.x == 0 || s != s_lo)) {
        append_loaded(s);
      }
    } else {
      for (int s = s_lo + static_cast<int>(threadIdx.x); s < s_hi; s += THREADS) append_loaded(s);
    }
    n = 4 * (s_hi - s_lo);
  } else {
    // A chunk long against `sample` (the survivors the host wants; 0: none) is filtered from its first group on by a
    // sampled cutoff; its sample is loaded first, then the ring's first copies go in flight. Only with idx (stage >
    // 0): filtered entries need their columns. cutoff != 0 marks a sampled start: a cutoff is at least 0x00600000
    // (key(-inf)'s bin).
    const bool sampled = sample > 0 && hi - lo >= max(4 * sample, 4 * kSample);
    float sample_values[kSample / THREADS];
    if (sampled) load_sample<THREADS>(base, stride, lo, hi, sample_values);
    start_copies();

    clear_fine<THREADS>(sh);
    __syncthreads();
    uint32_t cutoff = 0;
    if (sampled) {
      cutoff = sample_cutoff<THREADS>(sample_values, lo, hi, sample, sh);
      __syncthreads();
    }
    uint32_t min_key = cutoff;
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
            *reinterpret_cast<int4*>(idx + p) = make_int4(i0, i0 + 1, i0 + 2, i0 + 3);
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
        clear_fine<THREADS>(sh);
        start_copies();
        __syncthreads();
      }
    }
  }
  __syncthreads();

  uint32_t pivot, mask, rem, total;
  select_pivot<THREADS, CLUSTER>(keys, n, k, true, sh, pivot, mask, rem);
  const int column0 = 4 * s_lo - a;  // the column of buffer entry 0 while columns are implicit
  int first, take;
  if (whole_chunk) {
    // A whole chunk: one pass emits, each warp compacting its run's taken columns, in index order, into the front of
    // its own run, then copying them out after the other warps' counts place it (no staging area: whole chunks need
    // no ring). A step of a warp: lane l's four entries i = step + 4 l .. + 3 (one 16-byte load, 512 contiguous
    // bytes a warp: no bank conflict); their taken ones go to the places the lanes' counts give (a prefix from four
    // ballots), each at or before its own entry: so over entries of this step that lower lanes have read (a
    // __syncwarp orders those reads before the stores) and never past the step. A whole chunk's n is a multiple of 4
    // (its cut end slots hold key-0 fillers, below every pivot), as are the runs: a lane's four entries are all in
    // its run or none. An entry is taken iff key >= pivot (pivot's bits below the mask are 0) when every
    // pivot-equal entry is (rem is the final bin's count: the usual case); else the rounds ran to the exact key
    // (mask ~0) and a pass first turns the pivot-equal entries past the first rem of the row into fillers. H200,
    // against count and write passes (the all-taken case): prefill 4096 x 8192 77.4 -> 65.0 us, 1024 x 8192 29.5 ->
    // 25.0, 64 x 65536 k 2048 18.0 -> 16.4.
    constexpr int kWarps = THREADS / 32;
    const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
    const int per_warp = (n + 128 * kWarps - 1) / (128 * kWarps) * 128;
    const int begin = min(n, warp * per_warp), end = min(n, begin + per_warp);
    const uint32_t lower_lanes = (1u << lane) - 1u;
    const bool all_equal = rem == sh.found[2];  // uniform
    auto step_keys = [&](int i) {
      return i < end ? *reinterpret_cast<const uint4*>(keys + i) : make_uint4(0u, 0u, 0u, 0u);
    };
    if (!all_equal) {
      // The pivot-equal entries past the first `take` of this CTA's (cluster_emission: rem less the lower-ranked
      // CTAs' ones) become fillers (key 0, below the pivot), so the compaction takes exactly the entries >= pivot. A
      // warp's rank starts after the lower warps' ones, a lane's after the lower lanes' of the step (a warp scan).
      uint32_t equal = 0;
      for (int step = begin; step < end; step += 128) {
        const uint4 q = step_keys(step + 4 * lane);
        equal += (q.x == pivot) + (q.y == pivot) + (q.z == pivot) + (q.w == pivot);
      }
      equal = __reduce_add_sync(kFullMask, equal);
      if (lane == 0) sh.warp_count[warp] = equal;
      __syncthreads();  // (also publishes the cluster select's sh.lower for cluster_emission)
      // this CTA's pivot-equal entries before the warp's (a block scan here made ptxas spill 28 bytes at 48 registers)
      int rank = static_cast<int>(__reduce_add_sync(kFullMask, lane < warp ? sh.warp_count[lane] : 0u));
      cluster_emission<CLUSTER>(rem, sh, first, take);
      __syncthreads();  // every warp has read sh.warp_count before the compaction rewrites it
      for (int step = begin; step < end; step += 128) {  // uniform over the warp
        const int i = step + 4 * lane;
        const uint4 q = step_keys(i);
        const uint32_t e = (q.x == pivot) | (q.y == pivot) << 1 | (q.z == pivot) << 2 | (q.w == pivot) << 3;
        const uint32_t n_equal = __popc(e), inclusive = warp_inclusive_sum(n_equal);
        const int keep = take - rank - static_cast<int>(inclusive - n_equal);  // this lane's first `keep` stay
        uint32_t drop = e;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (j < keep) drop &= drop - 1u;  // the lowest remaining one stays
        }
        if (drop & 1u) keys[i] = 0u;
        if (drop & 2u) keys[i + 1] = 0u;
        if (drop & 4u) keys[i + 2] = 0u;
        if (drop & 8u) keys[i + 3] = 0u;
        rank += static_cast<int>(__shfl_sync(kFullMask, inclusive, 31));
      }
    }
    int* taken = reinterpret_cast<int*>(keys) + begin;
    int count = 0;
    for (int step = begin; step < end; step += 128) {  // uniform over the warp
      const int i = step + 4 * lane;
      const uint4 q = step_keys(i);
      const bool t0 = q.x >= pivot, t1 = q.y >= pivot, t2 = q.z >= pivot, t3 = q.w >= pivot;
      const uint32_t b0 = __ballot_sync(kFullMask, t0), b1 = __ballot_sync(kFullMask, t1),
                     b2 = __ballot_sync(kFullMask, t2), b3 = __ballot_sync(kFullMask, t3);
      const int p0 = count + __popc(b0 & lower_lanes) + __popc(b1 & lower_lanes) + __popc(b2 & lower_lanes) +
                     __popc(b3 & lower_lanes);
      const int p1 = p0 + t0, p2 = p1 + t1, p3 = p2 + t2;
      __syncwarp();  // the ballots order nothing in memory: the lower lanes' reads of this step come before
      if (t0) taken[p0] = column0 + i;
      if (t1) taken[p1] = column0 + i + 1;
      if (t2) taken[p2] = column0 + i + 2;
      if (t3) taken[p3] = column0 + i + 3;
      count += __popc(b0) + __popc(b1) + __popc(b2) + __popc(b3);
    }
    if (lane == 0) sh.warp_count[warp] = static_cast<uint32_t>(count);
    __syncthreads();  // also publishes the cluster select's sh.lower for cluster_emission
    if (all_equal) cluster_emission<CLUSTER>(rem, sh, first, take);
    first += static_cast<int>(__reduce_add_sync(kFullMask, lane < warp ? sh.warp_count[lane] : 0u));
    for (int j = lane; j < count; j += 32) out[first + j] = taken[j];
  } else {
    const uint32_t before = count_split<THREADS>(keys, n, pivot, mask, total, sh, parity);
    cluster_emission<CLUSTER>(rem, sh, first, take);
    // A streaming buffer (columns in idx): this CTA's output run out[first .. first + count), staged in the ring
    // (every copy has landed and been read).
    const int count = static_cast<int>(total & 0xffffu) + min(max(take, 0), static_cast<int>(total >> 16));
    int* staged = reinterpret_cast<int*>(ring);
    write_selected<THREADS>(keys, n, pivot, mask, before, first, take, [&](int slot, int i) {
      staged[slot - first] = idx[i];
    });
    __syncthreads();
    for (int j = threadIdx.x; j < count; j += THREADS) out[first + j] = staged[j];
  }
  if constexpr (CLUSTER > 1) cluster_wait();  // arrived in cluster_emission; others read our shared memory until here
}

}  // namespace topk
}  // namespace cupy_ops
