// selective_scan.cu's chunk kernel one window at a time: a lane's item mask (range_mask), the 8-lane scan of
// (decay, value) pairs (scan_pairs), the fast windows' states two at a time (fast_states, their B and C staged by
// stage_states), the fast, light and general windows (WindowMode, LaneEvents, scan_window) and the inputs' loads
// (load_inputs). Included by selective_scan.cu after SelectiveScanParams, its constants (kLanes, kStage, kNone, ...),
// softplus and selective_scan_seq.cuh (load_state, store_state), which it uses; not a standalone header.
#pragma once

namespace cupy_ops {

// ---- the chunk kernel's windows ------------------------------------------------------------------------------

// Bits [first, last) of an I-bit mask: the items of a lane whose tokens lie in [lo, hi).
template <int I>
__device__ __forceinline__ uint32_t range_mask(int64_t t0, int64_t lo, int64_t hi) {
  const int64_t first = lo > t0 ? lo - t0 : 0, last = hi - t0 < I ? hi - t0 : I;
  if (first >= last) return 0;
  return (last - first >= 32 ? ~0u : ((1u << (last - first)) - 1)) << first;
}

// Inclusive scan of (decay, value) pairs over the kLanes lanes of a channel: (a, b) follows (pa, pb) as
// h -> a (pa h + pb) + b. At the step of offset `off` a lane's pair covers lanes gl - off + 1 .. gl; it takes in
// the pair `off` lanes left only while reach >= off. reach = gl, or (windows with sequence starts) the distance to
// the lane's latest start lane: a pair holding a start is h -> b, so it must not read pb (0 * NaN = NaN), and its
// a is never read again (the sweep and the carry select b alone past a start). S pairs (states) at once: their
// shuffles are in flight together.
template <int S>
__device__ __forceinline__ void scan_pairs(float (&a)[S], float (&b)[S], int reach) {
#pragma unroll
  for (int off = 1; off < kLanes; off <<= 1) {
    float pa[S], pb[S];
#pragma unroll
    for (int s = 0; s < S; ++s) {
      pa[s] = __shfl_up_sync(0xffffffffu, a[s], off, kLanes);
      pb[s] = __shfl_up_sync(0xffffffffu, b[s], off, kLanes);
    }
    if (reach >= off) {
#pragma unroll
      for (int s = 0; s < S; ++s) b[s] = fmaf(a[s], pb[s], b[s]), a[s] *= pa[s];
    }
  }
}
__device__ __forceinline__ void scan_pairs(float& a, float& b, int reach) {
  float as[1] = {a}, bs[1] = {b};
  scan_pairs<1>(as, bs, reach);
  a = as[0], b = bs[0];
}

// A fast window's states S at a time (S = 2: two independent chains a lane, interleaved from the exps to the
// sweep; one state's chain alone left the 2 warps a scheduler waiting on the MUFU results, the 16-step fold and
// sweep and the shuffles: b1 d4096 n16 L2048 171 -> 158 us). STAGED: B and C come as float from the block's
// staging area (stage_states; Bst/Cst: this lane's first float4 of state k), else they are loaded here from
// global memory (registers leave no room to hold the next states'; prefetching those into L1 instead was
// slower: L2048 153 -> 191 us, n128 955 -> 1161).
template <typename T, int I, int S, bool PASS1, bool STAGED>
__device__ __forceinline__ void fast_states(const SelectiveScanParams& p, int64_t k, int gl, const float* A2row,
                                            const T* Brow, const T* Crow, const float4* Bst, const float4* Cst,
                                            const float* carry_in, float* carry_out, const float (&dt)[I],
                                            const float (&dtu)[I], float (&y)[I], float sum_dt, bool vector) {
  constexpr uint32_t kAll = (1u << I) - 1;
  Raw<T, I> Bs[S], Cs[S];
  float A2[S], hin[S], a[S][I], b[S][I], fa[S], fb[S];
#pragma unroll
  for (int s = 0; s < S; ++s) {
    if constexpr (!STAGED) {
      Bs[s].load(Brow + s * p.B_stride[2], vector, kAll);
      if constexpr (!PASS1) Cs[s].load(Crow + s * p.C_stride[2], vector, kAll);
    }
    A2[s] = A2row[k + s];
    hin[s] = carry_in[k + s];
    fb[s] = 0.f;
  }
  // item i of state s: B (or C) as float
  const auto item = [&](const Raw<T, I>& raw, const float4* st, int s, int i) {
    if constexpr (STAGED) {
      const float4 v = st[s * staged_quads<I>() + (i >> 2) * kLanes];
      return (i & 3) == 0 ? v.x : (i & 3) == 1 ? v.y : (i & 3) == 2 ? v.z : v.w;
    } else {
      return raw.get(i);
    }
  };
#pragma unroll
  for (int i = 0; i < I; ++i) {
#pragma unroll
    for (int s = 0; s < S; ++s) {
      a[s][i] = ex2(dt[i] * A2[s]);
      b[s][i] = dtu[i] * item(Bs[s], Bst, s, i);
      fb[s] = fmaf(a[s][i], fb[s], b[s][i]);
    }
  }
#pragma unroll
  for (int s = 0; s < S; ++s) fa[s] = ex2(A2[s] * sum_dt);
  scan_pairs<S>(fa, fb, gl);
  if constexpr (PASS1) {
    if (gl == kLanes - 1) {
#pragma unroll
      for (int s = 0; s < S; ++s) carry_out[k + s] = fmaf(fa[s], hin[s], fb[s]);
    }
  } else {
    float h[S];
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const float ea = __shfl_up_sync(0xffffffffu, fa[s], 1, kLanes);
      const float eb = __shfl_up_sync(0xffffffffu, fb[s], 1, kLanes);
      h[s] = gl == 0 ? hin[s] : fmaf(ea, hin[s], eb);
    }
#pragma unroll
    for (int i = 0; i < I; ++i) {
#pragma unroll
      for (int s = 0; s < S; ++s) {
        h[s] = fmaf(a[s][i], h[s], b[s][i]);
        y[i] = fmaf(item(Cs[s], Cst, s, i), h[s], y[i]);
      }
    }
    if (gl == kLanes - 1) {
#pragma unroll
      for (int s = 0; s < S; ++s) carry_out[k + s] = h[s];
    }
  }
}

// The B (and C) of states k0 .. k0 + m - 1 of a fast window, as float, into the block's staging area: thread t
// loads lane t % kLanes's items of state k0 + t / kLanes, which every channel of the block shares (stage_bc), and
// unpacks them once, where each of the block's 16 channels' lanes did so for itself: 32 of the ~250 warp
// instructions of a state were those unpacks, and ~15% of the stall samples waited on B from L2 (ncu, b1 d4096
// n16 L2048). Layout: state s's float4 q of lane l at s * staged_quads + q * kLanes + l, so a channel's 8 lanes read
// 128 contiguous bytes. The caller places the barriers.
template <typename T, int I, bool PASS1>
__device__ __forceinline__ void stage_states(const SelectiveScanParams& p, const T* Brow, const T* Crow, int64_t k0,
                                             int64_t m, float4* Bst, float4* Cst, bool vector) {
  constexpr uint32_t kAll = (1u << I) - 1;
  const int s = threadIdx.x / kLanes, at = s * staged_quads<I>() + threadIdx.x % kLanes;
  if (s >= m) return;
  const auto stage = [&](const T* row, int64_t stride, float4* dst) {
    Raw<T, I> raw;
    raw.load(row + (k0 + s) * stride, vector, kAll);
#pragma unroll
    for (int q = 0; q < I / 4; ++q)
      dst[at + q * kLanes] = make_float4(raw.get(4 * q), raw.get(4 * q + 1), raw.get(4 * q + 2), raw.get(4 * q + 3));
  };
  stage(Brow, p.B_stride[2], Bst);
  if constexpr (!PASS1) stage(Crow, p.C_stride[2], Cst);
}

// How a window is scanned. kFast: every item valid, no events. kLight: any valid mask, and each lane has at most
// one sequence start and one state to store among its items (the start's initial state is loaded once a state,
// and the stored h is picked by selects: ~1.7x a fast window, ncu). kGeneral: any events (sequences shorter than a
// lane's items), each read and written at its item (~7x a fast window at n = 16, ncu).
enum WindowMode { kFast, kLight, kGeneral };

// A lane's events in one window: masks of its I items, and its entries of the warp's event table (shared
// memory; volatile: read at each event, never hoisted out of the state loop, as 16 slots and their addresses
// would each take registers). kLight: h0_slot / st_slot are the slots of the lane's one start and one store.
struct LaneEvents {
  uint32_t valid, reset, store;
  int h0_slot, st_slot;
  const volatile int* h0_tab;
  const volatile int* st_tab;
};

// One window of one lane: tokens t0 .. t0 + I - 1 of channel c. PASS1: fold into the carry only (no y). A2row:
// the channel's A log2 e (shared memory). kFast windows go to fast_states, two states at a time.
// Invalid items have dt = 0 and dt u = 0 (load_inputs) and B = 0, so they are the identity (a = 1, b = 0).
template <typename T, int I, WindowMode MODE, bool PASS1>
__device__ __forceinline__ void scan_window(const SelectiveScanParams& p, int64_t c, int64_t chunk, int gl,
                                            const float* A2row, const T* Brow, const T* Crow,
                                            const float* carry_in, float* carry_out, const float (&dt)[I],
                                            const float (&dtu)[I], float (&y)[I], float sum_dt,
                                            const LaneEvents& ev, bool vector, bool ch_ok, float4* staged) {
  const int64_t n = p.dstate;
  if constexpr (MODE == kFast) {
    if (p.stage_bc) {  // uniform over the block, as fast windows are: its barriers are reached by every thread
      const float4* Bl = staged + gl;
      const float4* Cl = staged + kStage * staged_quads<I>() + gl;
      for (int64_t k0 = 0; k0 < n; k0 += kStage) {
        const int64_t m = n - k0 < kStage ? n - k0 : kStage;
        __syncthreads();  // the previous states' B and C are read
        stage_states<T, I, PASS1>(p, Brow, Crow, k0, m, staged, staged + kStage * staged_quads<I>(), vector);
        __syncthreads();
        int s = 0;
        for (; s + 1 < m; s += 2)
          fast_states<T, I, 2, PASS1, true>(p, k0 + s, gl, A2row, Brow, Crow, Bl + s * staged_quads<I>(),
                                            Cl + s * staged_quads<I>(), carry_in, carry_out, dt, dtu, y, sum_dt,
                                            vector);
        if (s < m)
          fast_states<T, I, 1, PASS1, true>(p, k0 + s, gl, A2row, Brow, Crow, Bl + s * staged_quads<I>(),
                                            Cl + s * staged_quads<I>(), carry_in, carry_out, dt, dtu, y, sum_dt,
                                            vector);
      }
      return;
    }
    int64_t k = 0;
    for (; k + 1 < n; k += 2, Brow += 2 * p.B_stride[2], Crow += 2 * p.C_stride[2])
      fast_states<T, I, 2, PASS1, false>(p, k, gl, A2row, Brow, Crow, nullptr, nullptr, carry_in, carry_out, dt, dtu,
                                         y, sum_dt, vector);
    if (k < n)
      fast_states<T, I, 1, PASS1, false>(p, k, gl, A2row, Brow, Crow, nullptr, nullptr, carry_in, carry_out, dt, dtu,
                                         y, sum_dt, vector);
  } else {
    const uint32_t valid = ev.valid;
    // kLight: the next state's B and C are in flight during this one (C loaded in its state stalled 4%). kGeneral
    // (windows of several sequence starts a lane: rare) loads them in their state, for registers (sm_80 spilled).
    constexpr bool kAhead = MODE == kLight;
    Raw<T, I> Bn, Cn;
    if (kAhead && n > 0) {
      Bn.load(Brow, vector, valid);
      if constexpr (!PASS1) Cn.load(Crow, vector, valid);
    }
    // Sequence starts drop the carried state by selects, never by a zero decay: 0 * NaN and 0 * inf are NaN, so
    // a product would leak a non-finite state of one sequence into the next. Starts are flags (ev.reset and the
    // channel's start lanes), not a == 0: a decay that underflows to 0 inside a sequence must still pass its NaN
    // on. Pass 1's windows (it folds a chunk's tail from the sequence's start) have no starts.
    int reach = gl;             // scan_pairs: gl, or the distance to this lane's latest start lane
    bool start_before = false;  // a sequence starts in a lane left of this one: its first state ignores the carry
    if constexpr (!PASS1) {
      // The warp's 4 channels share the window's events: this channel's 8 lanes are its byte of the ballot.
      static_assert(kLanes == 8, "a channel's lanes are one byte of the warp's ballot");
      const uint32_t lanes = __ballot_sync(0xffffffffu, ev.reset != 0) >> (threadIdx.x & 24) & 0xffu;
      const uint32_t upto = lanes & ((2u << gl) - 1);
      reach = upto != 0 ? gl - (31 - __clz(upto)) : gl;
      start_before = (lanes & ((1u << gl) - 1)) != 0;
    }
    for (int64_t k = 0; k < n; ++k) {
      Raw<T, I> Bk, Ck;
      const float A2 = A2row[k];
      if constexpr (kAhead) {
        Bk = Bn, Ck = Cn;
        if (k + 1 < n) {
          Bn.load(Brow + (k + 1) * p.B_stride[2], vector, valid);
          if constexpr (!PASS1) Cn.load(Crow + (k + 1) * p.C_stride[2], vector, valid);
        }
      } else {
        Bk.load(Brow + k * p.B_stride[2], vector, valid);
        if constexpr (!PASS1) Ck.load(Crow + k * p.C_stride[2], vector, valid);
      }
      float h0 = 0.f;  // kLight: the initial state of the sequence starting in this lane's items
      if constexpr (MODE == kLight) {
        if (ev.h0_slot != kNone) h0 = load_state<T>(p, ev.h0_slot, c, k, chunk);
      }
      // sweep 1: decays and inputs of the lane's tokens, folded into one pair
      float a[I], b[I], fa = 1.f, fb = 0.f;
#pragma unroll
      for (int i = 0; i < I; ++i) {
        a[i] = ex2(dt[i] * A2);
        b[i] = dtu[i] * Bk.get(i);
        if constexpr (MODE == kLight) {  // a sequence starts: its initial state takes the place of the fold so far
          fb = fmaf(a[i], ev.reset >> i & 1 ? h0 : fb, b[i]);
        } else {
          if (!(valid >> i & 1)) a[i] = 1.f;
          if (ev.reset >> i & 1) {  // the item becomes h -> b[i] (decay 0), and the fold so far is dropped
            b[i] = fmaf(a[i], load_state<T>(p, ev.h0_tab[i], c, k, chunk), b[i]);
            a[i] = 0.f;
            fb = 0.f;
          }
          fa *= a[i];
          fb = fmaf(a[i], fb, b[i]);
        }
      }
      // The lane's decay: exp(A sum dt) (invalid items add 0). Past a sequence start it is never read (scan_pairs).
      if constexpr (MODE == kLight) fa = ex2(A2 * sum_dt);
      scan_pairs(fa, fb, reach);
      if constexpr (PASS1) {
        if (gl == kLanes - 1) carry_out[k] = fmaf(fa, carry_in[k], fb);
        continue;
      }
      // sweep 2: the state entering the lane's first token, then h and y token by token
      float ea = __shfl_up_sync(0xffffffffu, fa, 1, kLanes), eb = __shfl_up_sync(0xffffffffu, fb, 1, kLanes);
      if (gl == 0) ea = 1.f, eb = 0.f;
      float h = start_before ? eb : fmaf(ea, carry_in[k], eb), h_store = 0.f;
#pragma unroll
      for (int i = 0; i < I; ++i) {
        if constexpr (MODE == kLight) h = fmaf(a[i], ev.reset >> i & 1 ? h0 : h, b[i]);
        else h = ev.reset >> i & 1 ? b[i] : fmaf(a[i], h, b[i]);
        y[i] = fmaf(Ck.get(i), h, y[i]);
        if constexpr (MODE == kLight) {
          if (ev.store >> i & 1) h_store = h;
        } else {
          if ((ev.store >> i & 1) && ch_ok) store_state<T>(p, ev.st_tab[i], c, k, h);
        }
      }
      if constexpr (MODE == kLight) {
        if (ev.st_slot != kNone && ch_ok) store_state<T>(p, ev.st_slot, c, k, h_store);
      }
      if (gl == kLanes - 1) carry_out[k] = h;
    }
  }
}

// Loads the lane's delta and u, and sets dt (softplus'd), dt * u and y = D u; invalid items get zeros.
template <typename T, int I>
__device__ __forceinline__ float load_inputs(const SelectiveScanParams& p, const T* drow, const T* urow,
                                             float bias, float Dc, bool vector, uint32_t valid, float (&dt)[I],
                                             float (&dtu)[I], float (&y)[I]) {
  Raw<T, I> rd, ru;
  rd.load(drow, vector, valid);
  ru.load(urow, vector, valid);
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < I; ++i) {
    float d = rd.get(i) + bias;
    if (p.softplus) d = softplus(d);
    const bool ok = valid >> i & 1;
    dt[i] = ok ? d : 0.f;
    dtu[i] = ok ? d * ru.get(i) : 0.f;
    y[i] = ok ? Dc * ru.get(i) : 0.f;
    sum += dt[i];
  }
  return sum;
}

}  // namespace cupy_ops
