// Top-k of one row in one sampled read or two reads of global memory, and bitmaps in shared memory: one CTA a row,
// for calls of many wide rows that each select a small fraction (the contract is common/topk.cuh's). topk_row
// (topk_row.cuh) keeps a buffer of keys in column order, which costs a block scan per 8 elements a thread and a
// select at every shrink; here a row costs two reads (the second mostly from L2) and no buffer:
// 1. First read: the 11-bit histogram of every key (sh.fine). Round 0 of the select gives B, the bin of the k-th
//    largest key, the rank left inside it and its count.
// 2. Second read: an element of a bin above B sets its bit in the `sel` bitmap; an element of B is appended, (key,
//    column), to a list (or sets its bit too when B is taken whole).
// 3. Rounds 1-3 of the select over the list give the pivot; list entries above it set their `sel` bit, those equal
//    to it their `eq` bit. When B holds more entries than the list (tie-heavy or low-entropy rows), the rounds and
//    this marking read the row again instead: exact, slower.
// 4. Emission: one block scan of each thread's `sel` and `eq` popcounts (two where the list overflowed) gives its
//    first output slot and which of its eq bits are among the first rem in column order; the k columns are staged
//    in shared memory and stored coalesced.
// A long row (`sample` > 0, as topk_row's streaming chunks) first tries one read instead of steps 1-2: a cutoff
// sampled from the row (topk.cuh: sample_cutoff) lets ~`sample` elements onto the list, in any order, with the
// histogram of their keys; when k to cap of them made it, steps 3-4 run on the list alone (every element off it is
// below the k-th largest). Otherwise (an unlucky sample, tie-heavy rows) the two reads, exact either way. A block
// scan a group of 8 elements a thread (topk_row) or a histogram atomic per element (step 1) is what that saves:
// topk_row's stream took ~34 instructions an element at 128 x 131072 (ncu), this read an estimated ~6 (H200:
// 34.3 -> 30.4 us there; 256 x 32768 k 512 27.5 -> 19.6 against the two reads).
// Measured (H200, ncu and bench/tune.py; ops/topk_rows.py has the numbers): the two reads win where the rows
// outnumber the SMs and a row selects 1/32 of itself or less (they lose at 1/8; 1/16 is the plans' line), the
// sampled read also at 128 long rows (not at 64); elsewhere the atomic per selected element and ~10 barriers a row
// cost more than topk_row's buffer (the 4096 x 8192 prefill, k 2048 of ~5000: 69.9M warp instructions against
// 63.7M). Packing the sel bits of 8 lanes into words with shuffles instead of atomics was slower on every shape (56
// vs 50 us at 128 x 131072).
#pragma once
#include "async_copy.cuh"
#include "topk.cuh"

namespace cupy_ops {
namespace topk {

// 16-byte slots a thread of the sampled read loads before using any (and stages: stage_batch): 4, 2 in 1024-thread
// CTAs. H100, A/B in one run (session 36), 2 against 4: persistent 128 x 131072 k 2048 31.7 -> 31.3 us (1024
// threads), but 256 x 32768 k 512 18.3 -> 19.1 (512) and prefill 8192 x 32768 310.8 -> 325.4 (256).
template <int THREADS>
constexpr int sampled_unroll() { return THREADS >= 1024 ? 2 : 4; }
// The two reads' (for_each_element): 2 slots a thread. H100, A/B in one run (session 36, 256-thread CTAs five an SM):
// prefill 2048 x 16384 k 512 55.7-55.8 -> 52.0-52.1 us, 8192 x 32768 314.6 -> 310.8-311.0 against 4 (which spilled
// 40 bytes at 48 registers), 52.5 and 314.5 with 1.
constexpr int kTwoReadsUnroll = 2;
// Bytes a thread asks L2 to fetch from the row's start while its CTA finds the sampled cutoff (no read of the row is
// in flight then; the sampled read then starts from L2): 16 KB for a 256-thread CTA. H100, A/B in one run (session
// 34, unrolled select): 128 bytes against none, prefill 8192 x 32768 347.1 -> 340.4 us, persistent 128 x 131072 34.4
// -> 33.7, 256 x 32768 19.6 -> 19.2, but prefill 2048 x 16384 57.8 -> 58.4; 256 bytes (before the unrolled select):
// 2048 x 16384 63.3 against 61.5, 256 x 32768 20.5 against 19.7. With six 256-thread CTAs an SM (session 47, H100,
// two rounds, us, 128 ->): 64 bytes prefill 8192 x 32768 290.5 / 290.6 -> 290.2 / 290.2, 2048 x 16384 k 512 48.1-48.3
// -> 46.8, persistent 256 x 32768 k 512 18.1 / 18.2 -> 17.9, 128 x 131072 30.5 either way; 32: 291.4, 46.6, 18.0,
// 30.9; none: 293.6, 47.2, 18.0, 30.8; 256: 314.2, 50.0.
constexpr int kTwoPassPrefetch = 64;
// CTAs of fewer threads never stage their sampled read (the host gives them stages = 0: six 256-thread CTAs an SM
// leave their list no room for the ring), so it is compiled out of them: with it, at the 48 registers of five an SM,
// ptxas spilled 32-40 bytes (NVRTC 12.9 and 13.0), without it none.
constexpr int kTwoPassRingThreads = 512;
// The list's columns: 16 bits in the CTAs without a ring (256 threads: the host gives them rows of at most
// TWO_PASS_SMALL_WIDTH = 32768), 6 bytes an entry, so that six such CTAs' lists hold 1.15 x the sampled target of
// a 32768-wide row with k 2048 in a sixth of the SM (2986 entries; 2252 at 8 bytes); 32 bits in larger CTAs, whose
// ring sits in the columns' last bytes. The host sizes the list by the same rule (ops/topk_rows.py:
// two_pass_entry_bytes).
template <int THREADS>
using ListColumn = typename pick_type<(THREADS < kTwoPassRingThreads), uint16_t, uint32_t>::type;

// Appends (key, column) at list entry `place` where p: keys at shared address keys_at, columns (Column) at
// columns_at.
template <typename Column>
__device__ __forceinline__ void store_entry_if(bool p, uint32_t keys_at, uint32_t columns_at, uint32_t place,
                                               uint32_t key, int column) {
  store_shared_pair_if(p, keys_at + 4 * place, key, columns_at + static_cast<uint32_t>(sizeof(Column)) * place,
                       static_cast<Column>(column));
}

// f(key, i) for every element i of the (contiguous) row's [0, len), each thread its share: aligned 16-byte slots
// (slot s: elements 4s - a .. 4s - a + 3, a = the row start's offset in 4-byte units), UNROLL of them loaded
// before any is used; the cut first and last slots element by element.
template <int THREADS, int UNROLL = kTwoReadsUnroll, typename F>
__device__ __forceinline__ void for_each_element(const float* base, int len, F f) {
  const int a = static_cast<int>((reinterpret_cast<uint64_t>(base) >> 2) & 3u);
  const int slots = (len + a + 3) >> 2;
#pragma unroll 1
  for (int s0 = threadIdx.x; s0 < slots; s0 += UNROLL * THREADS) {
    float4 v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int i0 = 4 * (s0 + u * THREADS) - a;
      if (i0 >= 0 && i0 + 4 <= len) v[u] = __ldg(reinterpret_cast<const float4*>(base + i0));
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int i0 = 4 * (s0 + u * THREADS) - a;
      if (i0 >= 0 && i0 + 4 <= len) {
        f(float_key(v[u].x), i0);
        f(float_key(v[u].y), i0 + 1);
        f(float_key(v[u].z), i0 + 2);
        f(float_key(v[u].w), i0 + 3);
      } else {
        for (int i = max(i0, 0); i < min(i0 + 4, len); ++i) f(float_key(__ldg(base + i)), i);
      }
    }
  }
}

__device__ __forceinline__ void set_bit(uint32_t* bits, int i) { atomicOr(&bits[i >> 5], 1u << (i & 31)); }

// v[e] for a run-time e without local memory (a dynamic index into a register array spills it); N is 8 or 16.
template <int N>
__device__ __forceinline__ float pick(const float (&v)[N], int e) {
  static_assert(N == 8 || N == 16, "three or four selects");
  float w[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) w[j] = N == 16 && (e & 8) ? v[(j + 8) % N] : v[j];
  const float a = e & 1 ? w[1] : w[0], b = e & 1 ? w[3] : w[2], c = e & 1 ? w[5] : w[4], d = e & 1 ? w[7] : w[6];
  const float ab = e & 2 ? b : a, cd = e & 2 ? d : c;
  return e & 4 ? cd : ab;
}

// cp.async copies of the whole slots of the batch of sampled_unroll x THREADS slots from slot `first` (as
// list_above reads them) to `ring`, slot u of this thread at ring[u x THREADS + thread]: one batch in flight while
// list_above appends the one before it (a thread reads back only its own slots: no barrier). An empty batch past
// the row's end still commits, so every thread's waits count alike. (Where the plans give a ring, stages = 1, and
// what it gains: ops/topk_rows.py, TWO_PASS_RING.)
template <int THREADS>
__device__ __forceinline__ void stage_batch(const float* base, int len, int first, float4* ring) {
  const int a = static_cast<int>((reinterpret_cast<uint64_t>(base) >> 2) & 3u);
#pragma unroll
  for (int u = 0; u < sampled_unroll<THREADS>(); ++u) {
    const int i0 = 4 * (first + u * THREADS + static_cast<int>(threadIdx.x)) - a;
    if (i0 >= 0 && i0 + 4 <= len) async_copy16(&ring[u * THREADS + threadIdx.x], base + i0);
  }
  async_commit();
}

// The sampled read: every element of the (contiguous) row [0, len) whose key is >= cutoff goes to the list, (key,
// column), in any order, and its key to sh.fine; sh.appended counts them all (entries past cap are dropped: the
// caller then reads the row twice). sampled_unroll slots a thread loaded before any is used, as for_each_element
// (from registers, or from `ring` where the next batch is staged: stage_batch), but every thread of the CTA runs the
// same trips: each lane with elements to append takes its places with one shared atomic, then appends them.
// The forms tried and their A/Bs (unrolled appends from one warp scan, a ballot loop, the histogram after the read,
// a reload of the element instead of picking it from registers) are in docs/performance-log.md.
template <int THREADS>
__device__ __forceinline__ void list_above(const float* base, int len, uint32_t cutoff, uint32_t* list_keys,
                                           ListColumn<THREADS>* list_columns, int cap, Shared& sh, float4* ring) {
  const int a = static_cast<int>((reinterpret_cast<uint64_t>(base) >> 2) & 3u);
  const int slots = (len + a + 3) >> 2;
  constexpr int kUnroll = sampled_unroll<THREADS>();
  const bool by_value = cutoff <= kInfKey;  // uniform; else only NaN (key above +inf's) or nothing passes
  const float floor_value = by_value ? key_floor(cutoff) : 0.0f;
  const uint32_t keys_at = shared_address(list_keys), columns_at = shared_address(list_columns);
  const uint32_t keys_end = keys_at + 4u * static_cast<uint32_t>(cap);  // a store's predicate: entry < cap
  // Slot s is slot_base[s]; slots 1.. (and 0 when a == 0) below whole_slots hold 4 elements of the row. A batch of
  // such slots only (all but a row's first and last) loads without a bound check a slot: ~40 instructions a warp's
  // batch of 4 slots a lane fewer (sm_90 code, NVRTC 13.0).
  const float4* slot_base = reinterpret_cast<const float4*>(reinterpret_cast<uint64_t>(base) & ~uint64_t{15});
  const int whole_slots = (len + a) >> 2;
#pragma unroll 1
  for (int first = 0; first < slots; first += kUnroll * THREADS) {
    float x[4 * kUnroll];
    uint32_t valid = 0;
    if (ring != nullptr) async_wait(0);  // this batch's copies (stage_batch), this thread's own
    if ((first > 0 || a == 0) && first + kUnroll * THREADS <= whole_slots) {  // (uniform)
      const float4* slot = slot_base + first + threadIdx.x;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        put_slot(x, u, ring != nullptr ? ring[u * THREADS + threadIdx.x] : __ldg(slot + u * THREADS));
      }
      valid = ~0u >> (32 - 4 * kUnroll);
    } else {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i0 = 4 * (first + u * THREADS + static_cast<int>(threadIdx.x)) - a;
        if (i0 >= 0 && i0 + 4 <= len) {
          put_slot(x, u, ring != nullptr ? ring[u * THREADS + threadIdx.x]
                                         : __ldg(reinterpret_cast<const float4*>(base + i0)));
          valid |= 0xfu << (4 * u);
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            x[4 * u + e] = 0.0f;
            if (i0 + e >= 0 && i0 + e < len) {
              x[4 * u + e] = __ldg(base + i0 + e);
              valid |= 1u << (4 * u + e);
            }
          }
        }
      }
    }
    uint32_t pass = 0;
#pragma unroll
    for (int j = 0; j < 4 * kUnroll; ++j) {
      pass |= static_cast<uint32_t>(by_value ? !(x[j] < floor_value) : float_key(x[j]) >= cutoff) << j;
    }
    pass &= valid;
    // The next batch's copies go out now that every x is read (the ring's slots are free again): they land while
    // this batch is appended.
    if (ring != nullptr) stage_batch<THREADS>(base, len, first + kUnroll * THREADS, ring);
    // Places from one shared atomic a lane that has elements to append (~7 instructions a warp's batch, sm_90 code,
    // NVRTC 13.5: the lanes of one address serialize in the shared-memory pipe, not in the issue slots; a warp scan
    // and lane 31's aggregated atomic took ~40). H100, A/B in one run (session 48, us): prefill 8192 x 32768 k 2048
    // 285.6 -> 282.4, persistent 128 x 131072 k 2048 30.2 -> 29.5. Then each lane appends its own passing elements,
    // no warp collective inside the loop (a ballot loop, one element a lane a step, took ~82 instructions a step:
    // prefill 8192 x 32768 393.8 -> 375.2 us, session 29). The atomic into sh.fine stays in the step: the list's
    // histogram from a pass after the read was slower (300.2 against 296.5, session 38).
    uint32_t place = 0;
    if (pass != 0u) place = atomicAdd(&sh.appended, static_cast<uint32_t>(__popc(pass)));
    // A step's stores go to addresses stepped from the batch's place (from min(place, cap), so a batch's steps past
    // the list's end, 16 at most, cannot wrap), its column is column0 + e + 4 (THREADS - 1) (e >> 2): 35 instructions
    // a step, not 37 (sm_90 code, NVRTC 13.5, 256 threads). H100, A/B in one run (session 49, two rounds, us): prefill
    // 8192 x 32768 k 2048 281.9 / 281.8 -> 281.0 / 281.1, 4096 x 8192 60.3 / 60.4 -> 60.1 / 60.3, the rest unchanged
    // (2048 x 16384 k 512 44.4, persistent 128 x 131072 29.5, 256 x 32768 k 512 17.2). So little for ~5% of the step's
    // instructions: the step waits on the shared-memory pipe (two stores and an atomic) more than on issue slots.
    // Keys made without float_key's NaN and -0 handling where the cutoff is above 0 (2 instructions, not 5) gave
    // 280.7 / 280.9, not kept for a second copy of the loop (performance log, session 49).
    const int column0 = 4 * (first + static_cast<int>(threadIdx.x)) - a;  // x[0]'s
    // sm_80 builds (no GPU here has run one) store at addresses from the place instead: with the stepped ones NVRTC
    // 12.9 spills 4 bytes in the 256-thread kernel, at the 40 registers that six CTAs an SM leave.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
    const uint32_t first_entry = min(place, static_cast<uint32_t>(cap));
    uint32_t key_at = keys_at + 4u * first_entry;
    uint32_t column_at = columns_at + static_cast<uint32_t>(sizeof(ListColumn<THREADS>)) * first_entry;
#else
    (void)keys_end;
#endif
    for (; pass != 0u; pass &= pass - 1u) {
      const int e = __ffs(pass) - 1;
      const uint32_t key = float_key(pick(x, e));
      const int column = column0 + e + (4 * THREADS - 4) * (e >> 2);
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
      store_shared_pair_if(key_at < keys_end, key_at, key, column_at, static_cast<ListColumn<THREADS>>(column));
      key_at += 4u;
      column_at += static_cast<uint32_t>(sizeof(ListColumn<THREADS>));
#else
      store_entry_if<ListColumn<THREADS>>(place < static_cast<uint32_t>(cap), keys_at, columns_at, place, key, column);
      ++place;
#endif
      atomicAdd(&sh.fine[key >> 21], 1u);
    }
  }
}

// Bitmap words of the two-pass kernel for rows of up to `width` elements: ceil(width / 32) rounded up to even, so
// that the list's keys after the two bitmaps are 16-byte aligned (select_pivot reads them four at a time, in CTAs
// under 1024 threads) and so are the staged outputs (16-byte output stores). The host sizes the shared memory by the
// same rule (ops/topk_rows.py: two_pass_words). H100, A/B in one run (session 37), against the kernel before both:
// prefill 8192 x 32768 k 2048 300.1 -> 296.4 us, 2048 x 16384 k 512 50.0 -> 49.3, but persistent 128 x 131072 31.1
// -> 31.9 (1024 threads: the four-key select alone cost 0.4-0.5 there; performance log, session 37).
__device__ __forceinline__ int two_pass_words(int64_t width) { return static_cast<int>(2 * ((width + 63) / 64)); }

// Bitmap words [w, w + 4) of the emission in 1024-thread CTAs, those at or past `end` as 0: one 16-byte shared load
// where all four are in and aligned (see the emission).
__device__ __forceinline__ uint4 load_four_words(const uint32_t* bits, int w, int end) {
  if (w + 4 <= end && (reinterpret_cast<uint64_t>(bits + w) & 15u) == 0) {
    return *reinterpret_cast<const uint4*>(bits + w);
  }
  return make_uint4(w < end ? bits[w] : 0u, w + 1 < end ? bits[w + 1] : 0u, w + 2 < end ? bits[w + 2] : 0u,
                    w + 3 < end ? bits[w + 3] : 0u);
}

// The sampled read's target for a row of `len` elements: the least t with t - k >= spread x sqrt(t x len) (spread: the
// deviations asked for over sqrt(kSample); as the host's two_pass_sample_target for a width of len), at least `least`
// (the plan's floor for its width: SAMPLE_MIN_RANK sample ranks), at most `sample` (the plan's target: its list has
// room for that); spread 0: `sample`. A row shorter than the plan's width lets fewer elements through a cutoff of
// the same sample rank, give or take fewer: its own target lists fewer (k 2048: 2554 at width 32768, 2394 at 16384).
__device__ __forceinline__ int row_sample_target(int sample, int len, int k, float spread, int least) {
  if (spread <= 0.0f) return sample;
  // t = k + q / 2 + sqrt(q (q + 4 k)) / 2, q = spread^2 x len; the square root as y x rsqrt(y) (one MUFU: sqrtf's
  // slow-path call made ptxas spill 4-24 bytes in the 256-thread kernels)
  const float q = spread * spread * static_cast<float>(len), y = q * (q + 4.0f * static_cast<float>(k));
  const int target = static_cast<int>(ceilf(static_cast<float>(k) + 0.5f * (q + y * rsqrtf(y))));
  return min(max(target, least), sample);
}

// The row is contiguous (plans take topk_row for strided ones). Dynamic shared memory, in this order: sel[words],
// eq[words], list keys[cap], list columns[cap] (ListColumn: 16 bits in 256-thread CTAs, so len <= 65536 there); the
// emission stages its k outputs over the list (read last by the marking, before a barrier), so the host gives the
// list at least 4 x k bytes (plans: two_pass_entry_bytes x cap >= 4 x k). `stages` 1: the
// sampled read stages its next batch of slots in the list columns' last 16 x THREADS x sampled_unroll bytes (16-byte
// aligned; stage_batch), and its list stops before them (the two reads after an unlucky sample have the whole list);
// 0: it loads into registers. The callers pass words = two_pass_words(width) for a width >= len (the host
// sizes shared memory by the same rule); the host guarantees 1 <= cap < 65536 (with stages 1: cap > 4 x THREADS x
// sampled_unroll + 3), k <= 4096, len < 2^31 - 32 x THREADS (the slot arithmetic of for_each_element and of
// stage_batch's batch past the end; the bitmaps in shared memory keep planned widths under ~800K) and 0 <= sample
// <= 2^26 (any value is exact: it only tunes).
template <int THREADS, typename Out>
__device__ void topk_row_two_pass(const float* base, int len, Out out_row, int k, int cap, int words, int sample,
                                  float spread, int least, int stages) {
  __shared__ Shared sh;
  extern __shared__ uint4 topk_dynamic_smem[];
  if (len <= k) {  // every index, then -1
    int* out = out_row();
    for (int j = threadIdx.x; j < k; j += THREADS) out[j] = j < len ? j : -1;
    return;
  }
  uint32_t* sel = reinterpret_cast<uint32_t*>(topk_dynamic_smem);
  uint32_t* eq = sel + words;
  uint32_t* list_keys = eq + words;
  using Column = ListColumn<THREADS>;
  Column* list_columns = reinterpret_cast<Column*>(list_keys + cap);
  int* staged = reinterpret_cast<int*>(list_keys);  // (the emission's: over the list, after its last use)
  const uint32_t keys_at = shared_address(list_keys), columns_at = shared_address(list_columns);
  const int used = (len + 31) >> 5;  // bitmap words of this row
  clear_fine<THREADS>(sh);
  for (int w = threadIdx.x; w < used; w += THREADS) sel[w] = eq[w] = 0u;
  if (threadIdx.x == 0) sh.appended = 0u;
  __syncthreads();

  uint32_t take = 0;  // pivot-equal entries to take, the first ones in column order (eq bits)
  uint32_t pivot, mask, rem;
  auto mark = [&](uint32_t key, int i) {
    const uint32_t m = key & mask;
    if (m > pivot) set_bit(sel, i);
    else if (m == pivot) set_bit(eq, i);
  };
  bool listed = false;  // the sampled read listed the top k: steps 3-4 on the list (uniform)
  bool eq_in_list = true;  // every eq bit marks a list entry (else the marking read the row)
  if (sample > 0 && len >= 4 * kSample) sample = row_sample_target(sample, len, k, spread, least);
  // A row samples from 3 x kSample long (as long as 4 x its target): with six 256-thread CTAs an SM and 64-byte
  // prefetches, against 4 x kSample (session 47, H100, A/B in one run, two rounds, us): prefill 2048 x 16384 k 512
  // 46.8 / 46.8 -> 45.8 / 45.7, 8192 x 32768 290.2 / 290.2 -> 290.1 / 290.1, persistent 256 x 32768 k 512 17.9 ->
  // 17.8-17.9, 128 x 131072 30.5 either way. (Five CTAs an SM, session 45: 2048 x 16384 49.0 -> 48.2-48.4, but
  // 8192 x 32768 289.2-289.5 -> 289.3-290.5.)
  if (sample > 0 && len >= max(4 * sample, 3 * kSample)) {
    float4* ring = nullptr;  // list_above's staged batch (uniform)
    int sample_cap = cap;    // the list's entries in the sampled read
    if (THREADS >= kTwoPassRingThreads && stages > 0) {
      const uint64_t end = reinterpret_cast<uint64_t>(list_columns + cap) & ~uint64_t{15};
      ring = reinterpret_cast<float4*>(end) - sampled_unroll<THREADS>() * THREADS;
      sample_cap = static_cast<int>(reinterpret_cast<Column*>(ring) - list_columns);
    }
    float sample_values[kSample / THREADS];
    load_sample<THREADS>(base, 1, 0, len, sample_values);
    // The row's first batch lands while the cutoff is found (the ring: nothing reads it before list_above).
    if (ring != nullptr) stage_batch<THREADS>(base, len, 0, ring);
    prefetch_l2<THREADS>(base, min(int64_t{4} * len, int64_t{kTwoPassPrefetch} * THREADS));
    const uint32_t cutoff = sample_cutoff<THREADS>(sample_values, 0, len, sample, sh);
    __syncthreads();  // sh.fine is clear again
    list_above<THREADS>(base, len, cutoff, list_keys, list_columns, sample_cap, sh, ring);
    __syncthreads();  // (the ring is free again: its last batch was empty, its copies all waited for)
    const uint32_t n = sh.appended;
    listed = n >= static_cast<uint32_t>(k) && n <= static_cast<uint32_t>(sample_cap);
    if (listed) {  // the list holds every element >= the k-th largest key: select and mark on it alone
      // Four keys at a time (select_pivot) but in 1024-thread CTAs (one an SM: H100, A/B in one run, session 37:
      // prefill 8192 x 32768 k 2048 296.8 -> 296.4 us, 2048 x 16384 k 512 49.5 -> 49.3, but persistent 128 x
      // 131072 31.45 -> 31.9: ~600 quads a row leave most of 1024 threads idle a pass). With the two-batch ring's
      // code gone too (session 38, H100, A/B in one run against both): persistent 128 x 131072 31.9 -> 31.0, decode
      // 32.0 -> 31.35, 256 x 32768 k 512 18.45 -> 18.05; prefill unchanged.
      if constexpr (THREADS >= 1024) {
        select_round0<THREADS, 1>(static_cast<uint32_t>(k), false, sh);
        select_refine<THREADS, 1>([&](auto f) {
          for (int j = threadIdx.x; j < static_cast<int>(n); j += THREADS) f(list_keys[j]);
        }, false, sh, pivot, mask, rem);
      } else {
        select_pivot<THREADS, 1>(list_keys, static_cast<int>(n), static_cast<uint32_t>(k), false, sh, pivot, mask,
                                 rem);
      }
      for (int j = threadIdx.x; j < static_cast<int>(n); j += THREADS) mark(list_keys[j], list_columns[j]);
      take = rem;
    } else {
      __syncthreads();  // every thread has read sh.appended
      clear_fine<THREADS>(sh);
      if (threadIdx.x == 0) sh.appended = 0u;  // the two reads start over
    }
    __syncthreads();
  }
  if (!listed) {
    for_each_element<THREADS>(base, len, [&](uint32_t key, int) { atomicAdd(&sh.fine[key >> 21], 1u); });
    __syncthreads();
    select_round0<THREADS, 1>(static_cast<uint32_t>(k), false, sh);
    const uint32_t bin = sh.found[0];
    const bool whole = sh.found[1] == sh.found[2];  // every entry of B is in: no list, no eq bits
    for_each_element<THREADS>(base, len, [&](uint32_t key, int i) {
      const uint32_t b = key >> 21;
      if (b > bin || (whole && b == bin)) {
        set_bit(sel, i);
      } else if (b == bin) {
        const uint32_t p = atomicAdd(&sh.appended, 1u);
        store_entry_if<Column>(p < static_cast<uint32_t>(cap), keys_at, columns_at, p, key, i);
      }
    });
    __syncthreads();
    if (!whole) {
      const uint32_t n = sh.appended;
      if (n <= static_cast<uint32_t>(cap)) {
        select_refine<THREADS, 1>([&](auto f) {
          for (int j = threadIdx.x; j < static_cast<int>(n); j += THREADS) f(list_keys[j]);
        }, false, sh, pivot, mask, rem);
        for (int j = threadIdx.x; j < static_cast<int>(n); j += THREADS) mark(list_keys[j], list_columns[j]);
      } else {  // the list overflowed: each round and the marking read the row again
        eq_in_list = false;
        select_refine<THREADS, 1>([&](auto f) {
          for_each_element<THREADS, 1>(base, len, [&](uint32_t key, int) { f(key); });
        }, false, sh, pivot, mask, rem);
        for_each_element<THREADS, 1>(base, len, [&](uint32_t key, int i) {
          if ((key >> 21) == bin) mark(key, i);
        });
      }
      take = rem;
      __syncthreads();
    }
  }

  // Emission: thread t owns bitmap words [w0, w1), contiguous, so thread order is column order. It writes its sel
  // bits and, of its eq bits, those among the row's first `take` in column order, from one block scan of both
  // counts packed in 16 bits each (sel bits <= k; eq bits are list entries, fewer than cap < 65536), or two where the
  // list overflowed (the marking read the row: eq bits up to len). H100, A/B in one run (session 35), against a scan
  // of the eq counts, the eq bits merged into sel, then a scan of the sel counts: prefill 8192 x 32768 337.6-337.7 ->
  // 330.5-330.6 us, 2048 x 16384 k 512 57.9 -> 55.8-55.9, persistent 256 x 32768 19.0 -> 18.4, 128 x 131072
  // 33.2-33.5 -> 32.6. Staged in shared memory, then stored coalesced: stores straight from here cost the 8192 x 32768
  // prefill 331.5-331.6 -> 364.3-364.5 (the register kernel's gain from them: topk_registers.cuh).
  //
  // 1024-thread CTAs (rows that fit the SMs once, or wider than 65536: 128 x 131072 has four words a thread) take a
  // thread's words four at a time, in one 16-byte load where the run is aligned (a warp's 4-byte loads of its threads'
  // words, 16 bytes apart, hit each bank four times), and walk a word's bits one a trip (~2 taken bits a thread;
  // NVRTC 13.0 unrolled the loop by 4 behind ~10 instructions of trip count a word, sm_90 SASS). H200, A/B in one run
  // (session 41, two rounds, us): persistent 128 x 131072 26.92 / 27.10 -> 26.38 / 26.39, decode 27.31 / 27.40 ->
  // 26.67 / 26.71. Smaller CTAs keep a word a trip (their SASS is as before): in every CTA, on an H100 (session 41),
  // tie-less threads walking sel alone cost the prefill 8192 x 32768 293.1 -> 296.9-298.3 (branch s40-walk), and with
  // the four-word loads too 301.1-302.1 (s41-words; 2048 x 16384 k 512 48.9 -> 52.5-52.8, 256 x 32768 k 512 18.0 ->
  // 18.4).
  constexpr bool kFourWords = THREADS >= 1024;
  const int per = (used + THREADS - 1) / THREADS;
  const int w0 = min(used, static_cast<int>(threadIdx.x) * per), w1 = min(used, w0 + per);
  auto popc4 = [](uint4 v) { return static_cast<uint32_t>(__popc(v.x) + __popc(v.y) + __popc(v.z) + __popc(v.w)); };
  uint32_t above = 0, equal = 0;
  if constexpr (kFourWords) {
    for (int w = w0; w < w1; w += 4) {
      above += popc4(load_four_words(sel, w, w1));
      if (take != 0) equal += popc4(load_four_words(eq, w, w1));  // (uniform)
    }
  } else {
    for (int w = w0; w < w1; ++w) {
      above += __popc(sel[w]);
      if (take != 0) equal += __popc(eq[w]);  // (uniform)
    }
  }
  uint32_t parity = 0, total, above_before, equal_before;
  if (eq_in_list) {
    const uint32_t before = block_exclusive_sum<THREADS>(above | equal << 16, total, sh, parity);
    above_before = before & 0xffffu;
    equal_before = before >> 16;
  } else {
    equal_before = block_exclusive_sum<THREADS>(equal, total, sh, parity);
    above_before = block_exclusive_sum<THREADS>(above, total, sh, parity);
  }
  uint32_t ties = take > equal_before ? min(take - equal_before, equal) : 0u;  // this thread's eq bits taken
  uint32_t slot = above_before + min(equal_before, take);
  const uint32_t staged_at = shared_address(staged);
  auto stage_word = [&](uint32_t m, uint32_t e, int w) {  // word w's sel bits m, eq bits e
    for (; e != 0u && ties != 0u; --ties) {
      m |= e & (0u - e);  // the lowest remaining eq bit
      e &= e - 1u;
    }
    const uint32_t column0 = 32u * w - 1u;  // (__ffs counts from 1)
#pragma unroll(kFourWords ? 1 : 4)
    for (; m != 0; m &= m - 1u, ++slot) {  // (exactly k bits are taken: the guard is for safety)
      store_shared_if(slot < static_cast<uint32_t>(k), staged_at + 4u * slot, column0 + __ffs(m));
    }
  };
  if constexpr (kFourWords) {
    for (int w = w0; w < w1; w += 4) {
      const uint4 s = load_four_words(sel, w, w1), e = ties != 0u ? load_four_words(eq, w, w1) : uint4{};
      stage_word(s.x, e.x, w);
      stage_word(s.y, e.y, w + 1);
      stage_word(s.z, e.z, w + 2);
      stage_word(s.w, e.w, w + 3);
    }
  } else {
    for (int w = w0; w < w1; ++w) stage_word(sel[w], ties != 0u ? eq[w] : 0u, w);
  }
  __syncthreads();
  int* out = out_row();
  if ((k & 3) == 0 && (reinterpret_cast<uint64_t>(out) & 15u) == 0) {  // (staged: 16-byte aligned, two_pass_words)
    const int4* quads = reinterpret_cast<const int4*>(staged);
    for (int j = threadIdx.x; j < k / 4; j += THREADS) reinterpret_cast<int4*>(out)[j] = quads[j];
  } else {
    for (int j = threadIdx.x; j < k; j += THREADS) out[j] = staged[j];
  }
}

}  // namespace topk
}  // namespace cupy_ops
