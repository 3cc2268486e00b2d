// Mamba-1 selective scan forward (vLLM's selective_scan_fwd). Spec: ../shared/specs/selective_scan_fwd.md.
//
// Per sequence, channel c, state k and token t, in float32:
//   dt = delta + delta_bias (softplus'd when asked), h_k = exp(dt A[c,k]) h_k + dt B[k,t] u,
//   y = sum_k C[k,t] h_k + D u;   y -> delta,  y * silu(z) -> z,  h -> ssm_states.
//
// Chunk kernel (any length, batched or varlen): a block is 16 channels x one chunk of tokens; a warp is 4
// channels x 8 lanes, and each lane owns I consecutive tokens (ITEM_BYTES = 32 bytes of input: I = 16 for 16-bit
// inputs, 8 for fp32) of a window of W = 8 I tokens. For each state k a lane folds its tokens' (decay, value)
// pairs into one pair (sweep 1), the channel's 8 lanes scan those pairs with 3 shuffles, and sweep 2 turns the
// lane's starting state into h and y at each token; windows without events take two states at a time (two
// independent chains a lane: fast_states). One exp per (token, channel, state). Block-wide barriers: one after A
// log2 e is staged in shared memory, and, when the block's channels share one group (stage_bc), two per 16 states
// of a fast window, around the staging of their B and C as float (stage_states): so whether a window is fast must
// be the same for the whole block (it depends on the window's tokens only). The state entering a window (the
// carry) is kept in shared memory per channel and state.
// A window whose tokens all continue one sequence takes a path without masks (a batched sequence's initial
// state enters as the first window's carry, its final state is the carry after the last). Sequence starts
// (varlen), states to store (prefix-cache blocks), padding and chunk edges are "events" of a per-warp table
// built for that window only; a window where each lane has at most one start and one store is scanned with
// selects (kLight), others event by event (kGeneral).
// Long sequences with few channels are cut into chunks scanned in parallel: pass 1 folds each chunk's
// sequence-crossing tail into (sum of dt, end state from zero), the carry kernel chains those per sequence,
// and pass 2 (the same chunk kernel) starts every chunk from its carried-in state.
//
// Short kernel (batched, plain mode, L <= 8: decode-like): 16 lanes per channel own the states (k = lane,
// lane + 16, ...), each runs its states over the <= 8 tokens, and y is summed over the lanes with shuffles.
//
// Here: the params, constants and math helpers, and the kernels. Included below: selective_scan_seq.cuh (sequences,
// state slots, scratch addressing) and selective_scan_windows.cuh (the chunk kernel's windows: the 8-lane scan,
// fast_states and the staging of B and C, scan_window's light and general paths, load_inputs).
#include "common/dtypes.cuh"
#include "common/packed.cuh"
#include "common/types.cuh"

namespace cupy_ops {

struct SelectiveScanParams {
  void* u;                       // [b, d, L] or [d, T] (varlen)
  void* delta;                   // like u; read, then y is written in place
  const float* A;                // [d, n]
  const void* B;                 // [b, g, n, L] or [g, n, T]
  const void* C;                 // like B
  const float* D;                // [d] or nullptr
  void* z;                       // like u, or nullptr; y * silu(z) is written in place
  const float* delta_bias;       // [d] or nullptr
  const int* query_start_loc;    // [b + 1] (varlen) or nullptr
  const int* cache_indices;      // [b] or [b, max_blocks] (prefix-cache mode), or nullptr
  const bool* has_initial_state; // [b] or nullptr
  void* ssm_states;              // [slots, d, n], float or the input type
  const int* block_idx_first;    // [b] (prefix-cache mode) or nullptr
  const int* block_idx_last;     // [b]
  const int* initial_state_idx;  // [b]
  const int* cu_chunk_seqlen;    // [chunks + 1] or nullptr
  const int* last_chunk_indices; // [b] or nullptr
  float* scratch;                // chunked runs only: see scratch_* below
  int64_t batch;                 // b sequences
  int64_t dim;                   // d channels
  int64_t dstate;                // n states
  int64_t seqlen;                // tokens per row: L (batched) or T (varlen)
  int64_t group_size;            // d / g channels share one B and C
  int64_t num_slots;             // ssm_states.shape[0]
  int64_t max_blocks;            // cache_indices columns in prefix-cache mode
  int64_t null_block_id;
  int64_t block_size;
  int64_t cu_len;                // cu_chunk_seqlen entries (0 when absent)
  int64_t chunk_tokens;          // tokens per chunk, a multiple of the window
  int64_t chunks_per_row;        // chunks of one sequence (batched) or of the token axis (varlen)
  int64_t num_chunks;            // chunks of the whole call (grid.x of the chunk kernel)
  // strides in elements: (sequence, channel) for u, delta, z; (sequence, group, state) for B and C; the
  // sequence stride is 0 in varlen mode (tokens are addressed by their index in T)
  int64_t u_stride[2];
  int64_t delta_stride[2];
  int64_t z_stride[2];
  int64_t B_stride[3];
  int64_t C_stride[3];
  int64_t A_stride[2];
  int64_t D_stride;
  int64_t delta_bias_stride;
  int64_t state_stride[3];
  int64_t qsl_stride;
  int64_t ci_stride[2];
  int64_t his_stride;
  int64_t bif_stride;
  int64_t bil_stride;
  int64_t isi_stride;
  int64_t cu_stride;
  int64_t lci_stride;
  bool varlen;
  bool softplus;
  bool state_f32;                // ssm_states is float32 (else the input type)
  bool cache_mode;               // prefix-cache mode (block_idx_first given)
  bool vec_ok;                   // every row of u, delta, z, B, C starts 16-byte aligned
  bool chunked;                  // pass 1 and the carry kernel ran: chunks start from carried-in states
  bool stage_bc;                 // every block's channels share one group: fast windows stage B and C
};

constexpr int kLanes = 8;                       // lanes per channel in the chunk kernel
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kChannels = kWarps * 32 / kLanes; // 16 channels per block
constexpr int kStage = kThreads / kLanes;       // states whose B and C a block stages at once (a thread each)
template <int I>  // float4s of one staged state: I items for each of the kLanes lanes
__device__ constexpr int staged_quads() { return I / 4 * kLanes; }
constexpr int kShortLanes = 16;                 // lanes per channel in the short kernel
constexpr int kShortMaxLen = 8;
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kNone = -1;                       // table slot: no state (zeros / nothing stored)
constexpr int kSnap = -2;                       // table slot: the initial state pass 1 copied to scratch
constexpr unsigned char kValid = 1, kReset = 2, kStore = 4;


__device__ __forceinline__ void prefetch_l1(const void* p) { asm volatile("prefetch.L1 [%0];" ::"l"(p)); }

// One MUFU.LG2 (absolute error ~2^-22 for inputs in [1, 2]).
__device__ __forceinline__ float lg2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// log(1 + e^x) (x itself past 20, as vLLM) in ~15 instructions; log1pf(expf(x)) took ~35 a token, a third of
// the kernel's time at n = 16 (ncu). e = 2^(x log2 e): rounding x log2 e costs up to ~1e-6 relative for |x| <= 20
// (~4e-6 near x = -85). For e < 1/16 a 6-term series of log1p (relative error < e^6 / 7 < 1e-8); above,
// ln 2 * log2(1 + e), whose absolute error (~2e-7) is < 4e-6 of the result (>= log 1.0625). Below x = -87.3 it
// gives 0 where log1pf(expf(x)) is subnormal.
__device__ __forceinline__ float softplus(float x) {
  const float e = ex2(x * kLog2e);
  const float series =
      e * fmaf(e, fmaf(e, fmaf(e, fmaf(e, fmaf(e, -1.f / 6, 0.2f), -0.25f), 1.f / 3), -0.5f), 1.f);
  const float r = e < 0.0625f ? series : 0.6931471805599453f * lg2(1.f + e);
  return x <= 20.f ? r : x;
}

// x sigmoid(x) with one exp2 and one fast reciprocal (relative error <= 4e-6, emulated). Below x = -87.3 it gives
// -0 (1 + e^-x passes 2^126, where __fdividef returns 0); the exact value there is below 1e-36.
__device__ __forceinline__ float silu(float x) { return __fdividef(x, 1.f + ex2(-x * kLog2e)); }

__device__ __forceinline__ int64_t ld(const int* p, int64_t i, int64_t stride) { return __ldg(p + i * stride); }

}  // namespace cupy_ops

#include "selective_scan_seq.cuh"      // sequences, state slots, scratch (uses the struct and constants above)
#include "selective_scan_windows.cuh"  // the chunk kernel's windows (uses all of the above)

namespace cupy_ops {

// ---- the chunk kernel ----------------------------------------------------------------------------------------

// grid (chunks, ceil(d / 16)), 128 threads. Dynamic shared memory: carry [2][16][n] floats, A log2 e [16][n]
// floats, when stage_bc B and C of kStage states [2][kStage][W] floats, then per warp an event table of W tokens:
// initial-state slot, store slot (ints) and flags (bytes).
// MIN_BLOCKS: blocks per SM that the register budget must allow (2: up to 255 registers). ITEM_BYTES: input
// bytes per lane and window (32 or 16), I = ITEM_BYTES / sizeof(T) tokens.
template <typename T, bool PASS1, int MIN_BLOCKS, int ITEM_BYTES>
__global__ void __launch_bounds__(kThreads, MIN_BLOCKS) selective_scan_chunk_kernel(const SelectiveScanParams p) {
  constexpr int I = ITEM_BYTES / int(sizeof(T));
  constexpr int W = I * kLanes;
  constexpr uint32_t kAll = (1u << I) - 1;
  extern __shared__ __align__(16) float smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gl = lane % kLanes;
  const int chl = warp * (32 / kLanes) + lane / kLanes;
  const int64_t c_raw = int64_t(blockIdx.y) * kChannels + chl;
  const bool ch_ok = c_raw < p.dim;
  const int64_t c = ch_ok ? c_raw : p.dim - 1;  // lanes past d compute channel d - 1 and store nothing
  const int64_t n = p.dstate, chunk = blockIdx.x;
  const int64_t s = p.varlen ? 0 : chunk / p.chunks_per_row;  // batched: the block's sequence
  const int64_t lo = (chunk - s * p.chunks_per_row) * p.chunk_tokens;
  const int64_t hi = lo + p.chunk_tokens < p.seqlen ? lo + p.chunk_tokens : p.seqlen;
  // The carry in and out of a window: buffer `which` (computed, not picked from an array of pointers, so that
  // the compiler keeps shared-memory loads: an array made them generic loads)
  const auto carry = [&](int which) { return smem + (which * kChannels + chl) * n; };
  // The block's A log2 e, staged once: read a state at a time from global memory, its latency was 16% of the
  // stall samples of the fast windows (ncu, b1 d4096 n16 L2048).
  float* A2s = smem + 2 * kChannels * n;
  const int n32 = static_cast<int>(n);  // n <= 256: 32-bit division
  for (int i = threadIdx.x; i < kChannels * n32; i += kThreads) {
    const int64_t ci = int64_t(blockIdx.y) * kChannels + i / n32;
    A2s[i] = __ldg(p.A + (ci < p.dim ? ci : p.dim - 1) * p.A_stride[0] + (i % n32) * p.A_stride[1]) * kLog2e;
  }
  __syncthreads();
  const float* A2row = A2s + chl * n;
  // stage_bc: the fast windows' staged B and C (kStage states of W floats each), 16-byte aligned (3 x 16 x n
  // floats before it)
  float4* staged = reinterpret_cast<float4*>(smem + 3 * kChannels * n);
  int* h0_tab = reinterpret_cast<int*>(smem + 3 * kChannels * n + (p.stage_bc ? 2 * kStage * W : 0)) +
                warp * (2 * W + W / 4);
  int* st_tab = h0_tab + W;
  unsigned char* flag_tab = reinterpret_cast<unsigned char*>(st_tab + W);

  const int64_t grp = c / p.group_size;
  const T* drow = static_cast<const T*>(p.delta) + s * p.delta_stride[0] + c * p.delta_stride[1];
  const T* urow = static_cast<const T*>(p.u) + s * p.u_stride[0] + c * p.u_stride[1];
  const T* Brow = static_cast<const T*>(p.B) + s * p.B_stride[0] + grp * p.B_stride[1];
  const T* Crow = static_cast<const T*>(p.C) + s * p.C_stride[0] + grp * p.C_stride[1];
  const float bias = p.delta_bias != nullptr ? __ldg(p.delta_bias + c * p.delta_bias_stride) : 0.f;
  const float Dc = p.D != nullptr ? __ldg(p.D + c * p.D_stride) : 0.f;
  float dt[I], dtu[I], y[I];

  if constexpr (PASS1) {
    // The chunk's tail that crosses into the next chunk: fold it from zero (or from the initial state of a
    // sequence starting here, which is also copied to scratch: pass 2 must not read a slot that another
    // block of pass 2 may be writing the final state to).
    const Seq q = find_seq(p, hi - 1, s);
    const bool crosses = !q.pad && q.end > hi, starts = q.start >= lo;
    float* out = p.scratch + scratch_carry(p, chunk, c);
    if (blockIdx.y == 0 && threadIdx.x == 0)
      reinterpret_cast<int*>(p.scratch)[scratch_flag(p, chunk)] = (!crosses || starts) ? 1 : 0;
    if (!crosses) {
      if (ch_ok) {
        for (int64_t k = gl; k < n; k += kLanes) out[k] = 0.f;
        if (gl == 0) p.scratch[scratch_sdt(p, chunk) + c] = 0.f;
      }
      return;
    }
    const int64_t seg = starts ? q.start : lo;
    for (int64_t k = gl; k < n; k += kLanes) {
      const float h0 = starts ? load_state<T>(p, q.slot0, c, k, chunk) : 0.f;
      carry(0)[k] = h0;
      if (starts && ch_ok) p.scratch[scratch_snap(p, chunk, c) + k] = h0;
    }
    __syncwarp();
    float sum_dt = 0.f;
    int buf = 0;
    for (int64_t w = seg - (seg - lo) % W; w < hi; w += W, buf ^= 1) {
      const int64_t t0 = w + gl * I;
      const uint32_t valid = range_mask<I>(t0, seg, hi);
      const bool vector = p.vec_ok && valid == kAll;
      const float part = load_inputs<T, I>(p, drow + t0, urow + t0, bias, Dc, vector, valid, dt, dtu, y);
      sum_dt += part;
      const LaneEvents ev{valid, 0, 0, kNone, kNone, h0_tab, st_tab};
      if (w >= seg && w + W <= hi)
        scan_window<T, I, kFast, true>(p, c, chunk, gl, A2row, Brow + t0, Crow + t0, carry(buf), carry(buf ^ 1), dt,
                                       dtu, y, part, ev, vector, ch_ok, staged);
      else
        scan_window<T, I, kLight, true>(p, c, chunk, gl, A2row, Brow + t0, Crow + t0, carry(buf), carry(buf ^ 1), dt,
                                        dtu, y, part, ev, vector, ch_ok, staged);
      __syncwarp();
    }
#pragma unroll
    for (int off = kLanes / 2; off > 0; off >>= 1) sum_dt += __shfl_xor_sync(0xffffffffu, sum_dt, off, kLanes);
    if (ch_ok) {
      for (int64_t k = gl; k < n; k += kLanes) out[k] = carry(buf)[k];
      if (gl == 0) p.scratch[scratch_sdt(p, chunk) + c] = sum_dt;
    }
    return;
  } else {
    const bool continues = p.chunked && lo > 0;
    const Seq row = seq_info(p, s);  // batched: the block's sequence
    if (!p.varlen && row.pad) return;  // a padding sequence: nothing read or written
    // Batched plain mode: the initial state enters as the carry of the first window (head), and the carry after
    // a last full window is the final state (tail), so those windows take the fast path (a light window costs
    // ~1.7x a fast one; they were 12% of the time at L2048).
    const bool head = !p.varlen && !p.cache_mode && lo == 0;
    const bool tail = !p.varlen && !p.cache_mode && hi == p.seqlen && (hi - lo) % W == 0;
    const int head_slot = p.chunked && hi < p.seqlen ? kSnap : row.slot0;
    for (int64_t k = gl; k < n; k += kLanes)
      carry(0)[k] = continues ? p.scratch[scratch_carry(p, chunk, c) + k]
                              : head ? load_state<T>(p, head_slot, c, k, chunk) : 0.f;
    __syncwarp();
    T* zrow = p.z == nullptr ? nullptr : static_cast<T*>(p.z) + s * p.z_stride[0] + c * p.z_stride[1];
    T* yrow = static_cast<T*>(p.delta) + s * p.delta_stride[0] + c * p.delta_stride[1];
    // The sequence holding the window's first token (the same for the whole block, as the windows are).
    int64_t cur_start = 0, cur_end = -1;
    bool cur_pad = true;
    int buf = 0;
    for (int64_t w = lo; w < hi; w += W) {
      if (w < cur_start || w >= cur_end) {
        const Seq q = find_seq(p, w, s);
        cur_start = q.start, cur_end = q.end, cur_pad = q.pad;
      }
      if (cur_pad && cur_start <= w && w + W <= cur_end) continue;  // padding: nothing to read or write
      const bool fast = !p.cache_mode && !cur_pad && (cur_start < w || (head && w == lo)) &&
                        (w + W < cur_end || (tail && w + W == hi)) && w + W <= hi;
      const int64_t t0 = w + gl * I;
      LaneEvents ev{kAll, 0, 0, kNone, kNone, h0_tab + gl * I, st_tab + gl * I};
      bool light = true;
      if (!fast) {
        // This window's events: each lane describes W / 32 consecutive tokens for the whole warp.
        __syncwarp();
        Seq q;
        q.start = 0, q.end = -1;
#pragma unroll
        for (int j = 0; j < W / 32; ++j) {
          const int64_t t = w + lane * (W / 32) + j;
          unsigned char f = 0;
          int slot0 = kNone, slot = kNone;
          if (t >= lo && t < hi) {
            if (!(q.start <= t && t < q.end)) q = find_seq(p, t, s);
            if (!q.pad) {
              f = kValid;
              if (t == q.start) f |= kReset, slot0 = (p.chunked && q.end > hi) ? kSnap : q.slot0;
              slot = t == q.end - 1 ? q.fin : p.cache_mode ? store_point(p, q, t - q.start) : kNone;
              if (slot != kNone) f |= kStore;
            }
          }
          const int at = lane * (W / 32) + j;
          h0_tab[at] = slot0, st_tab[at] = slot, flag_tab[at] = f;
        }
        __syncwarp();
        ev.valid = 0;
#pragma unroll
        for (int i = 0; i < I; ++i) {
          const unsigned char f = flag_tab[gl * I + i];
          ev.valid |= uint32_t(f & kValid) << i;
          if (f & kReset) ev.reset |= 1u << i, ev.h0_slot = h0_tab[gl * I + i];
          if (f & kStore) ev.store |= 1u << i, ev.st_slot = st_tab[gl * I + i];
        }
        light = __all_sync(0xffffffffu, __popc(ev.reset) <= 1 && __popc(ev.store) <= 1);
      }
      const uint32_t valid = ev.valid;
      const bool vector = p.vec_ok && valid == kAll;
      const float sum_dt = load_inputs<T, I>(p, drow + t0, urow + t0, bias, Dc, vector, valid, dt, dtu, y);
      Raw<T, I> rz;  // needed after the states: loaded now (an L1 prefetch still left its wait at 5% of the time)
      if (zrow != nullptr) rz.load(zrow + t0, vector, valid);
      if (t0 + W < hi) {  // the next window's inputs: their DRAM latency stalled every window (ncu: 4% of time)
        prefetch_l1(drow + t0 + W);
        prefetch_l1(urow + t0 + W);
      }
      if (fast)
        scan_window<T, I, kFast, false>(p, c, chunk, gl, A2row, Brow + t0, Crow + t0, carry(buf), carry(buf ^ 1), dt,
                                        dtu, y, sum_dt, ev, vector, ch_ok, staged);
      else if (light)
        scan_window<T, I, kLight, false>(p, c, chunk, gl, A2row, Brow + t0, Crow + t0, carry(buf), carry(buf ^ 1), dt,
                                         dtu, y, sum_dt, ev, vector, ch_ok, staged);
      else
        scan_window<T, I, kGeneral, false>(p, c, chunk, gl, A2row, Brow + t0, Crow + t0, carry(buf), carry(buf ^ 1), dt,
                                           dtu, y, sum_dt, ev, vector, ch_ok, staged);
      buf ^= 1;
      __syncwarp();
      if (!ch_ok || valid == 0) continue;
      store_items<T, I>(yrow + t0, y, vector, valid);
      if (zrow != nullptr) {
#pragma unroll
        for (int i = 0; i < I; ++i) {
          const float zv = rz.get(i);
          y[i] *= silu(zv);
        }
        store_items<T, I>(zrow + t0, y, vector, valid);
      }
    }
    // The carry was last written before the loop's final __syncwarp, which every lane passed. (No sync under
    // ch_ok: lanes past d stay in the warp and would never reach it.)
    if (tail && row.fin != kNone && ch_ok)
      for (int64_t k = gl; k < n; k += kLanes) store_state<T>(p, row.fin, c, k, carry(buf)[k]);
  }
}

// Chains the chunks of each row (a batched sequence, or the varlen token axis): the state entering chunk j
// is h_j = restart_{j-1} ? end_{j-1} : exp(A sum_dt_{j-1}) h_{j-1} + end_{j-1}. grid (ceil(d n / 256), rows).
__global__ void __launch_bounds__(256) selective_scan_carry_kernel(const SelectiveScanParams p) {
  const int64_t i = int64_t(blockIdx.x) * 256 + threadIdx.x;
  if (i >= p.dim * p.dstate) return;
  const int64_t c = i / p.dstate, k = i - c * p.dstate;
  const float A2 = __ldg(p.A + c * p.A_stride[0] + k * p.A_stride[1]) * kLog2e;
  float h = 0.f;
  for (int64_t j = 0; j < p.chunks_per_row; ++j) {
    const int64_t chunk = int64_t(blockIdx.y) * p.chunks_per_row + j;
    float* slot = p.scratch + scratch_carry(p, chunk, c) + k;
    const float end = *slot;
    *slot = h;
    const bool restart = reinterpret_cast<const int*>(p.scratch)[scratch_flag(p, chunk)] != 0;
    h = restart ? end : fmaf(ex2(A2 * p.scratch[scratch_sdt(p, chunk) + c]), h, end);
  }
}

// ---- the short kernel ----------------------------------------------------------------------------------------

// Batched, plain mode, L <= 8. grid (b * ceil(d / 8)), 128 threads: 8 channels of one sequence per block.
template <typename T>
__global__ void __launch_bounds__(kThreads) selective_scan_short_kernel(const SelectiveScanParams p) {
  constexpr int L8 = kShortMaxLen;
  const int lane = threadIdx.x & 31, gl = lane % kShortLanes;
  const int64_t blocks_per_seq = (p.dim + kThreads / kShortLanes - 1) / (kThreads / kShortLanes);
  const int64_t s = blockIdx.x / blocks_per_seq;
  const int64_t c_raw = (blockIdx.x - s * blocks_per_seq) * (kThreads / kShortLanes) + threadIdx.x / kShortLanes;
  const bool ch_ok = c_raw < p.dim;
  const int64_t c = ch_ok ? c_raw : p.dim - 1, L = p.seqlen;
  const Seq q = seq_info(p, s);
  if (q.pad) return;
  // Lane t < L reads token t; every lane then gets each token's dt and dt * u.
  const T* drow = static_cast<const T*>(p.delta) + s * p.delta_stride[0] + c * p.delta_stride[1];
  const T* urow = static_cast<const T*>(p.u) + s * p.u_stride[0] + c * p.u_stride[1];
  const float Dc = p.D != nullptr ? __ldg(p.D + c * p.D_stride) : 0.f;
  float my_dt = 0.f, my_u = 0.f;
  if (gl < L) {
    my_dt = to_float(drow[gl]) + (p.delta_bias != nullptr ? __ldg(p.delta_bias + c * p.delta_bias_stride) : 0.f);
    if (p.softplus) my_dt = softplus(my_dt);
    my_u = to_float(urow[gl]);
  }
  float dt[L8], dtu[L8], yp[L8];
#pragma unroll
  for (int t = 0; t < L8; ++t) {
    dt[t] = __shfl_sync(0xffffffffu, my_dt, t, kShortLanes);
    dtu[t] = __shfl_sync(0xffffffffu, my_dt * my_u, t, kShortLanes);
    yp[t] = 0.f;
  }
  const int64_t grp = c / p.group_size;
  const T* Brow = static_cast<const T*>(p.B) + s * p.B_stride[0] + grp * p.B_stride[1];
  const T* Crow = static_cast<const T*>(p.C) + s * p.C_stride[0] + grp * p.C_stride[1];
  const uint32_t valid = (1u << L) - 1;
  const bool vector = p.vec_ok && L == L8;
  for (int64_t k = gl; k < p.dstate; k += kShortLanes) {
    const float A2 = __ldg(p.A + c * p.A_stride[0] + k * p.A_stride[1]) * kLog2e;
    Raw<T, L8> Bk, Ck;
    Bk.load(Brow + k * p.B_stride[2], vector, valid);
    Ck.load(Crow + k * p.C_stride[2], vector, valid);
    float h = load_state<T>(p, q.slot0, c, k, 0);
#pragma unroll
    for (int t = 0; t < L8; ++t) {
      if (t < L) {
        h = fmaf(ex2(dt[t] * A2), h, dtu[t] * Bk.get(t));
        yp[t] = fmaf(Ck.get(t), h, yp[t]);
      }
    }
    if (q.fin != kNone && ch_ok) store_state<T>(p, q.fin, c, k, h);
  }
  float mine = 0.f;
#pragma unroll
  for (int t = 0; t < L8; ++t) {
#pragma unroll
    for (int off = kShortLanes / 2; off > 0; off >>= 1) yp[t] += __shfl_xor_sync(0xffffffffu, yp[t], off, kShortLanes);
    if (gl == t) mine = yp[t];
  }
  if (!ch_ok || gl >= L) return;
  const float yv = mine + Dc * my_u;
  static_cast<T*>(p.delta)[s * p.delta_stride[0] + c * p.delta_stride[1] + gl] = from_float<T>(yv);
  if (p.z != nullptr) {
    T* zp = static_cast<T*>(p.z) + s * p.z_stride[0] + c * p.z_stride[1] + gl;
    const float zv = to_float(*zp);
    *zp = from_float<T>(yv * silu(zv));
  }
}

}  // namespace cupy_ops
