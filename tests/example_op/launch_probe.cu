// Kernels that report how they were launched, for the launcher's GPU tests (tests/test_launcher_gpu.py).
#include "common/types.cuh"

namespace launch_probe {

struct ProbeParams {
  unsigned int* out;        // [blocks * threads_per_block * 4]: block, thread, cluster rank, cluster size
  unsigned int* counter;    // one word, zero before the launch (co-residency barrier)
  unsigned int* failures;   // one word: blocks that timed out at the barrier
  long long shared_words;   // dynamic shared memory in 4-byte words
  long long spin_cycles;    // barrier time-out; 0: no barrier
};

__device__ __forceinline__ unsigned int cluster_special(bool size) {
  unsigned int value = size ? 1u : 0u;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (size) asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(value));
  else asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(value));
#endif
  return value;
}

// Every thread writes its linear block and thread index and its place in the cluster; with shared memory, each
// block writes then reads back every word of it (a word it cannot reach faults under memcheck); with a barrier,
// every block waits until all blocks have arrived (they must all be resident at once) or times out.
__global__ void probe_kernel(const ProbeParams p) {
  extern __shared__ unsigned int shared[];
  __shared__ unsigned int fixed[2048];  // 8 KiB of static shared memory: the dynamic limit is 40 KiB without opt-in
  const unsigned int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned int thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned int threads = blockDim.x * blockDim.y * blockDim.z;
  unsigned int ok = 1;
  for (long long i = thread; i < p.shared_words; i += threads) shared[i] = block ^ static_cast<unsigned int>(i);
  for (unsigned int i = thread; i < 2048; i += threads) fixed[i] = ~block ^ i;
  __syncthreads();
  for (long long i = thread; i < p.shared_words; i += threads) ok &= shared[i] == (block ^ static_cast<unsigned int>(i));
  for (unsigned int i = thread; i < 2048; i += threads) ok &= fixed[i] == (~block ^ i);
  if (p.spin_cycles > 0 && thread == 0) {
    const unsigned int blocks = gridDim.x * gridDim.y * gridDim.z;
    atomicAdd(p.counter, 1u);
    const long long start = clock64();
    while (atomicAdd(p.counter, 0u) < blocks) {
      if (clock64() - start > p.spin_cycles) {
        atomicAdd(p.failures, 1u);
        break;
      }
    }
  }
  unsigned int* mine = p.out + 4ull * (static_cast<unsigned long long>(block) * threads + thread);
  mine[0] = block;
  mine[1] = ok ? thread : 0xFFFFFFFFu;
  mine[2] = cluster_special(false);
  mine[3] = cluster_special(true);
}

}  // namespace launch_probe
