// CUDA registrations of the fft_image operator: cuFFT through ATen, the fused passes in fft_image_kernel.cu.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../fft_image.h"
#include "fft_image_kernel.h"

namespace lightning_vis {
namespace {

void mix_cuda(const at::Tensor& img, const at::Tensor& color, bool use_color, bool sigmoid, at::Tensor& out) {
  c10::cuda::CUDAGuard guard(img.device());
  C10_CUDA_CHECK(gpu::launch_fft_mix(img.scalar_type() == at::kDouble, img.const_data_ptr(),
                                     use_color ? color.const_data_ptr() : nullptr, out.mutable_data_ptr(),
                                     img.size(0), img.size(1), img.size(2), sigmoid,
                                     at::cuda::getCurrentCUDAStream()));
}

void mix_back_cuda(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& color, bool use_color,
                   bool sigmoid, at::Tensor& grad_img) {
  c10::cuda::CUDAGuard guard(out.device());
  C10_CUDA_CHECK(gpu::launch_fft_mix_backward(out.scalar_type() == at::kDouble, grad.const_data_ptr(),
                                              out.const_data_ptr(), use_color ? color.const_data_ptr() : nullptr,
                                              grad_img.mutable_data_ptr(), out.size(0), out.size(1), out.size(2),
                                              sigmoid, at::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(lightning_vis, CUDA, m) {
  m.impl("fft_image", &fft_image_op<mix_cuda>);
  m.impl("fft_image_backward", &fft_image_backward_op<mix_back_cuda>);
}

}  // namespace lightning_vis
