// GPU kernels of the fft_image operator: one thread per pixel of one image, all channels of that pixel.
#include "fft_image_kernel.h"

namespace lightning_vis {
namespace gpu {
namespace {

template <typename T>
__device__ __forceinline__ T sigm(T v) {
  return T(1) / (T(1) + exp(-v));
}

template <typename T>
__global__ void mix_kernel(const T* __restrict__ img, const T* __restrict__ color, T* __restrict__ out, int64_t B,
                           int64_t C, int64_t P, bool sigmoid) {
  const int64_t n = B * P;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / P, p = i - b * P;
    const int64_t base = b * C * P + p;
    if (color != nullptr) {
      const T r = img[base], g = img[base + P], bl = img[base + 2 * P];
#pragma unroll
      for (int k = 0; k < 3; ++k) {
        const T v = (color[3 * k] * r + color[3 * k + 1] * g + color[3 * k + 2] * bl) * T(0.25);
        out[base + k * P] = sigmoid ? sigm(v) : v;
      }
    } else {
      for (int64_t k = 0; k < C; ++k) {
        const T v = img[base + k * P] * T(0.25);
        out[base + k * P] = sigmoid ? sigm(v) : v;
      }
    }
  }
}

template <typename T>
__global__ void mix_backward_kernel(const T* __restrict__ grad, const T* __restrict__ out,
                                    const T* __restrict__ color, T* __restrict__ grad_img, int64_t B, int64_t C,
                                    int64_t P, bool sigmoid) {
  const int64_t n = B * P;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / P, p = i - b * P;
    const int64_t base = b * C * P + p;
    if (color != nullptr) {
      T d[3];
#pragma unroll
      for (int k = 0; k < 3; ++k) {
        const T y = out[base + k * P];
        d[k] = grad[base + k * P] * (sigmoid ? y * (T(1) - y) : T(1)) * T(0.25);
      }
#pragma unroll
      for (int j = 0; j < 3; ++j) grad_img[base + j * P] = color[j] * d[0] + color[3 + j] * d[1] + color[6 + j] * d[2];
    } else {
      for (int64_t k = 0; k < C; ++k) {
        const T y = out[base + k * P];
        grad_img[base + k * P] = grad[base + k * P] * (sigmoid ? y * (T(1) - y) : T(1)) * T(0.25);
      }
    }
  }
}

dim3 grid_for(int64_t n) {
  const int64_t blocks = (n + 255) / 256;
  return dim3(static_cast<unsigned>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8));
}

}  // namespace

cudaError_t launch_fft_mix(bool is_double, const void* img, const void* color, void* out, int64_t B, int64_t C,
                           int64_t P, bool sigmoid, cudaStream_t stream) {
  if (is_double) {
    mix_kernel<double><<<grid_for(B * P), 256, 0, stream>>>(static_cast<const double*>(img),
                                                            static_cast<const double*>(color),
                                                            static_cast<double*>(out), B, C, P, sigmoid);
  } else {
    mix_kernel<float><<<grid_for(B * P), 256, 0, stream>>>(static_cast<const float*>(img),
                                                           static_cast<const float*>(color),
                                                           static_cast<float*>(out), B, C, P, sigmoid);
  }
  return cudaGetLastError();
}

cudaError_t launch_fft_mix_backward(bool is_double, const void* grad, const void* out, const void* color,
                                    void* grad_img, int64_t B, int64_t C, int64_t P, bool sigmoid,
                                    cudaStream_t stream) {
  if (is_double) {
    mix_backward_kernel<double><<<grid_for(B * P), 256, 0, stream>>>(
        static_cast<const double*>(grad), static_cast<const double*>(out), static_cast<const double*>(color),
        static_cast<double*>(grad_img), B, C, P, sigmoid);
  } else {
    mix_backward_kernel<float><<<grid_for(B * P), 256, 0, stream>>>(
        static_cast<const float*>(grad), static_cast<const float*>(out), static_cast<const float*>(color),
        static_cast<float*>(grad_img), B, C, P, sigmoid);
  }
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace lightning_vis
