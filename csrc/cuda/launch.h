// The GPU side of the single-source kernels: one __global__ wrapper that runs a body on every thread, the launcher
// the planners call, and the launch limits of the current device. Included by the .cu files only.
#pragma once
#include <cuda_runtime.h>

#include <atomic>

#include "single_source.h"

namespace lightning_vis {
namespace gpu {

template <class K>
__global__ void __launch_bounds__(kThreads) run_kernel(const K k) {
  k(Thread{blockIdx.x, threadIdx.x, gridDim.x, blockDim.x});
}

struct CudaLaunch {
  cudaStream_t stream;
  template <class K>
  void operator()(const K& k, const Plan& p) const {
    run_kernel<K><<<static_cast<unsigned>(p.blocks), p.threads, 0, stream>>>(k);
  }
};

// Grids are capped at 32 blocks of 256 threads per multiprocessor (four waves at full occupancy): grid-stride loops
// cover the rest.
inline Limits device_limits() {
  static std::atomic<int> sms[64];
  int dev = 0;
  Limits lim;
  if (cudaGetDevice(&dev) != cudaSuccess) return lim;
  int n = (dev >= 0 && dev < 64) ? sms[dev].load(std::memory_order_relaxed) : 0;
  if (n == 0) {
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) return lim;
    if (dev >= 0 && dev < 64) sms[dev].store(n, std::memory_order_relaxed);
  }
  lim.max_blocks = int64_t(n) * 32;
  return lim;
}

}  // namespace gpu
}  // namespace lightning_vis
