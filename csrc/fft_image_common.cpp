// Checks, FFTs and the adjoint of the onesided inverse FFT; the fused colour/sigmoid passes are per backend.
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "fft_image.h"

namespace lightning_vis {
namespace {

std::vector<int64_t> fft_dims(int64_t nd) {
  std::vector<int64_t> dims;
  for (int64_t d = -nd; d < 0; ++d) dims.push_back(d);
  return dims;
}

std::string shape_str(c10::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// Validates the arguments; returns whether the colour matrix is used (3 channels and a 3x3 matrix given).
bool check(const at::Tensor& spectrum, const at::Tensor& scale, const at::Tensor& color, c10::IntArrayRef size) {
  const int64_t nd = static_cast<int64_t>(size.size());
  TORCH_CHECK(nd == 2 || nd == 3, "fft_image: size must be (H, W) or (T, H, W), got ", shape_str(size));
  for (auto v : size) TORCH_CHECK(v > 0, "fft_image: sizes must be positive, got ", shape_str(size));
  TORCH_CHECK(spectrum.scalar_type() == at::kFloat || spectrum.scalar_type() == at::kDouble,
              "fft_image: spectrum must be float32 or float64, got ", spectrum.scalar_type());
  std::vector<int64_t> want{-1, -1};
  for (int64_t i = 0; i < nd - 1; ++i) want.push_back(size[i]);
  want.push_back(size[nd - 1] / 2 + 1);
  want.push_back(2);
  bool ok = spectrum.dim() == nd + 3;
  for (int64_t i = 2; ok && i < nd + 3; ++i) ok = spectrum.size(i) == want[i];
  TORCH_CHECK(ok, "fft_image: spectrum must be (B, C, ", shape_str(c10::IntArrayRef(want).slice(2)).substr(1),
              " (the half spectrum of size ", shape_str(size), ", real and imaginary parts last), got ",
              shape_str(spectrum.sizes()));
  TORCH_CHECK(spectrum.size(1) == 1 || spectrum.size(1) == 3, "fft_image: 1 or 3 channels, got ", spectrum.size(1));
  TORCH_CHECK(scale.sizes() == spectrum.sizes().slice(2, nd),
              "fft_image: scale must have the spectrum's frequency shape ",
              shape_str(spectrum.sizes().slice(2, nd)), ", got ", shape_str(scale.sizes()));
  TORCH_CHECK(scale.device() == spectrum.device(), "fft_image: scale is on ", scale.device(), ", spectrum on ",
              spectrum.device());
  const bool use_color = spectrum.size(1) == 3 && color.numel() > 0;
  if (use_color) {
    TORCH_CHECK(color.dim() == 2 && color.size(0) == 3 && color.size(1) == 3,
                "fft_image: color must be a 3x3 matrix (or empty: no decorrelation), got ", shape_str(color.sizes()));
    TORCH_CHECK(color.device() == spectrum.device(), "fft_image: color is on ", color.device(), ", spectrum on ",
                spectrum.device());
  }
  return use_color;
}

}  // namespace

at::Tensor fft_image_impl(const at::Tensor& spectrum, const at::Tensor& scale, const at::Tensor& color,
                          c10::IntArrayRef size, bool sigmoid, MixFn mix) {
  const bool use_color = check(spectrum, scale, color, size);
  const int64_t nd = static_cast<int64_t>(size.size());
  auto spec = at::view_as_complex(spectrum.contiguous()) * scale.to(spectrum.scalar_type());
  auto img = at::fft_irfftn(spec, size, fft_dims(nd), "ortho").contiguous();
  auto out = at::empty_like(img);
  const auto col = use_color ? color.to(img.scalar_type()).contiguous() : at::Tensor();
  auto img3 = img.view({img.size(0), img.size(1), -1});
  auto out3 = out.view({img.size(0), img.size(1), -1});
  mix(img3, col, use_color, sigmoid, out3);
  return out;
}

at::Tensor fft_image_backward_impl(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& scale,
                                   const at::Tensor& color, c10::IntArrayRef size, bool sigmoid, MixBackFn mix_back) {
  const int64_t nd = static_cast<int64_t>(size.size());
  TORCH_CHECK(grad.sizes() == out.sizes(), "fft_image_backward: grad ", shape_str(grad.sizes()),
              " does not match the output ", shape_str(out.sizes()));
  const bool use_color = out.size(1) == 3 && color.numel() > 0;
  auto g = grad.to(out.scalar_type()).contiguous();
  auto o = out.contiguous();
  auto grad_img = at::empty_like(o);
  const auto col = use_color ? color.to(o.scalar_type()).contiguous() : at::Tensor();
  auto g3 = g.view({g.size(0), g.size(1), -1});
  auto o3 = o.view({o.size(0), o.size(1), -1});
  auto gi3 = grad_img.view({o.size(0), o.size(1), -1});
  mix_back(g3, o3, col, use_color, sigmoid, gi3);
  // adjoint of the onesided inverse FFT: a forward real FFT, the bins whose mirror image is not stored doubled
  auto half = at::fft_rfftn(grad_img, c10::nullopt, fft_dims(nd), "ortho");
  // (one pass: the doubling is folded into the scale, which is small)
  const int64_t n = size[nd - 1];
  const int64_t twice = n - half.size(-1);
  auto weights = scale.to(o.scalar_type()).clone();
  if (twice > 0) weights.narrow(-1, 1, twice).mul_(2);
  half.mul_(weights);
  return at::view_as_real(half).contiguous();
}

}  // namespace lightning_vis
