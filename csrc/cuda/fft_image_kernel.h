// The fft_image operator's fused colour-mixing + sigmoid passes on the GPU, as plain launches: no torch header,
// so that nvcc compiles this quickly. The ATen side (streams, guards, checks) is fft_image_cuda.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lightning_vis {
namespace gpu {

// img/out: (B, C, P) contiguous; color: 9 values (row-major 3x3) or nullptr; is_double selects float/double.
cudaError_t launch_fft_mix(bool is_double, const void* img, const void* color, void* out, int64_t B, int64_t C,
                           int64_t P, bool sigmoid, cudaStream_t stream);
cudaError_t launch_fft_mix_backward(bool is_double, const void* grad, const void* out, const void* color,
                                    void* grad_img, int64_t B, int64_t C, int64_t P, bool sigmoid,
                                    cudaStream_t stream);

}  // namespace gpu
}  // namespace lightning_vis
