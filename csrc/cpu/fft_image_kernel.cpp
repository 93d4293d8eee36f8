// CPU: the fused colour-mixing + sigmoid passes around the FFTs of the fft_image operator.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../fft_image.h"

namespace lightning_vis {
namespace {

constexpr int64_t kBlock = 2048;  // pixels per task: inner loops over contiguous rows the compiler vectorises

// Calls fn(b, p0, n) for blocks of at most kBlock pixels of every image, in parallel.
template <typename F>
void for_blocks(int64_t B, int64_t P, F fn) {
  const int64_t per_image = (P + kBlock - 1) / kBlock;
  at::parallel_for(0, B * per_image, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t b = t / per_image, p0 = (t % per_image) * kBlock;
      fn(b, p0, std::min(kBlock, P - p0));
    }
  });
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
    for_blocks(B, P, [&](int64_t b, int64_t p0, int64_t n) {
      const scalar_t* xb = x + b * C * P + p0;
      scalar_t* yb = y + b * C * P + p0;
      if (use_color) {
        const scalar_t* __restrict__ r = xb;
        const scalar_t* __restrict__ g = xb + P;
        const scalar_t* __restrict__ bl = xb + 2 * P;
        for (int k = 0; k < 3; ++k) {
          scalar_t* __restrict__ o = yb + k * P;
          const scalar_t a0 = m[3 * k], a1 = m[3 * k + 1], a2 = m[3 * k + 2];
          for (int64_t i = 0; i < n; ++i) o[i] = a0 * r[i] + a1 * g[i] + a2 * bl[i];
        }
      } else {
        for (int64_t k = 0; k < C; ++k) {
          const scalar_t* __restrict__ in = xb + k * P;
          scalar_t* __restrict__ o = yb + k * P;
          for (int64_t i = 0; i < n; ++i) o[i] = in[i] * scalar_t(0.25);
        }
      }
    });
  });
  if (sigmoid) out.sigmoid_();  // ATen's vectorised sigmoid (AVX2/AVX-512 at run time), one more pass
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
    for_blocks(B, P, [&](int64_t b, int64_t p0, int64_t n) {
      const int64_t base = b * C * P + p0;
      scalar_t d[3][kBlock];
      const int64_t channels = use_color ? 3 : C;
      for (int64_t k = 0; k < channels; ++k) {
        const scalar_t* __restrict__ gk = g + base + k * P;
        const scalar_t* __restrict__ yk = o + base + k * P;
        scalar_t* __restrict__ dk = use_color ? d[k] : gi + base + k * P;
        const scalar_t s = use_color ? scalar_t(1) : scalar_t(0.25);
        if (sigmoid) {
          for (int64_t i = 0; i < n; ++i) dk[i] = gk[i] * yk[i] * (scalar_t(1) - yk[i]) * s;
        } else {
          for (int64_t i = 0; i < n; ++i) dk[i] = gk[i] * s;
        }
      }
      if (use_color) {
        for (int j = 0; j < 3; ++j) {
          scalar_t* __restrict__ out_j = gi + base + j * P;
          const scalar_t a0 = m[j], a1 = m[3 + j], a2 = m[6 + j];
          for (int64_t i = 0; i < n; ++i) out_j[i] = a0 * d[0][i] + a1 * d[1][i] + a2 * d[2][i];
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
