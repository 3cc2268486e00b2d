"""The CUDA features our kernels use, emulated for g++ so that CI (no GPU) runs the real device code: one OS thread
per CUDA thread, __syncthreads and warp barriers as real barriers (a thread that skips one fails its case after a
timeout instead of hanging), shuffles (any width), ballots, shared atomics, `__ldg`, 2-D grids and blocks,
gridDim/blockDim, thread-block clusters (x), and a failed case for a misaligned vector load or store. Used by
topk_emulation.py, test_selective_scan_emulated.py, test_repetition_penalties_emulated.py and
test_merge_emulated.py, which add what is particular to their kernels (cp.async, cluster shared memory; exp2 and
prefetch instructions; shared memory declarations). Blocks run one after another (a cluster's together), first-first
or last-first (`run_plan(reverse_blocks=True)`): two blocks that write one place in an order CUDA does not fix show
as results that differ between the two. What it does not model: timing, warp divergence beyond the shuffles'
meeting points, memory-model subtleties, reads outside a tensor.

Also here: `CUDA_FP_HEADERS` (cuda_fp16.h, cuda_bf16.h and cuda_fp8.h as the GPU rounds, for common/dtypes.cuh),
`checked_vec_cuh`, a driver that launches kernels by name expression (`dispatch_driver`) and `run_plan`, which runs
an op's own plan through it, so a test emulates exactly the launches the op would make. Needs g++ 12 or later
(C++20, `_Float16`): `requires_gxx`."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from cupy_ops._runtime import Launch, Memset, Scratch, compiler

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
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
namespace emu {
struct Deadlock {};
inline std::atomic<bool> aborted{false};
inline std::atomic<bool> overrun{false};  // the two-pass emission wrote more than k outputs
inline bool reverse_blocks = false;       // run a grid's blocks (clusters) last-first: CUDA orders none
inline std::atomic<bool> misaligned{false};  // a load through a pointer not aligned to its type (a GPU fault)
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
inline dim3e gdim, bdim;  // one launch at a time
// A thread's place in its block (x fastest), which sets its warp and lane: blocks may be 2-D.
inline int linear_tid() { return int(tidx.x + tidx.y * bdim.x); }
}  // namespace emu
#define threadIdx (emu::tidx)
#define blockIdx (emu::bidx)
#define gridDim (emu::gdim)
#define blockDim (emu::bdim)
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
// Vector loads and stores (uint4, float4, uint2, ...) fault on a GPU unless aligned to their size: flagged, and the
// case fails. Checked: every __ldg, and vec::store (checked_vec_cuh).
template <typename T> inline T __ldg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T)) emu::misaligned = true;
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
template <typename T> inline void emu_store(T* p, const T& v) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T)) emu::misaligned = true;
  else std::memcpy(p, &v, sizeof(T));
}
using std::isinf;  // CUDA's math functions are global
using std::isnan;
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }  // CUDA's is within 2 ulp: compare with tolerance
inline float __expf(float x) { return std::exp(x); }  // the fast intrinsics, as the C library computes them
inline float __logf(float x) { return std::log(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
namespace emu {
template <typename T> inline T shuffle(T v, int src, bool own) {
  const int t = linear_tid(), warp = t >> 5;
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
  const int lane = emu::linear_tid() & 31, base = lane & ~(width - 1);
  return emu::shuffle(v, lane - d, lane - d < base);
}
template <typename T> inline T __shfl_down_sync(unsigned, T v, int d, int width = 32) {
  const int lane = emu::linear_tid() & 31, base = lane & ~(width - 1);
  return emu::shuffle(v, lane + d, lane + d >= base + width);
}
template <typename T> inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
  const int lane = emu::linear_tid() & 31;
  return emu::shuffle(v, (lane & ~(width - 1)) + (src & (width - 1)), false);
}
template <typename T> inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  const int lane = emu::linear_tid() & 31;
  return emu::shuffle(v, (lane & ~(width - 1)) | ((lane ^ mask) & (width - 1)), false);
}
namespace emu {
// f(src, v) for each of the 32 lanes (src) and the v it gave, in one meeting of the warp (lanes past the block give 0).
template <typename F> inline void warp_all(uint64_t v, F f) {
  const int t = linear_tid(), warp = t >> 5;
  cur->shfl[t] = v;
  cur->warps[warp]->wait();
  for (int src = 0; src < 32; ++src) f(src, cur->shfl[warp * 32 + src]);
  cur->warps[warp]->wait();
}
}  // namespace emu
inline unsigned __ballot_sync(unsigned, int pred) {
  unsigned bits = 0;
  emu::warp_all(pred != 0, [&](int src, uint64_t v) { bits |= unsigned(v != 0) << src; });
  return bits;
}
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == 0xffffffffu; }
inline unsigned __reduce_add_sync(unsigned, unsigned v) {
  unsigned sum = 0;
  emu::warp_all(v, [&](int, uint64_t x) { sum += unsigned(x); });
  return sum;
}
inline void __syncwarp(unsigned = 0xffffffffu) { emu::cur->warps[emu::linear_tid() >> 5]->wait(); }
namespace emu {
// kernel() on grid_x x grid_y blocks of threads x block_y, `cluster` blocks at a time (along x); 0, 1 after a deadlock,
// 3 after an overrun, 4 after a misuse, 5 after a misaligned load (STATUS in cuda_emulation.py).
template <typename F> int launch(F kernel, int grid_x, int threads, int cluster, size_t static_bytes, size_t dynamic,
                                 int grid_y = 1, int block_y = 1) {
  const int n = threads * block_y;
  aborted = false;
  overrun = false;
  misuse = false;
  misaligned = false;
  gdim = {unsigned(grid_x), unsigned(grid_y), 1};
  bdim = {unsigned(threads), unsigned(block_y), 1};
  const int clusters = (grid_x + cluster - 1) / cluster;
  for (int iy = 0; iy < grid_y && !aborted; ++iy)
  for (int ix = 0; ix < clusters && !aborted; ++ix) {
    const int cy = reverse_blocks ? grid_y - 1 - iy : iy, c0 = cluster * (reverse_blocks ? clusters - 1 - ix : ix);
    Barrier cluster_bar(n * cluster);
    Cluster cl{&cluster_bar, {}};
    std::vector<Block> blocks(cluster);
    for (auto& b : blocks) {
      b.bar = new Barrier(n);
      // a last warp of fewer than 32 threads meets as those (lanes past the block read 0 in shuffles and ballots)
      for (int w = 0; w < (n + 31) / 32; ++w) b.warps.push_back(new Barrier(std::min(32, n - 32 * w)));
      b.shfl.assign((n + 31) / 32 * 32, 0);
      b.static_bytes = (static_bytes + 15) & ~size_t(15);
      b.smem = static_cast<unsigned char*>(std::aligned_alloc(16, b.static_bytes + dynamic + 16));
      std::memset(b.smem, 0xA5, b.static_bytes + dynamic + 16);  // garbage, as real shared memory
      b.cluster = &cl;
      b.running = n;
      cl.blocks.push_back(&b);
    }
    std::vector<std::thread> pool;
    for (int r = 0; r < cluster; ++r)
      for (int t = 0; t < n; ++t)
        pool.emplace_back([&, r, t] {
          cur = &blocks[r];
          tidx = {unsigned(t % threads), unsigned(t / threads), 0};
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
  return aborted ? 1 : overrun ? 3 : misuse ? 4 : misaligned ? 5 : 0;
}
}  // namespace emu
extern "C" void emu_reverse_blocks(int on) { emu::reverse_blocks = on != 0; }
"""


# The CUDA headers common/dtypes.cuh includes (cuda_fp16.h, cuda_bf16.h, cuda_fp8.h), for the emulation: the 16-bit
# types as their bits, converted as the GPU converts: round to nearest even (g++'s _Float16 for fp16, GCC 12+), NaN
# to the canonical 0x7fff (fp16 and bf16: cvt.rn's), e4m3 with saturation to +-448 (__NV_SATFINITE). So the real
# dtypes.cuh is compiled.
_CUDA_FP = r"""
#pragma once
#include <cmath>
#include <cstring>
struct __half { unsigned short x; };
struct __nv_bfloat16 { unsigned short x; };
struct float2 { float x, y; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline __half __ushort_as_half(unsigned short v) { return __half{v}; }
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.x, 2); return static_cast<float>(f); }
inline __half __float2half_rn(float x) {
  if (std::isnan(x)) return __half{0x7fff};  // _Float16 would keep the payload (0x7e00)
  const _Float16 f = static_cast<_Float16>(x);
  __half h;
  std::memcpy(&h.x, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 x) { return __uint_as_float(unsigned(x.x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  const unsigned u = __float_as_uint(x);
  if (std::isnan(x)) return __nv_bfloat16{0x7fff};
  return __nv_bfloat16{static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
enum __nv_saturation_t { __NV_NOSAT, __NV_SATFINITE };
enum __nv_fp8_interpretation_t { __NV_E4M3, __NV_E5M2 };
using __nv_fp8_storage_t = unsigned char;
using __nv_fp8x2_storage_t = unsigned short;
// e4m3fn (bias 7, 3 mantissa bits, largest 448, no infinities), round to nearest even; only E4M3 with SATFINITE.
inline __nv_fp8_storage_t __nv_cvt_float_to_fp8(float x, __nv_saturation_t sat, __nv_fp8_interpretation_t kind) {
  if (sat != __NV_SATFINITE || kind != __NV_E4M3) std::abort();
  const unsigned char sign = std::signbit(x) ? 0x80 : 0;
  if (std::isnan(x)) return 0x7f;
  const float a = std::fabs(x);
  if (a >= 448.0f) return sign | 0x7e;
  if (a < 0x1p-6f) return sign | static_cast<unsigned char>(std::nearbyint(a * 0x1p9f));  // subnormals (8: 2^-6)
  int e;
  std::frexp(a, &e);  // a = m 2^e, m in [0.5, 1)
  float m = std::nearbyint(std::ldexp(a, 4 - e));  // 8..16: the implicit bit and 3 mantissa bits
  if (m == 16.0f) { m = 8.0f; ++e; }
  const unsigned bits = (unsigned(e - 1 + 7) << 3) | (unsigned(m) - 8u);
  return sign | static_cast<unsigned char>(bits > 0x7e ? 0x7e : bits);
}
inline __nv_fp8x2_storage_t __nv_cvt_float2_to_fp8x2(float2 v, __nv_saturation_t sat,
                                                      __nv_fp8_interpretation_t kind) {
  return static_cast<unsigned short>(__nv_cvt_float_to_fp8(v.x, sat, kind)
                                     | (__nv_cvt_float_to_fp8(v.y, sat, kind) << 8));
}
"""
CUDA_FP_HEADERS = {"cuda_fp16.h": _CUDA_FP, "cuda_bf16.h": '#pragma once\n#include "cuda_fp16.h"\n',
                   "cuda_fp8.h": '#pragma once\n#include "cuda_fp16.h"\n'}


def _gxx_major() -> int:
    """g++'s major version, 0 without one."""
    if shutil.which("g++") is None:
        return 0
    found = subprocess.run(["g++", "-dumpversion"], capture_output=True, text=True, check=False).stdout.strip()
    return int(found.split(".")[0]) if found.split(".")[0].isdigit() else 0


requires_gxx = pytest.mark.skipif(_gxx_major() < 12, reason="needs g++ 12+ (C++20, _Float16) to build the CPU "
                                                            "emulation")

# emu::launch's results
STATUS = {1: "a barrier was not reached by every thread (emulated deadlock)",
          2: "the kernel is not emulated",
          3: "the two-pass emission counted more than k selected entries",
          4: "a cluster barrier misused (a wait without an arrive, an arrive left pending) or a read of an ended "
             "CTA's shared memory",
          5: "a vector load or store through a pointer not aligned to its size (a misaligned address fault on a GPU)"}


def swap(text: str, pattern: str, replacement: str, what: str) -> str:
    """`text` with the one match of regex `pattern` replaced (a kernel source's GPU-only line rewritten for the
    emulation); fails if it is not there exactly once."""
    text, count = re.subn(pattern, replacement, text)
    assert count == 1, f"{what} changed: update the emulation"
    return text


def checked_vec_cuh() -> str:
    """common/vec.cuh with vec::store through emu_store, which flags a misaligned vector store (a g++ store would
    crash the test process or pass where the GPU faults)."""
    return swap((compiler.kernel_dir() / "common" / "vec.cuh").read_text(),
                r"\*reinterpret_cast<bits_t\*>\(ptr\) = \*reinterpret_cast<const bits_t\*>\(v\);",
                "emu_store(reinterpret_cast<bits_t*>(ptr), *reinterpret_cast<const bits_t*>(v));", "vec::store")


def check_status(status: int, what: str) -> None:
    assert status == 0, f"{what}: {STATUS.get(status, f'status {status}')}"


def dispatch_driver(source: str, params: str, kernels, *, static_bytes: int = 0) -> str:
    """C++ for build() that includes `source` and exports `int run_kernel(name, grid_x, grid_y, block_x, block_y,
    dynamic, params)`: launches the kernel (one of `kernels`) whose name expression is `name` on a copy of the
    `params` struct, with `static_bytes` of shared memory for the kernel's rewritten __shared__ declarations; 2 for
    a name not among them."""
    cases = "".join(f'  if (!std::strcmp(name, "{k.name_expression}")) return go({k.name_expression}, p, gx, gy, '
                    f"bx, by, dynamic);\n" for k in kernels)
    return (f'#include "emu_cuda.h"\n#include "{source}"\nusing namespace cupy_ops;\n'
            f"template <typename K>\nstatic int go(K kernel, const {params}* p, int gx, int gy, int bx, int by, "
            "long long dynamic) {\n"
            f"  const {params} copy = *p;\n"
            f"  return emu::launch([&] {{ kernel(copy); }}, gx, bx, 1, {static_bytes}, dynamic, gy, by);\n}}\n"
            'extern "C" int run_kernel(const char* name, int gx, int gy, int bx, int by, long long dynamic, '
            f"const {params}* p) {{\n" + cases + "  return 2;\n}\n")


def run_plan(library, op, args, *, expect=None, reverse_blocks=False) -> None:
    """`op` on CPU tensors `args`, in place, through the emulated kernels (a dispatch_driver library) of its own
    plan: every Launch (1-D or 2-D blocks and grids, no clusters) and Memset in order; Scratch buffers hold 0xFF
    bytes (uninitialised on the GPU: a kernel must not read what it has not written). `expect`: the Kernels the
    plan must launch, in order (checked before any launch). `reverse_blocks`: each grid's blocks run last-first
    (the emulation runs them one after another, first-first by default: a result that depends on the order of
    blocks shows as a difference between the two)."""
    library.emu_reverse_blocks(int(reverse_blocks))
    call, _ = op.validate(args)
    steps = op.plan(call)
    if expect is not None:
        launched = [s.kernel for s in steps if isinstance(s, Launch)]
        assert launched == list(expect), f"the plan launches {[k.name_expression for k in launched]}"
    buffers = {}

    def tensor(name):
        return buffers[name] if name in buffers else args[op.arguments.index(name)]

    for step in steps:
        if isinstance(step, Scratch):
            buffers[step.name] = torch.full((step.nbytes,), 0xFF, dtype=torch.uint8) if step.nbytes else None
            continue
        if isinstance(step, Memset):
            ctypes.memset(tensor(step.target).data_ptr(), step.value, step.nbytes)
            continue
        assert isinstance(step, Launch), f"unexpected step {step}"
        params = ctypes.create_string_buffer(step.params.size)
        step.params.pack_into(params, 0, *[0 if tensor(f.source) is None else tensor(f.source).data_ptr()
                                           for f in step.params.pointers], step.params.pack(step.values))
        grid, block = step.config.grid, step.config.block
        # clusters need a test's own driver (topk_emulation.py); a dependent launch runs as a plain one here
        assert step.config.cluster in (None, (1, 1, 1)), "run_plan launches no thread-block clusters"
        assert grid[2] == block[2] == 1, "run_plan launches 1-D or 2-D grids and blocks"
        check_status(library.run_kernel(step.kernel.name_expression.encode(), grid[0], grid[1], block[0], block[1],
                                        ctypes.c_longlong(step.config.shared_bytes), params),
                     step.kernel.name_expression)


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
