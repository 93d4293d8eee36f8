// CPU: the fused colour-mixing + sigmoid passes around the FFTs of the fft_image operator.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../fft_image.h"

namespace lightning_vis {
namespace {

template <typename T>
inline T sigm(T v) {
  return T(1) / (T(1) + std::exp(-v));
}

void mix_cpu(const at::Tensor& img, const at::Tensor& color, bool use_color, bool sigmoid, at::Tensor& out) {
  const int64_t B = img.size(0), C = img.size(1), P = img.size(2);
  AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "fft_image_mix", [&] {
    const scalar_t* x = img.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    scalar_t m[9];
    if (use_color) {
      const scalar_t* c = color.const_data_ptr<scalar_t>();
      for (int k = 0; k < 9; ++k) m[k] = c[k] * scalar_t(0.25);
    }
    at::parallel_for(0, B * P, 4096, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t b = i / P, p = i % P;
        const scalar_t* xb = x + b * C * P + p;
        scalar_t* yb = y + b * C * P + p;
        if (use_color) {
          const scalar_t r = xb[0], g = xb[P], bl = xb[2 * P];
          for (int k = 0; k < 3; ++k) {
            const scalar_t v = m[3 * k] * r + m[3 * k + 1] * g + m[3 * k + 2] * bl;
            yb[k * P] = sigmoid ? sigm(v) : v;
          }
        } else {
          for (int64_t k = 0; k < C; ++k) {
            const scalar_t v = xb[k * P] * scalar_t(0.25);
            yb[k * P] = sigmoid ? sigm(v) : v;
          }
        }
      }
    });
  });
}

void mix_back_cpu(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& color, bool use_color,
                  bool sigmoid, at::Tensor& grad_img) {
  const int64_t B = out.size(0), C = out.size(1), P = out.size(2);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "fft_image_mix_backward", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* o = out.const_data_ptr<scalar_t>();
    scalar_t* gi = grad_img.mutable_data_ptr<scalar_t>();
    scalar_t m[9];
    if (use_color) {
      const scalar_t* c = color.const_data_ptr<scalar_t>();
      for (int k = 0; k < 9; ++k) m[k] = c[k] * scalar_t(0.25);
    }
    at::parallel_for(0, B * P, 4096, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t b = i / P, p = i % P;
        const int64_t base = b * C * P + p;
        if (use_color) {
          scalar_t d[3];
          for (int k = 0; k < 3; ++k) {
            const scalar_t y = o[base + k * P];
            d[k] = g[base + k * P] * (sigmoid ? y * (scalar_t(1) - y) : scalar_t(1));
          }
          for (int j = 0; j < 3; ++j) gi[base + j * P] = m[j] * d[0] + m[3 + j] * d[1] + m[6 + j] * d[2];
        } else {
          for (int64_t k = 0; k < C; ++k) {
            const scalar_t y = o[base + k * P];
            gi[base + k * P] = g[base + k * P] * (sigmoid ? y * (scalar_t(1) - y) : scalar_t(1)) * scalar_t(0.25);
          }
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lightning_vis, CPU, m) {
  m.impl("fft_image", &fft_image_op<mix_cpu>);
  m.impl("fft_image_backward", &fft_image_backward_op<mix_back_cpu>);
}

}  // namespace lightning_vis
