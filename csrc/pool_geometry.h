// Plain description of one pooling problem, shared by the C++ and CUDA kernels.
// No torch headers here: the .cu files include this and nothing heavy.
//
// Every problem is canonicalised to 3 spatial dims (T, H, W): a 1D pool is (1, 1, L) with kernel
// (1, 1, k), a 2D pool is (1, H, W). A switch is the offset of the chosen cell inside its window,
// (it * kh + ih) * kw + iw, so unit dims change nothing.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LV_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LV_HOST_DEVICE inline
#endif

namespace lightning_vis {

struct PoolGeom {
  int64_t N = 0, C = 0;
  int64_t in[3] = {1, 1, 1};   // pooled input (T, H, W)
  int64_t out[3] = {1, 1, 1};  // pooled output (T, H, W)
  int64_t k[3] = {1, 1, 1};
  int64_t s[3] = {1, 1, 1};
  int64_t p[3] = {0, 0, 0};
  int64_t d[3] = {1, 1, 1};
  // Memory layout of every tensor of the problem: planar is (N, C, T, H, W) dense,
  // channels_last is (N, T, H, W, C) dense.
  bool channels_last = false;

  LV_HOST_DEVICE int64_t window() const { return k[0] * k[1] * k[2]; }
  LV_HOST_DEVICE int64_t in_plane() const { return in[0] * in[1] * in[2]; }
  LV_HOST_DEVICE int64_t out_plane() const { return out[0] * out[1] * out[2]; }
};

// First tap index along one dim whose position start + i * d is >= 0. torch's kernels start their
// scan (and their default index for an all -inf window) there, so we do too.
LV_HOST_DEVICE int64_t first_nonnegative_tap(int64_t start, int64_t dil) {
  return start >= 0 ? 0 : (-start + dil - 1) / dil;
}

// One past the last tap index whose position start + i * d is < size (at most k).
LV_HOST_DEVICE int64_t end_tap(int64_t start, int64_t dil, int64_t size, int64_t k) {
  if (start >= size) return 0;
  int64_t n = (size - 1 - start) / dil + 1;
  return n < k ? n : k;
}

namespace gpu {
// Element types of the GPU kernels' tensors (the data; the switches: uint8 up to 255 window cells, else int32).
enum class Dtype { F32, F64, F16, BF16 };
enum class SwitchDtype { U8, I32 };
}  // namespace gpu

}  // namespace lightning_vis
