"""The CUDA features our kernels use, emulated for g++ so that CI (no GPU) runs the real device code: one OS thread
per CUDA thread, __syncthreads and warp barriers as real barriers (a thread that skips one fails its case after a
timeout instead of hanging), shuffles (any width), ballots, shared atomics, `__ldg`, 2-D grids and thread-block
clusters (x). Used by test_topk_emulated.py and test_selective_scan_emulated.py, which add what is particular to
their kernels (cp.async, cluster shared memory; exp2 and prefetch instructions). What it does not model: timing,
warp divergence beyond the shuffles' meeting points, memory-model subtleties."""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import pytest

from cupy_ops._runtime import compiler

EMU_CUDA = r"""
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
struct dim3e { unsigned x, y, z; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
namespace emu {
struct Deadlock {};
inline std::atomic<bool> aborted{false};
inline std::atomic<bool> overrun{false};  // the two-pass emission wrote more than k outputs
// A split cluster barrier misused (a wait with no arrive before it, a second arrive or a cluster_sync while one is
// pending, a thread ending with one pending) or a read of the shared memory of a CTA whose threads have all ended.
inline std::atomic<bool> misuse{false};
inline thread_local bool cluster_pending = false;  // arrived at the cluster barrier, not yet waited
inline std::atomic<long> rereads{0};      // threads that restarted their chunk (topk_row's sampled cutoff)
// A barrier whose waiters give up (and make every other waiter give up) after 120 s: a thread that skips a
// barrier the others reach fails the case instead of hanging the test run. (2048 OS threads on two busy cores
// once took over 30 s to meet: slow, not stuck.)
struct Barrier {
  std::mutex m;
  std::condition_variable cv;
  int count, waiting = 0;
  long phase = 0;
  explicit Barrier(int n) : count(n) {}
  void wait() { await(arrive()); }
  // The two halves of wait() (a split cluster barrier): arrive() returns the phase that await() waits out.
  long arrive() {
    std::lock_guard<std::mutex> lock(m);
    const long mine = phase;
    if (++waiting == count) { waiting = 0; ++phase; cv.notify_all(); }
    return mine;
  }
  void await(long mine) {
    std::unique_lock<std::mutex> lock(m);
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    while (phase == mine) {
      if (aborted) throw Deadlock{};
      if (cv.wait_until(lock, std::min(give_up, std::chrono::steady_clock::now() + std::chrono::milliseconds(50)))
          == std::cv_status::timeout && std::chrono::steady_clock::now() >= give_up) {
        aborted = true;
        throw Deadlock{};
      }
    }
  }
};
struct Cluster;
struct Block {
  Barrier* bar;
  std::vector<Barrier*> warps;
  std::vector<uint64_t> shfl;
  unsigned char* smem;  // [static | dynamic]
  size_t static_bytes;
  Cluster* cluster;
  std::atomic<int> running{0};    // threads still in the kernel
  std::atomic<bool> ended{false};  // every thread has returned: its shared memory is gone on a GPU
};
struct Cluster { Barrier* bar; std::vector<Block*> blocks; };
inline thread_local Block* cur = nullptr;
inline thread_local dim3e tidx, bidx;
}  // namespace emu
#define threadIdx (emu::tidx)
#define blockIdx (emu::bidx)
inline void __syncthreads() { emu::cur->bar->wait(); }
inline void __trap() { std::fprintf(stderr, "__trap\n"); std::abort(); }
inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(unsigned x) { return x ? __builtin_clz(x) : 32; }
// __fdividef: x / y, but 0 for 2^126 < |y| < 2^128 (the hardware's range reduction; CUDA's documentation)
inline float __fdividef(float x, float y) { return std::fabs(y) > 0x1p126f && std::isfinite(y) ? 0.f : x / y; }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline unsigned atomicOr(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_or(v); }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline int __ffsll(unsigned long long x) { return __builtin_ffsll(static_cast<long long>(x)); }
inline float __ldg(const float* p) { return *p; }
template <typename T> inline T __ldg(const T* p) { return *p; }
inline float4 __ldg(const float4* p) {
  if (reinterpret_cast<uintptr_t>(p) & 15) { std::fprintf(stderr, "misaligned float4 load\n"); std::abort(); }
  return *p;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
namespace emu {
template <typename T> inline T shuffle(T v, int src, bool own) {
  const int t = tidx.x, warp = t >> 5;
  uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  cur->shfl[t] = raw;
  cur->warps[warp]->wait();
  T out = v;
  if (!own) std::memcpy(&out, &cur->shfl[warp * 32 + src], sizeof(T));
  cur->warps[warp]->wait();
  return out;
}
}  // namespace emu
// Lane `l` of a shuffle of `width` lanes reads lane `src` of its own segment of `width` lanes (own: keep v).
template <typename T> inline T __shfl_up_sync(unsigned, T v, int d, int width = 32) {
  const int lane = emu::tidx.x & 31, base = lane & ~(width - 1);
  return emu::shuffle(v, lane - d, lane - d < base);
}
template <typename T> inline T __shfl_down_sync(unsigned, T v, int d, int width = 32) {
  const int lane = emu::tidx.x & 31, base = lane & ~(width - 1);
  return emu::shuffle(v, lane + d, lane + d >= base + width);
}
template <typename T> inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
  const int lane = emu::tidx.x & 31;
  return emu::shuffle(v, (lane & ~(width - 1)) + (src & (width - 1)), false);
}
template <typename T> inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  const int lane = emu::tidx.x & 31;
  return emu::shuffle(v, (lane & ~(width - 1)) | ((lane ^ mask) & (width - 1)), false);
}
inline unsigned __ballot_sync(unsigned, int pred) {
  unsigned bits = 0;
  for (int src = 0; src < 32; ++src) bits |= unsigned(emu::shuffle(pred != 0, src, false)) << src;
  return bits;
}
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == 0xffffffffu; }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::cur->warps[emu::tidx.x >> 5]->wait(); }
namespace emu {
// kernel() on grid_x x grid_y blocks of `threads`, `cluster` blocks at a time (along x); 0, 1 after a deadlock,
// 3 after an overrun, 4 after a misuse.
template <typename F> int launch(F kernel, int grid_x, int threads, int cluster, size_t static_bytes, size_t dynamic,
                                 int grid_y = 1) {
  aborted = false;
  overrun = false;
  misuse = false;
  for (int cy = 0; cy < grid_y && !aborted; ++cy)
  for (int c0 = 0; c0 < grid_x && !aborted; c0 += cluster) {
    Barrier cluster_bar(threads * cluster);
    Cluster cl{&cluster_bar, {}};
    std::vector<Block> blocks(cluster);
    for (auto& b : blocks) {
      b.bar = new Barrier(threads);
      for (int w = 0; w < threads / 32; ++w) b.warps.push_back(new Barrier(32));
      b.shfl.assign(threads, 0);
      b.static_bytes = (static_bytes + 15) & ~size_t(15);
      b.smem = static_cast<unsigned char*>(std::aligned_alloc(16, b.static_bytes + dynamic + 16));
      std::memset(b.smem, 0xA5, b.static_bytes + dynamic + 16);  // garbage, as real shared memory
      b.cluster = &cl;
      b.running = threads;
      cl.blocks.push_back(&b);
    }
    std::vector<std::thread> pool;
    for (int r = 0; r < cluster; ++r)
      for (int t = 0; t < threads; ++t)
        pool.emplace_back([&, r, t] {
          cur = &blocks[r];
          tidx = {unsigned(t), 0, 0};
          bidx = {unsigned(c0 + r), unsigned(cy), 0};
          try { kernel(); } catch (Deadlock&) { aborted = true; }
          if (cluster_pending) misuse = true;
          if (--blocks[r].running == 0) blocks[r].ended = true;
        });
    for (auto& th : pool) th.join();
    for (auto& b : blocks) {
      delete b.bar;
      for (auto* w : b.warps) delete w;
      std::free(b.smem);
    }
  }
  return aborted ? 1 : overrun ? 3 : misuse ? 4 : 0;
}
}  // namespace emu
"""


def build(out: Path, files: dict[str, str | None], driver: str, *, optimize: str = "-O2") -> ctypes.CDLL:
    """A shared library from `driver` (C++ that includes emu_cuda.h and the kernel sources): `files` maps paths
    under `out` to their text (an emulated header, or a kernel source rewritten for the emulation); a path mapped
    to None is copied from the package's cuda_kernels/ unchanged."""
    source = compiler.kernel_dir()
    for name, text in {**files, "emu_cuda.h": EMU_CUDA, "driver.cpp": driver}.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text((source / name).read_text() if text is None else text)
    library = out / "libemulated.so"
    built = subprocess.run(["g++", "-std=c++20", optimize, "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas",
                            f"-I{out}", str(out / "driver.cpp"), "-o", str(library)], capture_output=True, text=True,
                           check=False)
    if built.returncode:
        pytest.fail(f"g++ failed on the emulation:\n{built.stderr[-3000:]}", pytrace=False)
    return ctypes.CDLL(str(library))
