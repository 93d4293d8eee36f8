// What lets one kernel source compile twice: as CUDA device code (nvcc, pool_kernel.cu / fft_image_kernel.cu) and as
// host C++ for the CUDA-semantics simulator (csrc/sim/cuda_sim.cpp, a test-only build with LV_CUDA_SIM defined).
//
// A kernel is a struct (its parameters, passed by value to the launch) with an
//   LV_HOST_DEVICE void operator()(const Thread&) const
// the body of one thread, given its (blockIdx.x, threadIdx.x, gridDim.x, blockDim.x). On the GPU run_kernel<K>
// calls it once per thread; the simulator calls it for every block and thread of the same launch configuration.
// Every global-memory access of a body goes through ld / st / ld_vec / st_vec below: plain accesses on the GPU,
// checked by the simulator (inside a tensor of the launch, aligned, never a write to an input, every output element
// written exactly once). LV_PATH(p) counts, in the simulator only, that a body took the branch p: the tests read the
// counts back to prove that each fast path ran. No torch header here: nvcc compiles this quickly.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "../pool_geometry.h"  // LV_HOST_DEVICE

#if defined(__CUDACC__) || defined(LV_SIM_CUDA_HEADERS)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#else
#include "fp16_host_shim.h"  // a simulator build without a CUDA toolkit: __half / __nv_bfloat16 on the host
#endif

#if defined(__CUDACC__)
#define LV_UNROLL _Pragma("unroll")
#else
#define LV_UNROLL _Pragma("GCC unroll 16")
#endif

namespace lightning_vis {
namespace gpu {

// The branches a kernel body can take. LV_PATH(name) marks one; the simulator counts them by name.
#define LV_KERNEL_PATHS(X)                                                                                         \
  X(pool_generic)          /* one output per thread, any geometry and layout */                                    \
  X(pool_s2_k2)            /* planar, W window 2 stride 2: a group of outputs of one row per thread */           \
  X(pool_s2_k3)            /* planar, W window 3 stride 2 padding 1 */                                            \
  X(pool_s2_fixed_rows)    /* ... the window along T and H fixed at compile time (2x2, 2x2x2, 3x3) */             \
  X(pool_s2_vec_load)      /* ... a window row of the group read with 16-byte loads */                            \
  X(pool_s2_scalar_load)   /* ... read cell by cell (row edge, padding, misaligned row) */                        \
  X(pool_s2_vec_store)     /* ... the group's values and switches written with vector stores */                   \
  X(pool_s2_scalar_store)  /* ... written cell by cell (row tail, misaligned) */                                  \
  X(pool_cl_vec)           /* channels last: 16 bytes of channels per thread */                                   \
  X(unpool_generic)        /* one cell per thread, any geometry and layout */                                     \
  X(unpool_s2_k2)          /* planar, W window 2 stride 2: a group of cells of one row per thread */             \
  X(unpool_s2_k3)          /* planar, W window 3 stride 2 padding 1 */                                            \
  X(unpool_s2_fixed_rows)  /* ... the window along T and H fixed at compile time */                               \
  X(unpool_s2_vec_load)    /* ... the pooled values and switches of a covering row read with vector loads */      \
  X(unpool_s2_scalar_load) /* ... read one by one */                                                              \
  X(unpool_s2_vec_store)   /* ... the group's cells written with 16-byte stores */                                \
  X(unpool_s2_scalar_store)                                                                                        \
  X(unpool_cl_vec)         /* channels last: 16 bytes of channels per thread */                                  \
  X(gather_generic)        /* one output per thread */                                                            \
  X(gather_rows)           /* planar: a group of outputs of one row per thread */                                 \
  X(gather_rows_vec)       /* ... switches read and values written with vector accesses */                        \
  X(gather_cl_vec)         /* channels last: 16 bytes of channels per thread */                                   \
  X(fft_mix_vec)           /* fft_image colour mix + sigmoid: 16 bytes of pixels per channel per thread */        \
  X(fft_mix_scalar)        /* ... pixel by pixel (image tail, misaligned plane) */                                \
  X(fft_mix_back_vec)                                                                                              \
  X(fft_mix_back_scalar)

enum class Path : int {
#define LV_PATH_ENUM(name) name,
  LV_KERNEL_PATHS(LV_PATH_ENUM)
#undef LV_PATH_ENUM
      count
};

}  // namespace gpu

#if defined(LV_CUDA_SIM)
namespace sim {
// Defined by the simulator: checks one access of `bytes` bytes at p (alignment `align`), counts writes; throws on a
// fault. count_path counts a branch taken.
void check_access(const void* p, std::size_t bytes, std::size_t align, bool write);
void count_path(gpu::Path path);
}  // namespace sim
#define LV_ACCESS(p, bytes, align, write) ::lightning_vis::sim::check_access(p, bytes, align, write)
#define LV_PATH(name) ::lightning_vis::sim::count_path(::lightning_vis::gpu::Path::name)
#else
#define LV_ACCESS(p, bytes, align, write) ((void)0)
#define LV_PATH(name) ((void)0)
#endif

namespace gpu {

// blockIdx.x, threadIdx.x, gridDim.x, blockDim.x of one thread of a 1D launch.
struct Thread {
  uint32_t block, thread, grid, block_dim;
};

// First index and stride of a grid-stride loop, in the index type I.
template <typename I>
LV_HOST_DEVICE I first_item(const Thread& t) {
  return static_cast<I>(t.block) * static_cast<I>(t.block_dim) + static_cast<I>(t.thread);
}
template <typename I>
LV_HOST_DEVICE I grid_stride(const Thread& t) {
  return static_cast<I>(t.grid) * static_cast<I>(t.block_dim);
}

// N values of T in one aligned access (16 bytes for the data, fewer for switches): nvcc emits one vector load/store.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T>
LV_HOST_DEVICE T ld(const T* p) {
  LV_ACCESS(p, sizeof(T), alignof(T), false);
  return *p;
}
template <typename T>
LV_HOST_DEVICE void st(T* p, T v) {
  LV_ACCESS(p, sizeof(T), alignof(T), true);
  *p = v;
}
template <int N, typename T>
LV_HOST_DEVICE Vec<T, N> ld_vec(const T* p) {
  LV_ACCESS(p, sizeof(T) * N, sizeof(T) * N, false);
  return *reinterpret_cast<const Vec<T, N>*>(p);
}
template <int N, typename T>
LV_HOST_DEVICE void st_vec(T* p, const Vec<T, N>& v) {
  LV_ACCESS(p, sizeof(T) * N, sizeof(T) * N, true);
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}
LV_HOST_DEVICE bool is_aligned(const void* p, std::size_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

// Arithmetic type of a storage type, and the conversions (the host-side ones of cuda_fp16.h / cuda_bf16.h in the
// simulator).
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
LV_HOST_DEVICE float to_acc(float v) { return v; }
LV_HOST_DEVICE double to_acc(double v) { return v; }
LV_HOST_DEVICE float to_acc(__half v) { return __half2float(v); }
LV_HOST_DEVICE float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
LV_HOST_DEVICE T from_acc(typename Acc<T>::type v) {
  return static_cast<T>(v);
}
template <>
LV_HOST_DEVICE __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
LV_HOST_DEVICE __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename A>
LV_HOST_DEVICE A neg_inf() {
  return -static_cast<A>(INFINITY);
}

LV_HOST_DEVICE float exp_(float v) {
#if defined(__CUDA_ARCH__)
  return expf(v);
#else
  return std::exp(v);
#endif
}
LV_HOST_DEVICE double exp_(double v) {
#if defined(__CUDA_ARCH__)
  return ::exp(v);
#else
  return std::exp(v);
#endif
}

// Division by a divisor fixed for the launch. int32_t: a multiply-high and a shift (Granlund-Montgomery, as
// PyTorch's IntDivider; exact for 0 <= n < 2^31 and 1 <= d < 2^31), no hardware division. int64_t: plain division.
template <typename I>
struct Div {
  I d = 1;
  Div() = default;
  explicit Div(int64_t divisor) : d(static_cast<I>(divisor)) {}
  LV_HOST_DEVICE I div(I n) const { return n / d; }
};

template <>
struct Div<int32_t> {
  uint32_t d = 1, m = 1, shift = 0;
  Div() = default;
  explicit Div(int64_t divisor) : d(static_cast<uint32_t>(divisor)) {
    shift = 0;
    while (shift < 32 && (uint64_t(1) << shift) < d) ++shift;
    m = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1);
  }
  LV_HOST_DEVICE int32_t div(int32_t n) const {
    const uint32_t u = static_cast<uint32_t>(n);
#if defined(__CUDA_ARCH__)
    const uint32_t t = __umulhi(u, m);
#else
    const uint32_t t = static_cast<uint32_t>((static_cast<uint64_t>(u) * m) >> 32);
#endif
    return static_cast<int32_t>((t + u) >> shift);
  }
};

// q = n / d and r = n - q * d.
template <typename I>
LV_HOST_DEVICE I divmod(const Div<I>& d, I n, I& r) {
  const I q = d.div(n);
  r = n - q * static_cast<I>(d.d);
  return q;
}

// Launch shape of one kernel, chosen by the planners of pool_kernels.h / fft_image_kernels.h and reported by the
// simulator (the tests check the index type, the grid and the vector width of what ran).
struct Plan {
  const char* kernel = "";
  const char* shape = "";  // what a body fixes at compile time beyond its name (e.g. "3x3"), or ""
  int index_bits = 32;  // 32 or 64: the index type of the body
  int vec = 1;          // elements per vector access of the data (16 bytes / element size on a vector path)
  int64_t work = 0;     // work items (outputs, groups of outputs, ...) the grid-stride loop covers
  int64_t blocks = 1;
  int threads = 256;
};

// Launch limits: the grid the real launcher would choose is capped at max_blocks (the device's multiprocessors
// times a few waves); the simulator can also force a tiny grid (grid-stride loops then stride) and the 64-bit index
// path on small tensors.
struct Limits {
  int64_t max_blocks = 132 * 32;
  bool force_int64 = false;
};

constexpr int kThreads = 256;

inline int64_t blocks_for(int64_t work, const Limits& lim) {
  int64_t b = (work + kThreads - 1) / kThreads;
  if (b > lim.max_blocks) b = lim.max_blocks;
  return b > 0 ? b : 1;
}

inline Plan make_plan(const char* kernel, int index_bits, int vec, int64_t work, const Limits& lim,
                      const char* shape = "") {
  Plan p;
  p.kernel = kernel;
  p.shape = shape;
  p.index_bits = index_bits;
  p.vec = vec;
  p.work = work;
  p.blocks = blocks_for(work, lim);
  p.threads = kThreads;
  return p;
}

template <typename T>
struct Tag {
  using type = T;
};

}  // namespace gpu
}  // namespace lightning_vis
