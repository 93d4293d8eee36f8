// The fft_image operator's fused colour-mixing + sigmoid passes, written once (single_source.h): per-thread bodies
// and their planner. fft_image_kernel.cu launches them on the GPU; the simulator runs them on the CPU.
//
// img / out / grad: (B, C, P) contiguous, C = 1 or 3; color: 9 values (row-major 3x3) or nullptr. One work item is
// V = 16 bytes of consecutive pixels of one image, all its channels: one 16-byte load / store per channel when the
// channel planes are aligned (P a multiple of V), pixel by pixel otherwise (and at an image's tail). Index
// arithmetic in int32 (the image of a work item by multiply-high) when the tensors allow it, else int64.
#pragma once
#include <cstdint>

#include "single_source.h"

namespace lightning_vis {
namespace gpu {

template <typename T, typename I>
struct FftPixels {
  static constexpr int V = 16 / sizeof(T);
  I C, P, groups;
  Div<I> per_image;
  // Reads V pixels of the C planes at src into x (zeros past the image's end); returns whether vectorised.
  LV_HOST_DEVICE bool load(const T* src, I p0, T (&x)[3][V]) const {
    const bool vec = p0 + V <= P && P % V == 0 && is_aligned(src, 16);
    LV_UNROLL
    for (int k = 0; k < 3; ++k) {
      if (k >= C) break;
      if (vec) {
        const Vec<T, V> u = ld_vec<V>(src + k * P);
        LV_UNROLL
        for (int i = 0; i < V; ++i) x[k][i] = u.v[i];
      } else {
        LV_UNROLL
        for (int i = 0; i < V; ++i) x[k][i] = p0 + i < P ? ld(src + k * P + i) : T(0);
      }
    }
    return vec;
  }
  LV_HOST_DEVICE void store(T* dst, I p0, bool vec, const T (&y)[3][V]) const {
    LV_UNROLL
    for (int k = 0; k < 3; ++k) {
      if (k >= C) break;
      if (vec) {
        Vec<T, V> u;
        LV_UNROLL
        for (int i = 0; i < V; ++i) u.v[i] = y[k][i];
        st_vec<V>(dst + k * P, u);
      } else {
        LV_UNROLL
        for (int i = 0; i < V; ++i) {
          if (p0 + i < P) st(dst + k * P + i, y[k][i]);
        }
      }
    }
  }
  LV_HOST_DEVICE void load_color(const T* color, T (&m)[9]) const {
    LV_UNROLL
    for (int k = 0; k < 9; ++k) m[k] = color != nullptr ? ld(color + k) : T(0);
  }
  // Calls f(p0, base) for the work items of thread th: pixels p0 .. p0 + V - 1 of one image, at offset base of its
  // first plane.
  template <class F>
  LV_HOST_DEVICE void for_items(const Thread& th, F&& f) const {
    for (I q = first_item<I>(th); q < groups; q += grid_stride<I>(th)) {
      I j;
      const I b = divmod(per_image, q, j), p0 = j * V;
      f(p0, b * C * P + p0);
    }
  }
};

// out = f(M . img / 4) (M = identity without a colour matrix), f = sigmoid or identity.
template <typename T, typename I>
struct FftMix {
  static constexpr int V = FftPixels<T, I>::V;
  FftPixels<T, I> px;
  const T* img;
  const T* color;
  T* out;
  bool sigmoid;
  LV_HOST_DEVICE void operator()(const Thread& th) const {
    T m[9];
    px.load_color(color, m);
    px.for_items(th, [&](I p0, I base) {
      T x[3][V], y[3][V];
      const bool vec = px.load(img + base, p0, x);
      if (vec) LV_PATH(fft_mix_vec);
      else LV_PATH(fft_mix_scalar);
      LV_UNROLL
      for (int k = 0; k < 3; ++k) {
        LV_UNROLL
        for (int i = 0; i < V; ++i) {
          T v = color != nullptr ? (m[3 * k] * x[0][i] + m[3 * k + 1] * x[1][i] + m[3 * k + 2] * x[2][i]) * T(0.25)
                                 : (k < px.C ? x[k][i] * T(0.25) : T(0));
          y[k][i] = sigmoid ? T(1) / (T(1) + exp_(-v)) : v;
        }
      }
      px.store(out + base, p0, vec, y);
    });
  }
};

// grad_img = M^T . (grad * f'(.)) / 4, f' from the saved output.
template <typename T, typename I>
struct FftMixBackward {
  static constexpr int V = FftPixels<T, I>::V;
  FftPixels<T, I> px;
  const T* grad;
  const T* out;
  const T* color;
  T* grad_img;
  bool sigmoid;
  LV_HOST_DEVICE void operator()(const Thread& th) const {
    T m[9];
    px.load_color(color, m);
    px.for_items(th, [&](I p0, I base) {
      T gr[3][V], y[3][V], d[3][V], r[3][V];
      const bool vec = px.load(grad + base, p0, gr);
      px.load(out + base, p0, y);
      if (vec) LV_PATH(fft_mix_back_vec);
      else LV_PATH(fft_mix_back_scalar);
      LV_UNROLL
      for (int k = 0; k < 3; ++k) {
        LV_UNROLL
        for (int i = 0; i < V; ++i) {
          d[k][i] = k < px.C ? gr[k][i] * (sigmoid ? y[k][i] * (T(1) - y[k][i]) : T(1)) * T(0.25) : T(0);
        }
      }
      LV_UNROLL
      for (int j2 = 0; j2 < 3; ++j2) {
        LV_UNROLL
        for (int i = 0; i < V; ++i) {
          r[j2][i] = color != nullptr ? m[j2] * d[0][i] + m[3 + j2] * d[1][i] + m[6 + j2] * d[2][i] : d[j2][i];
        }
      }
      px.store(grad_img + base, p0, vec, r);
    });
  }
};

template <typename T>
const T* typed(const void* p) {
  return static_cast<const T*>(p);
}
template <typename T>
T* typed(void* p) {
  return static_cast<T*>(p);
}

// Launches Body<T, I>{pixels, pointers (as T), sigmoid} with T from is_double and I int32 while every offset fits.
template <template <typename, typename> class Body, class L, class... Ptr>
void dispatch_fft(L& launch, const char* name, bool is_double, int64_t B, int64_t C, int64_t P, bool sigmoid,
                  const Limits& lim, Ptr... pointers) {
  const bool int64 = lim.force_int64 || B * C * P + 64 >= (int64_t(1) << 30);
  auto go = [&](auto tt, auto ti) {
    using T = typename decltype(tt)::type;
    using I = typename decltype(ti)::type;
    constexpr int V = FftPixels<T, I>::V;
    const int64_t per_image = (P + V - 1) / V;
    const FftPixels<T, I> px{static_cast<I>(C), static_cast<I>(P), static_cast<I>(B * per_image), Div<I>(per_image)};
    launch(Body<T, I>{px, typed<T>(pointers)..., sigmoid}, make_plan(name, 8 * sizeof(I), V, px.groups, lim));
  };
  auto with_i = [&](auto tt) {
    if (int64) go(tt, Tag<int64_t>{});
    else go(tt, Tag<int32_t>{});
  };
  if (is_double) with_i(Tag<double>{});
  else with_i(Tag<float>{});
}

template <class L>
void dispatch_fft_mix(L& launch, bool is_double, const void* img, const void* color, void* out, int64_t B, int64_t C,
                      int64_t P, bool sigmoid, const Limits& lim) {
  dispatch_fft<FftMix>(launch, "fft_mix", is_double, B, C, P, sigmoid, lim, img, color, out);
}

template <class L>
void dispatch_fft_mix_backward(L& launch, bool is_double, const void* grad, const void* out, const void* color,
                               void* grad_img, int64_t B, int64_t C, int64_t P, bool sigmoid, const Limits& lim) {
  dispatch_fft<FftMixBackward>(launch, "fft_mix_backward", is_double, B, C, P, sigmoid, lim, grad, out, color,
                               grad_img);
}

}  // namespace gpu
}  // namespace lightning_vis
