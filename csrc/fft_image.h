// The batched FFT image parameterization (operator 3): spectrum * scale -> inverse real FFT (orthonormal) -> /4 ->
// colour mixing (3 channels) -> sigmoid. The FFTs are ATen's (pocketfft / cuFFT); what surrounds them is fused
// into one pass per direction, written per backend (cpu/fft_image_kernel.cpp, cuda/fft_image_kernel.cu).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

namespace lightning_vis {

// out[b, i, p] = f(sum_j M[i, j] * img[b, j, p] / 4) (M = identity when !use_color), f = sigmoid or identity.
// img, out: (B, C, P) contiguous, float or double; color: (3, 3) contiguous of the same dtype (unused when !use_color).
using MixFn = void (*)(const at::Tensor& img, const at::Tensor& color, bool use_color, bool sigmoid, at::Tensor& out);
// grad_img[b, j, p] = sum_i M[i, j] * grad[b, i, p] * f'(.) / 4, with f' from the saved output.
using MixBackFn = void (*)(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& color, bool use_color,
                           bool sigmoid, at::Tensor& grad_img);

at::Tensor fft_image_impl(const at::Tensor& spectrum, const at::Tensor& scale, const at::Tensor& color,
                          c10::IntArrayRef size, bool sigmoid, MixFn mix);
at::Tensor fft_image_backward_impl(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& scale,
                                   const at::Tensor& color, c10::IntArrayRef size, bool sigmoid, MixBackFn mix_back);

template <MixFn F>
at::Tensor fft_image_op(const at::Tensor& spectrum, const at::Tensor& scale, const at::Tensor& color,
                        c10::IntArrayRef size, bool sigmoid) {
  return fft_image_impl(spectrum, scale, color, size, sigmoid, F);
}

template <MixBackFn F>
at::Tensor fft_image_backward_op(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& scale,
                                 const at::Tensor& color, c10::IntArrayRef size, bool sigmoid) {
  return fft_image_backward_impl(grad, out, scale, color, size, sigmoid, F);
}

}  // namespace lightning_vis
