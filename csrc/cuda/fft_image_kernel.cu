// GPU launches of the fft_image operator's fused passes: the bodies and the planner are fft_image_bodies.h (shared
// with the simulator).
#include "fft_image_bodies.h"
#include "fft_image_kernel.h"
#include "launch.h"

namespace lightning_vis {
namespace gpu {

cudaError_t launch_fft_mix(bool is_double, const void* img, const void* color, void* out, int64_t B, int64_t C,
                           int64_t P, bool sigmoid, cudaStream_t stream) {
  CudaLaunch launch{stream};
  dispatch_fft_mix(launch, is_double, img, color, out, B, C, P, sigmoid, device_limits());
  return cudaGetLastError();
}

cudaError_t launch_fft_mix_backward(bool is_double, const void* grad, const void* out, const void* color,
                                    void* grad_img, int64_t B, int64_t C, int64_t P, bool sigmoid,
                                    cudaStream_t stream) {
  CudaLaunch launch{stream};
  dispatch_fft_mix_backward(launch, is_double, grad, out, color, grad_img, B, C, P, sigmoid, device_limits());
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace lightning_vis
